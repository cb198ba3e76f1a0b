"""Device mesh, parameter sharding rules and batch shardings.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose
parameters and optimiser state are also split, ZeRO-3 style). Which parameters are split is
decided only by `config.sharding_rules`: `(regex over the '/'-joined parameter path, spec)` pairs,
first match wins, where `spec` names a mesh axis (or None) per array dimension. A dimension that
does not divide evenly by its axis, and any array smaller than `fsdp_min_size` elements, stays
replicated, so one rule set works from 1 CPU to a pod slice.
"""

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def compiler_options(config) -> dict | None:
  """XLA options for the programs `config` compiles (`jax.jit(..., compiler_options=)`):
  `config.fast_compile` lowers the backend's optimisation level (compile time over run time)."""
  if config.get("fast_compile", False):
    return {"xla_backend_optimization_level": 0}
  return None


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp) mesh. `-1` in one axis takes all remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise ValueError(f"config.mesh {dict(zip(AXES, sizes))}: {n} devices are not divisible by "
                       f"{known}.")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f"config.mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"but {n} are available; set one axis to -1 to use all of them.")
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def path_str(path) -> str:
  """'/'-joined names of a jax tree path (dict keys, attributes, indices)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules, min_size: int) -> P:
  """PartitionSpec for one array from the first matching rule (replicated if none)."""
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      spec = tuple(spec)[: len(shape)]
      out = []
      for dim, axis in zip(shape, spec):
        ok = axis is not None and dim % mesh.shape[axis] == 0 and mesh.shape[axis] > 1
        out.append(axis if ok else None)
      return P(*out)
  return P()


def tree_shardings(tree: Any, mesh: Mesh, rules, min_size: int = 0):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, spec_for(path_str(path), shape, mesh, rules, min_size))
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_size_per_process(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f"train.batch_size={global_batch} must be divisible by the number of "
                     f"processes ({jax.process_count()}).")
  return global_batch // jax.process_count()


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assembles per-process numpy batches into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  """`[m, ...]` host array -> `[n, ...]` (n >= m >= 1) by repeating the last row: padded rows are
  valid inputs (no NaNs from all-zero masks) and are sliced off the results."""
  x = np.asarray(x)
  if len(x) == n:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)], axis=0)


def pad_rows_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
  """`pad_rows` to the next multiple of `multiple` rows (e.g. the device count)."""
  return pad_rows(x, -(-len(x) // multiple) * multiple)
