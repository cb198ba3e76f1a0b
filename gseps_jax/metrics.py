"""Image-text retrieval metrics (Recall@K, median / mean rank, rSum) computed on device.

Score matrix convention (the whole project): `sims` is `[n_images, n_captions]`, row = image,
column = caption, higher = more similar; caption `j` belongs to image `j // captions_per_image`
(Flickr30K / COCO Karpathy splits store 5 consecutive captions per image).

Rank definitions (0-based rank r; Recall@K counts r < K; reported med/mean rank are r + 1, as in
the VSE++ / SCAN / GRM / SEPS evaluation code):
- i2t: an image query is found at the rank of its *best-ranked* own caption.
- t2i: a caption query is found at the rank of its image.

Ties (pessimistic, the default): a wrong item whose score *equals* the target score counts as
ranked above it. The official VSE code ranks with `np.argsort(d)[::-1]`, whose order among equal
scores is an accident of the sort algorithm (quicksort, not stable), so its numbers under ties are
not reproducible across NumPy versions; pessimistic ties give a well-defined lower bound and agree
with argsort whenever scores are distinct, which is the case for real float scores in practice.
A model that outputs constant scores therefore gets chance-or-worse recall instead of a lucky
100%. `ties="optimistic"` (ties counted below the target) is available for an upper bound.

How ranks are computed: without any sort, `rank = #(wrong scores > target)` (+ `#(wrong == target)`
when pessimistic). That is O(n_images * n_captions) elementwise work plus row/column reductions,
jitted, so XLA partitions it over whatever sharding `sims` carries. Only the two rank vectors
(`[n_images]` and `[n_captions]` int32, replicated) and one NaN count leave the device; the
`[n_images, n_captions]` matrix is never gathered onto one device or host. Recall / median / mean
are then computed from the rank vectors in NumPy (exact, float64).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

RECALL_KS = (1, 5, 10)
TIES = ("pessimistic", "optimistic")
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
               "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum")


def _ranks(sims, *, captions_per_image, pessimistic):
  """0-based ranks of the ground truth, no sort.

  Args:
    sims: `[Ni, Nc]` scores, `Nc == Ni * captions_per_image`.
    captions_per_image: captions per image (static).
    pessimistic: count wrong items tied with the target as ranked above it (static).

  Returns:
    (i2t `[Ni]` int32, t2i `[Nc]` int32, number of NaN scores () int32).
  """
  ni, nc = sims.shape
  # Ownership from iotas rather than a materialised [Ni, Nc] constant: XLA fuses it into the
  # comparisons and partitions it like `sims`.
  row = jax.lax.broadcasted_iota(jnp.int32, (ni, nc), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (ni, nc), 1)
  own = (col // captions_per_image) == row
  neg_inf = jnp.array(-jnp.inf, sims.dtype)
  masked_own = jnp.where(own, sims, neg_inf)
  # i2t target: the best own caption score of each image; t2i target: each column has exactly
  # one own entry (its image), so a column max picks it out.
  i2t_target = masked_own.max(axis=1)  # [Ni]
  t2i_target = masked_own.max(axis=0)  # [Nc]
  beats = jnp.greater_equal if pessimistic else jnp.greater
  wrong = ~own
  i2t = jnp.sum(wrong & beats(sims, i2t_target[:, None]), axis=1, dtype=jnp.int32)
  t2i = jnp.sum(wrong & beats(sims, t2i_target[None, :]), axis=0, dtype=jnp.int32)
  nans = jnp.sum(jnp.isnan(sims), dtype=jnp.int32)
  return i2t, t2i, nans


@functools.lru_cache(maxsize=None)
def _ranks_fn(captions_per_image, pessimistic, out_sharding):
  """Jitted `_ranks`, cached per static configuration (and per mesh for sharded inputs)."""
  fn = functools.partial(_ranks, captions_per_image=captions_per_image, pessimistic=pessimistic)
  if out_sharding is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=(out_sharding,) * 3)


def _check_inputs(shape, captions_per_image, ties):
  if len(shape) != 2:
    raise ValueError(f"sims must be [n_images, n_captions], got shape {tuple(shape)}")
  if not isinstance(captions_per_image, (int, np.integer)) or captions_per_image < 1:
    raise ValueError(f"captions_per_image must be a positive int, got {captions_per_image!r}")
  ni, nc = shape
  if ni == 0 or nc != ni * captions_per_image:
    raise ValueError(
        f"sims has shape {tuple(shape)}, but with captions_per_image={captions_per_image} it must "
        f"be [n_images, n_images * {captions_per_image}] with n_images > 0")
  if ties not in TIES:
    raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def retrieval_ranks(sims, captions_per_image=5, *, ties="pessimistic"):
  """Ground-truth ranks for both directions, computed on device.

  Args:
    sims: `[Ni, Nc]` scores: NumPy array, or a `jax.Array` on any sharding (single-device,
      `NamedSharding` over a mesh, multi-host). Floating dtype.
    captions_per_image: captions per image; caption j belongs to image j // captions_per_image.
    ties: "pessimistic" (default) or "optimistic"; see the module docstring.

  Returns:
    (i2t_ranks `[Ni]`, t2i_ranks `[Nc]`) as host NumPy int64, 0-based. These two vectors are the
    only data gathered to the host: for a `NamedSharding` input they are computed replicated on
    the input's mesh, so every process holds them in full (no cross-host gather of `sims`).

  Raises:
    ValueError: bad shape / arguments, non-float scores, or NaN scores (a NaN compares false with
      everything and would silently rank as a perfect hit).
  """
  shape = getattr(sims, "shape", None)
  if shape is None:
    sims = np.asarray(sims)
    shape = sims.shape
  _check_inputs(shape, captions_per_image, ties)
  if not jnp.issubdtype(sims.dtype, jnp.floating):
    raise ValueError(f"sims must be a floating array, got dtype {sims.dtype}")
  out_sharding = None
  if not isinstance(sims, jax.Array):
    sims = jnp.asarray(sims)
  elif len(sims.sharding.device_set) > 1:
    # Replicate the (small) outputs over the devices holding `sims`, so that every process can
    # read them locally; a slice of a NamedSharding array may come back with another sharding
    # type, hence the fallback 1-D mesh over the same devices.
    if isinstance(sims.sharding, NamedSharding):
      mesh = sims.sharding.mesh
    else:
      mesh = Mesh(np.array(sorted(sims.sharding.device_set, key=lambda d: d.id)), ("devices",))
    out_sharding = NamedSharding(mesh, P())
  fn = _ranks_fn(int(captions_per_image), ties == "pessimistic", out_sharding)
  i2t, t2i, nans = fn(sims)
  # Replicated outputs: np.asarray reads the local copy, also on multi-host arrays.
  nans = int(np.asarray(nans))
  if nans:
    raise ValueError(f"sims contains {nans} NaN scores; retrieval metrics would be meaningless")
  return np.asarray(i2t).astype(np.int64), np.asarray(t2i).astype(np.int64)


def metrics_from_ranks(i2t_ranks, t2i_ranks):
  """Recall@{1,5,10} (percent), median / mean rank (1-based) and rSum from 0-based ranks.

  Args:
    i2t_ranks: `[Ni]` 0-based rank of each image query's best own caption.
    t2i_ranks: `[Nc]` 0-based rank of each caption query's image.

  Returns:
    dict with `METRIC_KEYS` as Python floats. medr = floor(median(rank)) + 1, meanr =
    mean(rank) + 1, exactly as the VSE++ evaluation code.
  """
  out = {}
  for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 1 or ranks.size == 0:
      raise ValueError(f"{name} ranks must be a non-empty vector, got shape {ranks.shape}")
    for k in RECALL_KS:
      out[f"{name}_r{k}"] = float(100.0 * np.mean(ranks < k))
    out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
    out[f"{name}_meanr"] = float(ranks.mean() + 1)
  out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS))
  return {k: out[k] for k in METRIC_KEYS}


def retrieval_metrics(sims, captions_per_image=5, *, ties="pessimistic"):
  """Standard bidirectional retrieval metrics of a score matrix.

  Args:
    sims: `[Ni, Ni * captions_per_image]` scores (NumPy or `jax.Array`, possibly sharded across
      devices and hosts; see `retrieval_ranks` for what is gathered).
    captions_per_image: captions per image (5 for Flickr30K / COCO).
    ties: "pessimistic" (default) or "optimistic".

  Returns:
    dict: i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr, t2i_r1, t2i_r5, t2i_r10, t2i_medr,
    t2i_meanr (recalls in percent), rsum (sum of the six recalls, max 600).
  """
  return metrics_from_ranks(*retrieval_ranks(sims, captions_per_image, ties=ties))


def coco_fold_metrics(sims, captions_per_image=5, *, fold_size=1000, ties="pessimistic"):
  """Metrics of each fold of `fold_size` consecutive images (the diagonal blocks of `sims`).

  Fold f uses images `[f * fold_size, (f + 1) * fold_size)` and their captions only; off-fold
  scores are ignored. Slicing a sharded `jax.Array` keeps the computation on device.

  Args:
    sims: `[Ni, Ni * captions_per_image]` scores, `Ni` a multiple of `fold_size`.
    captions_per_image: captions per image.
    fold_size: images per fold.
    ties: as in `retrieval_metrics`.

  Returns:
    list (one per fold) of `retrieval_metrics` dicts.
  """
  shape = getattr(sims, "shape", None)
  if shape is None:
    sims = np.asarray(sims)
    shape = sims.shape
  _check_inputs(shape, captions_per_image, ties)
  ni = shape[0]
  if fold_size < 1 or ni % fold_size:
    raise ValueError(f"n_images={ni} is not a positive multiple of fold_size={fold_size}")
  cs = fold_size * captions_per_image
  return [
      retrieval_metrics(sims[f * fold_size:(f + 1) * fold_size, f * cs:(f + 1) * cs],
                        captions_per_image, ties=ties)
      for f in range(ni // fold_size)
  ]


def coco_1k_folds(sims, captions_per_image=5, *, fold_size=1000, ties="pessimistic"):
  """COCO "1K test" protocol: metrics averaged over folds of `fold_size` consecutive images.

  Each metric (recalls, medr, meanr) is the mean over the folds of `coco_fold_metrics`; rsum is the
  sum of the six averaged recalls (equal to the mean of the fold rsums). For the standard 5K COCO
  test set: 5 folds of 1,000 images / 5,000 captions.

  Returns:
    dict with `METRIC_KEYS` (Python floats), like `retrieval_metrics`.
  """
  folds = coco_fold_metrics(sims, captions_per_image, fold_size=fold_size, ties=ties)
  out = {k: float(np.mean([m[k] for m in folds])) for k in METRIC_KEYS if k != "rsum"}
  out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS))
  return {k: out[k] for k in METRIC_KEYS}
