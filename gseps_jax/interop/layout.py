"""THE torch-layout table: our Flax param paths and layouts <-> PyTorch state-dict names/layouts.

Our modules name their submodules like the PyTorch modules they mirror (HF encoders, the
official SEPS heads, `torch_export/gseps_torch.py`), so one mechanical rule converts every tensor,
in both directions; HF import and export, the official SEPS `.pth` and the benchmarks all use it:

  name    path segments joined by '.', list segments `layer_3` / `layers_1` / `blocks_0` written
          `layer.3` / `layers.1` / `blocks.0`; the leaf `kernel`, `embedding` and a LayerNorm's
          `scale` (ndim >= 1) become `weight` (a scalar `scale` keeps its name).
  layout  Dense kernels are transposed (`[in, out]` vs torch `[out, in]`), conv kernels permuted
          (`[kh, kw, in, out]` vs `[out, in, kh, kw]`); everything else (biases, `cls_token`,
          `position_embeddings`, `relative_position_bias_table`, prompts) is kept.

Also here: flattening a param tree to `{path tuple: leaf}` and back, and the one report of a
mismatch ("Missing N: ... Unexpected N: ... Wrong shape N: ...").
"""

import re
from typing import Any, Iterable, Mapping

import jax
import numpy as np

Path = tuple[str, ...]

_LIST_SEGMENT = re.compile(r"^(layer|layers|blocks)_(\d+)$")
_LEAF_TO_TORCH = {"kernel": "weight", "embedding": "weight"}
_TO_TORCH_AXES = {2: (1, 0), 4: (3, 2, 0, 1)}  # Dense and conv kernels
MAX_LISTED = 20


def torch_name(path: Path, ndim: int = 1) -> str:
  """Flax param path -> PyTorch name, e.g. `('encoder', 'layer_0', ..., 'kernel')` ->
  `'encoder.layer.0....weight'`. `ndim`: the leaf's rank (a scalar `scale` keeps its name)."""
  parts = []
  for seg in path[:-1]:
    m = _LIST_SEGMENT.match(seg)
    parts.extend([m.group(1), m.group(2)] if m else [seg])
  leaf = path[-1]
  if leaf == "scale" and ndim >= 1:
    leaf = "weight"
  parts.append(_LEAF_TO_TORCH.get(leaf, leaf))
  return ".".join(parts)


def _kernel_axes(path: Path, ndim: int):
  """Axis permutation our layout -> torch's (`[in, out]` -> `[out, in]`; `[kh, kw, in, out]` ->
  `[out, in, kh, kw]`), or None for a tensor kept as it is."""
  return _TO_TORCH_AXES.get(ndim) if path[-1] == "kernel" else None


def to_torch(path: Path, x: np.ndarray) -> np.ndarray:
  """Our layout -> the PyTorch layout of the tensor at `path`."""
  axes = _kernel_axes(path, x.ndim)
  return x if axes is None else x.transpose(axes)


def from_torch(path: Path, x: np.ndarray) -> np.ndarray:
  """Inverse of `to_torch`."""
  axes = _kernel_axes(path, x.ndim)
  return x if axes is None else x.transpose(np.argsort(axes))


def torch_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a param of our `shape` at `path`."""
  return to_torch(path, np.empty(shape, np.bool_)).shape


def flatten(tree) -> dict[Path, Any]:
  """Nested dict -> `{path tuple: leaf}`."""
  return {tuple(k.key for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def set_path(tree: dict, path: Path, value) -> None:
  """`tree[path[0]]...[path[-1]] = value`, creating the intermediate dicts."""
  node = tree
  for seg in path[:-1]:
    node = node.setdefault(seg, {})
  node[path[-1]] = value


def listing(names: Iterable[str], limit: int | None = None) -> str:
  """Sorted, comma-separated; with `limit`, the first `limit` names and how many more."""
  names = sorted(names)
  if limit is None or len(names) <= limit:
    return ", ".join(names)
  return ", ".join(names[:limit]) + f" ... and {len(names) - limit} more"


def mismatch_report(missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                    wrong_shape: Iterable[str] = (), limit: int | None = None) -> list[str]:
  """`['Missing N: a, b.', 'Unexpected N: ...', 'Wrong shape N: ...']` for the non-empty
  groups (empty when everything matches)."""
  out = []
  for label, names in (("Missing", list(missing)), ("Unexpected", list(unexpected)),
                       ("Wrong shape", list(wrong_shape))):
    if names:
      out.append(f"{label} {len(names)}: {listing(names, limit)}.")
  return out


def compare_shapes(got: Mapping[str, tuple], want: Mapping[str, tuple]) -> list[str]:
  """`mismatch_report` of a `{name: shape}` against the expected `{name: shape}`."""
  return mismatch_report(
      [k for k in want if k not in got], [k for k in got if k not in want],
      [f"{k} {tuple(got[k])} (expected {tuple(want[k])})"
       for k in want if k in got and tuple(got[k]) != tuple(want[k])])
