"""The token-level bidirectional similarity kernel (the one hot kernel of GRM).

For an x-item with token set X = {x_l} (valid where `x_mask`) and a y-item with token set
Y = {y_m} (valid where `y_mask`), with every token L2-normalised:

  x2y(X, Y) = mean over valid l of  max over valid m of cos(x_l, y_m)
  y2x(X, Y) = mean over valid m of  max over valid l of cos(x_l, y_m)
  both(X, Y) = (x2y + y2x) / 2

The name says which side asks: in "x2y" every x token looks for its best match among the y tokens
and the x side is averaged. With x = image tokens and y = caption tokens, "x2y" is image-to-text
(i2t) and "y2x" is text-to-image (t2i: each word finds its best patch, averaged over words).

`token_similarity` scores every (x-item, y-item) pair -> `[Bx, By]`. The pair grid is cut into
tiles of `chunk` x `chunk` pairs (the batch sizes need not be multiples: the inputs are padded
with empty items and the result is sliced) and the tiles are visited with `lax.map`, so the
`[tile_x, tile_y, Lx, Ly]` cosine block of one tile is the largest intermediate, in the forward
and (thanks to `jax.checkpoint` around the tile) in the backward pass.

Length buckets (`buckets=b > 1`, for evaluation): padding tokens cost full matmul work in the
tiles above. With buckets, each item's valid tokens are moved to the front (a stable
permutation; the masks make the order irrelevant), the items are sorted by valid count, and every
tile runs on its tokens cut to the smallest of b static lengths (ceil(L * k / b), k = 1..b, per
side) that holds its longest item, chosen by `lax.switch`. Results are un-permuted, so the
scores are the same (up to float reassociation); the work shrinks with the padding, e.g. the
Flickr30K test captions fill 15.9 of 32 text positions on average (pinned BERT tokenizer).
`buckets=(bx, by)` sets the two sides apart: bx * by tile variants are compiled, so a side whose
items are always full (GRM's image tokens: the union of its level masks is every token) takes 1
and costs no compile time.

Empty items: an item with no valid token scores exactly 0 against everything (and so gets zero
gradient). Invalid tokens never win a max and never enter a mean. All values stay finite.

Token weights (`x_weight`, `y_weight`, optional, for training GRM's keep decisions): a float
weight w in [0, 1] per token makes the token's presence differentiable. The mean becomes the
w-weighted mean, sum_l w_l best_l / sum_l w_l, and the max is gated: a candidate token of
weight w offers w * (cos + 1) - 1 instead of cos (w = 1: its cosine; w = 0: -1, the lowest
cosine, so it never beats a weight-1 token). With the straight-through keep mask of the saliency
adapters (forward 0/1, backward the soft keep probability) and the mask = the padding mask, the
forward value is exactly the boolean kernel on the kept tokens, and the gradient reaches every
token's keep probability: a dropped token's d score / d w_l = (best_l - mean) / sum w says whether
adding it would raise the mean. Without weights (evaluation) the boolean path runs unchanged.

Backward pass: the masked max-mean has a custom VJP (`_masked_max_mean`) that keeps each max's
winner index from the forward pass, so the cotangent of the cosine block is one select (fused
into the einsum's backward) instead of autodiff's tie-mask passes over the block; an exact tie
sends the cotangent to the first winner.

`sharded_token_similarity` runs the same kernel under `shard_map` with x split over one mesh axis
and y over another (or replicated), giving the score matrix sharded `P(x_axis, y_axis)` without
any communication: every device scores its own block of the pair grid.
"""

import functools
from typing import Any, Optional, Sequence, Tuple, Union

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DIRECTIONS = ("x2y", "y2x", "both")
# Fill for masked-out cosines before a max: far below any cosine (>= -1) yet finite, so that an
# all-invalid row gives a finite (then discarded) value instead of -inf / NaN gradients.
_NEG = -1e4

Chunk = Optional[Union[int, Tuple[int, int]]]
Buckets = Union[int, Tuple[int, int]]


