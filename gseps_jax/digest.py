"""Digest of a train state, saved with every checkpoint step and checked on restore
(checkpoint.py, docs/reliability.md): accidental damage is detected, not tampering.

Position-weighted sums of the GLOBAL arrays' bit patterns, so it is the same number on every
process, for any sharding, and after restoring onto another mesh. It is computed on the host from
each process's addressable shards (one replica of each), each shard weighted by its elements'
global positions; sums mod 2^32 add up across shards and processes (one all-gather of two words
per leaf). Nothing is compiled, so it costs no start-up time.
"""

import jax
import numpy as np

DIGEST_ALGO = "u32-weighted-sums-v1"
_HASH_MUL, _HASH_ADD = np.uint32(0x9E3779B1), np.uint32(0x7F4A7C15)


def _words(a: np.ndarray) -> np.ndarray:
  """The array's bit pattern as uint32 words (one per element; two for 64-bit types)."""
  if a.dtype == np.bool_:
    return a.astype(np.uint32)
  size = a.dtype.itemsize
  if size == 4:
    return a.view(np.uint32)
  if size in (1, 2):
    return a.view(np.uint8 if size == 1 else np.uint16).astype(np.uint32)
  if size == 8:  # little-endian words, low word first, as a trailing axis of 2
    return a.reshape(a.shape + (1,)).view(np.uint32)
  raise TypeError(f"Cannot digest an array of dtype {a.dtype}.")


def _block_sums(block: np.ndarray, start: tuple, shape: tuple) -> np.ndarray:
  """[sum(w * (2i+1)), sum(rotl(w,13) * h(i))] mod 2^32 of `block`, the part of a global array
  of `shape` that begins at `start`; i is the element's flat position in the global array.

  The first weight is odd, hence invertible mod 2^32: any single changed word changes it; the
  second uses hashed odd weights h(i), so swapped or scattered changes that cancel in the first
  are caught.
  """
  w = _words(np.ascontiguousarray(block))
  if w.ndim > len(shape):  # 64-bit types: global positions count words
    start, shape = tuple(start) + (0,), tuple(shape) + (2,)
  idx = np.zeros((), np.uint32)
  stride = 1
  with np.errstate(over="ignore"):
    for axis in range(w.ndim - 1, -1, -1):
      pos = (np.arange(w.shape[axis], dtype=np.uint64) + start[axis]) * (stride % 2**32)
      view = [1] * w.ndim
      view[axis] = w.shape[axis]
      idx = idx + (pos % 2**32).astype(np.uint32).reshape(view)
      stride *= shape[axis]
    idx = np.broadcast_to(idx, w.shape)
    w1 = idx * np.uint32(2) + np.uint32(1)
    w2 = (idx * _HASH_MUL + _HASH_ADD) | np.uint32(1)
    rot = (w << np.uint32(13)) | (w >> np.uint32(19))
    return np.array([np.sum(w * w1, dtype=np.uint32), np.sum(rot * w2, dtype=np.uint32)],
                    np.uint32)


def _leaf_sums(x) -> tuple[np.ndarray, bool]:
  """(this process's part of the leaf's two sums, whether its part is finite)."""
  if not isinstance(x, jax.Array):
    a = np.asarray(x)
    return _block_sums(a, (0,) * a.ndim, a.shape), _finite(a)
  sums, finite = np.zeros(2, np.uint32), True
  for shard in x.addressable_shards:
    if shard.replica_id != 0:  # each element is counted once over all processes
      continue
    block = np.asarray(shard.data)
    start = tuple(sl.indices(n)[0] for sl, n in zip(shard.index, x.shape))
    with np.errstate(over="ignore"):
      sums = sums + _block_sums(block, start, x.shape)
    finite = finite and _finite(block)
  return sums, finite


def _finite(a: np.ndarray) -> bool:
  return bool(np.all(np.isfinite(a))) if np.issubdtype(a.dtype, np.inexact) else True


def state_digest(state) -> tuple[dict, list[str]]:
  """({leaf path: 16 hex digits}, [paths of leaves holding NaN/Inf]) of a pytree of arrays.

  Every process must call it together on a multi-process state (one all-gather).
  """
  with_path, _ = jax.tree_util.tree_flatten_with_path(state)
  if not with_path:
    return {}, []
  paths = [jax.tree_util.keystr(p) for p, _ in with_path]
  parts = [_leaf_sums(x) for _, x in with_path]
  sums = np.stack([s for s, _ in parts])
  finite = np.array([f for _, f in parts])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    sums = np.sum(np.asarray(multihost_utils.process_allgather(sums)).astype(np.uint64),
                  axis=0) % 2**32
    finite = np.all(np.asarray(multihost_utils.process_allgather(finite)), axis=0)
  hexes = {p: "%08x%08x" % (int(d[0]), int(d[1])) for p, d in zip(paths, sums)}
  return hexes, [p for p, f in zip(paths, finite) if not bool(f)]