def l2_normalize(x: jax.Array, eps: float = 1e-12, *, clamp: bool = False) -> jax.Array:
  """`x` scaled to unit L2 norm over the last axis, computed in float32.

  The `x / (||x|| + eps)` form has a NaN gradient at all-zero (padding) vectors; both forms here
  do not.

  Args:
    x: `[..., D]`.
    eps: `clamp=False` (the kernel's form): `x * rsqrt(sum(x^2) + eps)`, eps added to the squared
      norm. `clamp=True` (torch `F.normalize`, the official SEPS head's form):
      `x * rsqrt(max(sum(x^2), eps^2))` = x / max(||x||, eps).

  Returns:
    `[..., D]` in float32 (float64 stays float64), unit norm; zero vectors stay zero.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if clamp:  # square, not x * x: the two differ in the last bit of the gradient
    return x * lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))
  return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _masked_max_mean(s, max_mask, mean_mask, max_axis, max_weight=None, mean_weight=None):
  """Masked max of `s` over `max_axis`, then masked mean over the remaining token axis.

  Args:
    s: `[cx, cy, Lx, Ly]` cosines (float32, or float64 for float64 inputs).
    max_mask: boolean, broadcastable to `s`: tokens allowed to win the max.
    mean_mask: boolean `[cx or 1, cy or 1, L]` (L = the axis left after the max).
    max_axis: 2 (max over x tokens) or 3 (max over y tokens).
    max_weight: None, or float weights shaped like `max_mask`: gated max (module docstring).
    mean_weight: None, or float weights shaped like `mean_mask`: weighted mean.

  Returns:
    `[cx, cy]`; 0 where either side has no valid token.

  Differentiated by `_max_mean_bwd` (a custom VJP): the winner's index is kept from the forward
  pass and the cotangent of `s` is one select against it, which XLA fuses into the einsum's
  backward. Autodiff of `jnp.max` instead builds the tie mask on the full block, counts ties
  and divides (several passes over `[cx, cy, Lx, Ly]`): in the demo's GRM training step that
  backward cost 55 ms per level against 15 ms for its forward (docs/benchmarks.md). The one
  difference: exact ties send the whole cotangent to the first winner instead of splitting it.
  """
  return _max_mean(max_axis, s, max_mask, mean_mask, max_weight, mean_weight)


def _max_mean_parts(max_axis, s, max_mask, mean_mask, max_weight, mean_weight, *, need_index):
  # The mask enters as an additive bias built on the small mask, not as a select on the
  # [cx, cy, Lx, Ly] block. Same values (valid cosines get + 0, exact; invalid ones end below
  # -9998 and never win over a valid one). A tile compiled on its own then reads the block in
  # the dot's natural layout: 1.8x faster on CPU and 28% fewer bytes in XLA's cost analysis
  # (the roofline's memory floor); inside the lax.map'ed kernel the speed is unchanged
  # (docs/performance.md, "Third pass").
  bias = jnp.where(max_mask, 0.0, _NEG).astype(s.dtype)
  if max_weight is None:
    a = s + bias
  else:  # gated: w * (cos + 1) - 1
    a = (s + 1.0) * max_weight.astype(s.dtype) + bias
  best = jnp.max(a, axis=max_axis)  # [cx, cy, L]
  if max_weight is not None:
    best = best - 1.0
  idx = jnp.argmax(a, axis=max_axis) if need_index else None
  any_max = jnp.any(max_mask, axis=max_axis)  # the max side has >= 1 valid token
  valid = mean_mask & any_max
  if mean_weight is None:
    w = valid.astype(best.dtype)
    den = jnp.maximum(jnp.sum(mean_mask, axis=-1), 1).astype(best.dtype)
  else:
    w = jnp.where(valid, mean_weight.astype(best.dtype), 0.0)
    den = jnp.sum(w, axis=-1)
    den = jnp.where(den > 0, den, 1.0)
  out = jnp.sum(w * best, axis=-1) / den
  return out, (idx, best, w, den, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _max_mean(max_axis, s, max_mask, mean_mask, max_weight, mean_weight):
  return _max_mean_parts(max_axis, s, max_mask, mean_mask, max_weight, mean_weight,
                         need_index=False)[0]


def _max_mean_fwd(max_axis, s, max_mask, mean_mask, max_weight, mean_weight):
  out, (idx, best, w, den, valid) = _max_mean_parts(
      max_axis, s, max_mask, mean_mask, max_weight, mean_weight, need_index=True)
  # The winner's cosine, for the gate's gradient (d best / d w = cos + 1 at the winner).
  s_at = (None if max_weight is None else
          jnp.take_along_axis(s, jnp.expand_dims(idx, max_axis), axis=max_axis))
  # Only arrays: the block's shape follows from idx and max_mask (full length on max_axis).
  return out, (idx, best, w, den, valid, out, s_at, max_mask, max_weight, mean_weight)


def _sum_to(x, shape):
  """Sums `x` over the axes where `shape` broadcasts (size 1) to give `shape`."""
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


def _max_mean_bwd(max_axis, res, g):
  idx, best, w, den, valid, out, s_at, max_mask, max_weight, mean_weight = res
  s_shape = idx.shape[:max_axis] + (max_mask.shape[max_axis],) + idx.shape[max_axis:]
  g_best = g[..., None] * w / den[..., None]  # d out / d best  [cx, cy, L]
  winner = lax.broadcasted_iota(idx.dtype, s_shape, max_axis) == jnp.expand_dims(idx, max_axis)
  g_at = jnp.expand_dims(g_best, max_axis)
  ds = jnp.where(winner, g_at, 0.0)
  d_max_w = None
  if max_weight is not None:
    gate = max_weight.astype(ds.dtype)
    ds = ds * gate
    d_max_w = _sum_to(jnp.where(winner, g_at * (s_at + 1.0), 0.0),
                      max_weight.shape).astype(max_weight.dtype)
  d_mean_w = None
  if mean_weight is not None:  # d out / d w_l = (best_l - out) / den on valid tokens
    d = jnp.where(valid, g[..., None] * (best - out[..., None]) / den[..., None], 0.0)
    d_mean_w = _sum_to(d, mean_weight.shape).astype(mean_weight.dtype)
  return ds, None, None, d_max_w, d_mean_w


_max_mean.defvjp(_max_mean_fwd, _max_mean_bwd)


def _tile_scores(xt, xms, yt, yms, xws=None, yws=None, *, direction, precision, acc_dtype):
  """Scores of one tile of the pair grid, for one or several (x_mask, y_mask) pairs.

  Args:
    xt: `[cx, Lx, D]` normalised x tokens (compute dtype).
    xms: tuple of M `[cx, Lx]` bool x masks.
    yt: `[cy, Ly, D]` normalised y tokens (compute dtype).
    yms: tuple of M `[cy, Ly]` bool y masks (paired with `xms`).
    xws, yws: None, or tuples of M token weights (`[c, L]` float or None), paired with the masks.

  Returns:
    `[M, cx, cy]` in `acc_dtype`: the cosine block is computed once and reduced once per pair.
  """
  # fp32 accumulation whatever the input dtype. The [cx, cy, Lx, Ly] block of this tile is the
  # largest intermediate (XLA on CPU keeps ~3 such buffers: the dot output and the two masked
  # reductions' inputs; see docs/benchmarks.md).
  s = jnp.einsum("ild,jmd->ijlm", xt, yt, precision=precision,
                 preferred_element_type=acc_dtype)
  outs = []
  xws = (None,) * len(xms) if xws is None else xws
  yws = (None,) * len(yms) if yws is None else yws
  for xm, ym, xw, yw in zip(xms, yms, xws, yws):
    xm4 = xm[:, None, :, None]  # [cx, 1, Lx, 1]
    ym4 = ym[None, :, None, :]  # [1, cy, 1, Ly]
    xw3, yw3 = (None if xw is None else xw[:, None, :]), (None if yw is None else yw[None, :, :])
    out = []
    if direction in ("x2y", "both"):  # each x token: best y token; average over x tokens
      out.append(_masked_max_mean(s, ym4, xm[:, None, :], max_axis=3,
                                  max_weight=None if yw is None else yw3[:, :, None, :],
                                  mean_weight=xw3))
    if direction in ("y2x", "both"):  # each y token: best x token; average over y tokens
      out.append(_masked_max_mean(s, xm4, ym[None, :, :], max_axis=2,
                                  max_weight=None if xw is None else xw3[..., None],
                                  mean_weight=yw3))
    outs.append(out[0] if len(out) == 1 else 0.5 * (out[0] + out[1]))
  return jnp.stack(outs)


def _tile_sizes(chunk: Chunk, bx: int, by: int) -> Tuple[int, int]:
  if chunk is None:
    return bx, by
  cx, cy = (chunk, chunk) if isinstance(chunk, int) else tuple(chunk)
  if cx < 1 or cy < 1:
    raise ValueError(f"chunk must be positive, got {chunk!r}")
  return min(cx, bx), min(cy, by)


def _pad_items(t, ms, n):
  """Pads the item axis of tokens `[B, L, D]` and of each `[B, L]` array in the pytree `ms`
  (masks, weights; None entries stay None) to `n` with empty items."""
  pad = n - t.shape[0]
  if pad == 0:
    return t, ms
  return (jnp.pad(t, ((0, pad), (0, 0), (0, 0))),
          jax.tree.map(lambda m: jnp.pad(m, ((0, pad), (0, 0))), ms))


def _check_inputs(x, x_mask, y, y_mask, direction):
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
  if x.ndim != 3 or y.ndim != 3:
    raise ValueError(f"x and y must be [B, L, D]; got x {x.shape}, y {y.shape}")
  if x.shape[-1] != y.shape[-1]:
    raise ValueError(f"token widths differ: x {x.shape}, y {y.shape}")
  if x_mask.shape != x.shape[:2] or y_mask.shape != y.shape[:2]:
    raise ValueError(f"masks must be [B, L] matching the tokens: x {x.shape} / x_mask "
                     f"{x_mask.shape}, y {y.shape} / y_mask {y_mask.shape}")


@functools.partial(jax.jit, static_argnames=("direction", "chunk", "compute_dtype", "precision",
                                             "buckets"))
def token_similarity(x: jax.Array, x_mask: jax.Array, y: jax.Array, y_mask: jax.Array, *,
                     x_weight: Optional[jax.Array] = None, y_weight: Optional[jax.Array] = None,
                     direction: str = "both", chunk: Chunk = None,
                     compute_dtype: Any = None,
                     precision: Optional[lax.Precision] = None, buckets: Buckets = 1) -> jax.Array:
  """All-pairs token-level similarity, tiled over the pair grid.

  Args:
    x: `[Bx, Lx, D]` tokens of the x items (e.g. images), any float dtype.
    x_mask: `[Bx, Lx]` bool (or 0/1): valid x tokens.
    y: `[By, Ly, D]` tokens of the y items (e.g. captions).
    y_mask: `[By, Ly]` bool (or 0/1): valid y tokens.
    x_weight, y_weight: None (the boolean kernel), or `[B, L]` float token weights in [0, 1]:
      weighted mean and gated max over the tokens of the mask (module docstring). Training only
      (GRM's straight-through keep masks); each side independently.
    direction: "x2y" (x tokens ask, averaged over x), "y2x" (y tokens ask, averaged over y) or
      "both" (the two halved); see the module docstring.
    chunk: pair-grid tile: None = one tile with all pairs; an int c = c x c tiles; a pair
      (cx, cy). Peak memory is O(cx * cy * Lx * Ly) instead of O(Bx * By * Lx * Ly).
    compute_dtype: dtype of the normalised tokens fed to the matmul (e.g. jnp.bfloat16);
      accumulation and the reductions are float32 in every case. None = float32.
    precision: `lax.Precision` of the matmul (e.g. HIGHEST for true fp32 on TPU/GPU TF32).
    buckets: static token-length buckets (module docstring): an int b for both sides, or a pair
      (bx, by); 1 = off. Each tile picks its bucket, so it pays off with `chunk` tiles; bx * by
      tile variants are compiled (b^2 for an int).

  Returns:
    `[Bx, By]` float32 scores (float64 for float64 inputs) in [-1, 1]; 0 for pairs where an
    item has no valid token.
  """
  _check_inputs(x, x_mask, y, y_mask, direction)
  for name, w, m in (("x_weight", x_weight, x_mask), ("y_weight", y_weight, y_mask)):
    if w is not None and w.shape != m.shape:
      raise ValueError(f"{name} must be shaped like its mask {m.shape}, got {w.shape}")
  return _all_pairs(x, (x_mask,), y, (y_mask,), direction=direction, chunk=chunk,
                    compute_dtype=compute_dtype, precision=precision, buckets=buckets,
                    x_weights=(x_weight,), y_weights=(y_weight,))[0]


@functools.partial(jax.jit, static_argnames=("direction", "chunk", "compute_dtype", "precision",
                                             "buckets"))
def token_similarity_multi(x: jax.Array, x_masks: Sequence[jax.Array], y: jax.Array,
                           y_masks: Sequence[jax.Array], *, direction: str = "both",
                           chunk: Chunk = None, compute_dtype: Any = None,
                           precision: Optional[lax.Precision] = None,
                           buckets: Buckets = 1,
                           x_weights: Optional[Sequence[Optional[jax.Array]]] = None,
                           y_weights: Optional[Sequence[Optional[jax.Array]]] = None
                           ) -> jax.Array:
  """`token_similarity` for several (x_mask, y_mask) pairs over the SAME tokens, sharing one
  cosine block per tile: one einsum, then one masked max/mean reduction per mask pair.

  Equal, value and gradient, to stacking `token_similarity(x, x_masks[m], y, y_masks[m],
  x_weight=x_weights[m], y_weight=y_weights[m])`. GRM scores all its levels with one call, in
  training and evaluation: ori and key are the same tokens under different masks/weights, and
  the unc level's region tokens are appended to the image tokens under a mask of their own
  (models/grm.py, `GRM._level_sims`).

  Args:
    x: `[Bx, Lx, D]`; x_masks: M masks `[Bx, Lx]`.
    y: `[By, Ly, D]`; y_masks: M masks `[By, Ly]`, paired with `x_masks`.
    direction, chunk, compute_dtype, precision, buckets: as in `token_similarity` (the buckets
      follow the union of the masks).
    x_weights, y_weights: None, or M entries each None or `[B, L]` float token weights (as
      `token_similarity`'s x_weight / y_weight), paired with the masks.

  Returns:
    `[M, Bx, By]` scores.
  """
  x_masks, y_masks = tuple(x_masks), tuple(y_masks)
  if not x_masks or len(x_masks) != len(y_masks):
    raise ValueError(f"need as many x masks as y masks (>= 1), got {len(x_masks)} and "
                     f"{len(y_masks)}")
  for xm, ym in zip(x_masks, y_masks):
    _check_inputs(x, xm, y, ym, direction)
  weights = []
  for name, ws, ms in (("x_weights", x_weights, x_masks), ("y_weights", y_weights, y_masks)):
    if ws is not None:
      ws = tuple(ws)
      if len(ws) != len(ms):
        raise ValueError(f"{name} needs one entry (None or [B, L]) per mask: {len(ms)} masks, "
                         f"{len(ws)} weights")
      for w, m in zip(ws, ms):
        if w is not None and w.shape != m.shape:
          raise ValueError(f"{name}: each weight must be shaped like its mask {m.shape}, "
                           f"got {w.shape}")
    weights.append(ws)
  return _all_pairs(x, x_masks, y, y_masks, direction=direction, chunk=chunk,
                    compute_dtype=compute_dtype, precision=precision, buckets=buckets,
                    x_weights=weights[0], y_weights=weights[1])


def _pack_and_sort(t, ms, valid):
  """Moves each item's valid tokens to the front and sorts the items by valid count.

  `ms`: pytree of `[B, L]` arrays (masks, weights) permuted alike.
  Returns (tokens, ms, perm): item i of the outputs is input item perm[i].
  """
  order = jnp.argsort(~valid, axis=1, stable=True)  # valid tokens first, in order
  t = jnp.take_along_axis(t, order[..., None], axis=1)
  perm = jnp.argsort(jnp.sum(valid, axis=1), stable=True)
  ms = jax.tree.map(lambda m: jnp.take_along_axis(m, order, axis=1)[perm], ms)
  return t[perm], ms, perm


def bucket_counts(buckets: Buckets, *, name: str = "buckets") -> Tuple[int, int]:
  """(bx, by) from an int or a pair; a ValueError naming `name` for anything but positive ints
  (bools included)."""
  pair = (buckets, buckets) if isinstance(buckets, int) else buckets
  if (not isinstance(pair, (tuple, list)) or len(pair) != 2
      or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in pair)):
    raise ValueError(f"{name} must be an int >= 1 or a pair (bx, by) of them, got {buckets!r}")
  return tuple(pair)


def _bucket_lengths(length: int, buckets: int) -> Tuple[int, ...]:
  return tuple(sorted({max(1, -(-length * k // buckets)) for k in range(1, buckets + 1)}))


def _bucketed_tile(tile, lx_opts, ly_opts):
  """`tile(xt, xms, yt, yms, xws, yws)` on tokens cut to the smallest static lengths that hold
  the tile's longest items (valid tokens packed first by `_pack_and_sort`)."""
  def cut(lx, ly):
    def f(xt, xms, yt, yms, xws, yws):
      cx, cy = (lambda m: m[:, :lx]), (lambda m: m[:, :ly])
      return tile(xt[:, :lx], jax.tree.map(cx, xms), yt[:, :ly], jax.tree.map(cy, yms),
                  jax.tree.map(cx, xws), jax.tree.map(cy, yws))
    return f
  branches = [cut(lx, ly) for lx in lx_opts for ly in ly_opts]

  def longest(ms):  # valid tokens of the tile's longest item, under any of the masks
    return jnp.max(jnp.sum(functools.reduce(jnp.logical_or, ms), axis=-1))

  def run(xt, xms, yt, yms, xws, yws):
    ix = jnp.searchsorted(jnp.asarray(lx_opts), longest(xms))
    iy = jnp.searchsorted(jnp.asarray(ly_opts), longest(yms))
    return lax.switch(ix * len(ly_opts) + iy, branches, xt, xms, yt, yms, xws, yws)
  return run


def _all_pairs(x, x_masks, y, y_masks, *, direction, chunk, compute_dtype, precision,
               buckets=1, x_weights=None, y_weights=None):
  """Shared body of the two kernels: mask tuples (and optional weight tuples, entries None or
  `[B, L]` float) in, `[M, Bx, By]` out."""
  x_masks = tuple(m.astype(bool) for m in x_masks)
  y_masks = tuple(m.astype(bool) for m in y_masks)
  # float32 unless the inputs are float64 (x64 mode, used by the gradient tests).
  base = jnp.result_type(x.dtype, y.dtype, jnp.float32)
  cdt = base if compute_dtype is None else jnp.dtype(compute_dtype)
  acc = jnp.promote_types(cdt, jnp.float32)
  as_acc = lambda ws, n: ((None,) * n if ws is None
                          else tuple(None if w is None else w.astype(acc) for w in ws))
  x_weights, y_weights = as_acc(x_weights, len(x_masks)), as_acc(y_weights, len(y_masks))
  # Normalise once (O(B L D)), outside the tile loop; tokens invalid under every mask are zeroed
  # so garbage in padding cannot matter even before the masks are applied. (A token valid under
  # one mask only is masked out of the other reductions, so sharing the tokens is exact.)
  x_any = functools.reduce(jnp.logical_or, x_masks)
  y_any = functools.reduce(jnp.logical_or, y_masks)
  xn = jnp.where(x_any[..., None], l2_normalize(x), 0.0).astype(cdt)
  yn = jnp.where(y_any[..., None], l2_normalize(y), 0.0).astype(cdt)
  bx, lx, d = x.shape
  by, ly, _ = y.shape
  bkx, bky = bucket_counts(buckets)
  cx, cy = _tile_sizes(chunk, bx, by)
  nx, ny = -(-bx // cx), -(-by // cy)
  tile = functools.partial(_tile_scores, direction=direction, precision=precision,
                           acc_dtype=acc)
  if bkx > 1:
    xn, (x_masks, x_weights), xperm = _pack_and_sort(xn, (x_masks, x_weights), x_any)
  if bky > 1:
    yn, (y_masks, y_weights), yperm = _pack_and_sort(yn, (y_masks, y_weights), y_any)
  if bkx > 1 or bky > 1:
    tile = _bucketed_tile(tile, _bucket_lengths(lx, bkx), _bucket_lengths(ly, bky))
  if nx == 1 and ny == 1:
    out = tile(xn, x_masks, yn, y_masks, x_weights, y_weights)
  else:
    xn, (xms, xws) = _pad_items(xn, (x_masks, x_weights), nx * cx)
    yn, (yms, yws) = _pad_items(yn, (y_masks, y_weights), ny * cy)
    xs = (xn.reshape(nx, cx, lx, d), jax.tree.map(lambda m: m.reshape(nx, cx, lx), (xms, xws)))
    ys = (yn.reshape(ny, cy, ly, d), jax.tree.map(lambda m: m.reshape(ny, cy, ly), (yms, yws)))
    # Rematerialise each tile in the backward pass: otherwise scan saves every tile's cosine
    # block as a residual and the backward needs the full [Bx, By, Lx, Ly] after all.
    ctile = jax.checkpoint(tile)

    def row(xb):
      return lax.map(lambda yb: ctile(xb[0], xb[1][0], yb[0], yb[1][0], xb[1][1], yb[1][1]),
                     ys)  # [ny, M, cx, cy]

    out = lax.map(row, xs)  # [nx, ny, M, cx, cy]
    m = len(x_masks)
    out = out.transpose(2, 0, 3, 1, 4).reshape(m, nx * cx, ny * cy)[:, :bx, :by]
  if bkx > 1:  # back to the callers' item order
    out = out[:, jnp.argsort(xperm)]
  if bky > 1:
    out = out[:, :, jnp.argsort(yperm)]
  return out


AxisName = Optional[Union[str, Sequence[str]]]


def _axis_size(mesh: Mesh, axis: AxisName) -> int:
  if axis is None:
    return 1
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  size = 1
  for n in names:
    if n not in mesh.shape:
      raise ValueError(f"mesh has no axis {n!r}; axes are {tuple(mesh.shape)}")
    size *= mesh.shape[n]
  return size


@functools.lru_cache(maxsize=64)
def make_sharded_similarity(mesh: Mesh, x_axis: AxisName, y_axis: AxisName, *,
                            direction: str = "both", chunk: Chunk = None,
                            compute_dtype: Any = None,
                            precision: Optional[lax.Precision] = None):
  """Builds (once per argument set) a jitted, sharded version of `token_similarity`.

  Args:
    mesh: the device mesh.
    x_axis: mesh axis (or tuple of axes) splitting the x items; None = replicated.
    y_axis: mesh axis (or tuple) splitting the y items; None = replicated. Must not share an
      axis with `x_axis`.
    direction, chunk, compute_dtype, precision: as in `token_similarity` (chunk applies to each
      device's local block).

  Returns:
    `f(x [Bx,Lx,D], x_mask [Bx,Lx], y [By,Ly,D], y_mask [By,Ly]) -> [Bx, By]` whose output has
    sharding `NamedSharding(mesh, P(x_axis, y_axis))`. Bx must be a multiple of the size of
    `x_axis` and By of `y_axis`.
  """
  xs = set() if x_axis is None else ({x_axis} if isinstance(x_axis, str) else set(x_axis))
  ys = set() if y_axis is None else ({y_axis} if isinstance(y_axis, str) else set(y_axis))
  if xs & ys:
    raise ValueError(f"x_axis {x_axis!r} and y_axis {y_axis!r} share mesh axes {xs & ys}")
  kernel = functools.partial(token_similarity, direction=direction, chunk=chunk,
                             compute_dtype=compute_dtype, precision=precision)
  px, py = P(x_axis), P(y_axis)
  mapped = jax.shard_map(kernel, mesh=mesh, in_specs=(px, px, py, py),
                         out_specs=P(x_axis, y_axis))
  nx, ny = _axis_size(mesh, x_axis), _axis_size(mesh, y_axis)
  jitted = jax.jit(mapped,
                   in_shardings=tuple(NamedSharding(mesh, p) for p in (px, px, py, py)),
                   out_shardings=NamedSharding(mesh, P(x_axis, y_axis)))

  def f(x, x_mask, y, y_mask):
    if x.shape[0] % nx or y.shape[0] % ny:
      raise ValueError(f"batch sizes must divide the mesh axes: Bx={x.shape[0]} over "
                       f"{x_axis!r} (size {nx}), By={y.shape[0]} over {y_axis!r} (size {ny}); "
                       "pad the item axis with empty items (mask all False) and slice")
    return jitted(x, x_mask, y, y_mask)

  return f


def sharded_token_similarity(mesh: Mesh, x_axis: AxisName, y_axis: AxisName,
                             x: jax.Array, x_mask: jax.Array, y: jax.Array, y_mask: jax.Array,
                             **kwargs) -> jax.Array:
  """`token_similarity` with x split over `x_axis` and y over `y_axis`; see
  `make_sharded_similarity`. Returns `[Bx, By]` sharded `P(x_axis, y_axis)`."""
  if isinstance(x_axis, list):
    x_axis = tuple(x_axis)
  if isinstance(y_axis, list):
    y_axis = tuple(y_axis)
  return make_sharded_similarity(mesh, x_axis, y_axis, **kwargs)(x, x_mask, y, y_mask)
