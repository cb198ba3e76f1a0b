"""SDTPS + HRPA as pure functions: SEPS's token selection and alignment over all pairs, tiled.

Reimplements the cross-modal head of the SEPS authors' PyTorch code (`CrossSparseAggrNet_v2`,
github.com/maxingan2412/seps @ 7f4dfa6); the Linen modules around it are in `models/seps.py`.

Per image-caption pair and per branch (sparse caption / dense caption), on the raw projected
tokens:
  1. Image tokens `[CLS?, X]`: a CLS exists iff the token count is not a perfect square.
  2. score_n = cos(x_n, mean_n x) + cos(x_n, mean of the guiding text's tokens).
  3. Keep the top K = ceil(N * rho) patches (ties: lower index first).
  4. Dropped patches -> one fused token (softmax of their scores, weighted sum).
  5. Kept patches -> N_c tokens: W = softmax over kept of scale * MLP(x) (MLP = LayerNorm(eps
     1e-5) -> Linear(D, int(0.2 D)) -> GELU(erf) -> Linear(N_c)), aggregated = W^T x_kept.
  6. Tokens [CLS?, aggregated, fused] are L2-normalised, then
     HRPA = mean_words max_tokens A + mean_tokens max_words A, A = LeakyReLU_0.1(words . tokens^T).
The pair score is the SUM of the branches.

All pairs are scored in tiles of the pair grid (`lax.map` over image tiles, then caption tiles),
so memory is O(tile). Everything that depends on one side only is computed once: per image the
patch norms, the image mean, and the aggregation net's per-patch logits (every layer of that net
acts per token, so logits of the kept patches are a gather of per-image logits); per text the
normalised mean and normalised words. Per pair only the selection, the masked softmaxes, the
weighted sums and HRPA remain. Inside a tile the per-pair branches run one image at a time
(`lax.map`), so that the aggregation is one plain GEMM per image and HRPA a caption-batched one,
and the final tokens are never normalised or concatenated in memory: the word dots are scaled by
the inverse token norms instead (`_image_pair_sims`). Per-image caches come from
`SEPSHead.prepare_images` (models/seps.py), per-text caches from `prepare_texts`.

Dense captions (`dense_mode`):
  * "parity": the official behaviour. The dense text is a second query paired with the caption:
    caption j's dense text is the one of its ground-truth image (training: the same batch row;
    evaluation: `caption_image[j]`). Dense branch(I, j) = SDTPS(I guided by dense_j) aligned with
    dense_j's words. At evaluation all text FEATURES are cut to `eval_text_cut` positions (the
    official `encode_data` stores 90 positions of the full-length encoding, and the head slices
    `embs[i, :length]`, which stops at 90): the text mean and HRPA cover the first 90 features,
    dense captions lose [SEP], and those 90 features have seen the whole caption.
  * "honest" (the default): the dense text describes the CANDIDATE image. Dense branch(I, j) =
    SDTPS(I guided by dense_I) aligned with the QUERY caption j's words. Nothing about the
    query's answer leaks. Honest mode uses every feature of the full-length encoding (no cut):
    the cut is an artefact of the official evaluation's storage, not part of the method, and the
    dense caption only enters through its mean, so cutting would only throw information away.
  In both modes dense captions are tokenised at full length (`config.data.dense_max_len = 0`:
  the longest dense caption of the data, at most 512; see gseps_jax/data/pipeline.py), in
  training and evaluation, as the official code (which pads each batch to its longest caption).

Selection gradients (`selection`):
  * "official": as the official code, the selection scores, the top-k, the gathered patches, the
    aggregation net's input and the fused token carry no gradient (`stop_gradient` on the patch
    tokens and the text means used for selection). Only the CLS token (ViT) and the text words in
    HRPA reach the encoders; the aggregation net's parameters do get gradients.
  * "straight_through": same forward values. Backward: (a) no stop_gradient anywhere, so patch
    tokens get gradients through the aggregated and fused tokens, the aggregation net's input,
    and the selection scores inside the fused-token softmax; (b) the hard keep mask m is replaced
    in the backward pass by a soft mask s_n = sigmoid((score_n - theta) / st_temperature), theta =
    midpoint of the K-th and (K+1)-th scores (m + s - stop_gradient(s)); the mask enters the
    softmaxes as weights (softmax over kept == m * exp / sum m * exp), so the selection scores,
    and through them the patches and the guiding text, receive a gradient from which patches were
    kept. In the mask's backward pass a dropped patch's exp(logit) is clipped at the largest kept
    one, so the surrogate stays finite.
"""

import functools
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from gseps_jax.models import similarity

DENSE_MODES = ("parity", "honest")
SELECTIONS = ("official", "straight_through")
NORM_EPS = 1e-12  # torch.nn.functional.normalize default
LEAKY_SLOPE = 0.1
PRECISIONS = {"highest": lax.Precision.HIGHEST, "high": lax.Precision.HIGH,
               "default": lax.Precision.DEFAULT}

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Small helpers shared by the head, the model, explain and the tests.
# ----------------------------------------------------------------------------------------------
def has_cls(num_tokens: int) -> bool:
  """Official rule: an image token set has a leading CLS iff its length is not a perfect square."""
  return math.isqrt(num_tokens) ** 2 != num_tokens


def num_kept(num_patches: int, rho: float) -> int:
  """K = ceil(N * rho), with the official float expression."""
  return math.ceil(num_patches * rho)


def num_aggregated(num_patches: int, alpha: float, rho: float) -> int:
  """N_c = int(num_patches * alpha * rho) (official order of the float products)."""
  return int(num_patches * alpha * rho)


def ratio_loss(k: int, n: int, rho: float, num_branches: int, weight: float) -> float:
  """Official ratio term weight * (mean(sum of branch keep masks) - rho)^2 = weight*(b K/N - rho)^2.

  The keep masks are a hard top-k, so this is a constant with no gradient; it is reported, not
  trained on.
  """
  return float(weight) * (num_branches * k / n - rho) ** 2


def l2_normalize(x: Array) -> Array:
  """x / max(||x||, eps) over the last axis (torch F.normalize, eps = NORM_EPS), with a finite
  gradient at 0: `similarity.l2_normalize` in its clamped form."""
  return similarity.l2_normalize(x, NORM_EPS, clamp=True)


def _masked_softmax(logits: Array, keep: Array, hard: Array, axis: int) -> Array:
  """Softmax of `logits` over `axis` restricted to `hard` entries, written as keep*exp / sum.

  `keep` equals `hard` in value (it may carry a straight-through gradient). At least one entry
  along `axis` must be kept. Dropped entries get exactly 0.
  """
  mx = lax.stop_gradient(jnp.max(jnp.where(hard, logits, -jnp.inf), axis=axis, keepdims=True))
  z = logits - mx
  # Dropped entries only matter for keep's (straight-through) gradient: clip them at the kept max
  # so that exp cannot overflow.
  e = keep * jnp.exp(jnp.where(hard, z, jnp.minimum(z, 0.0)))
  return e / jnp.sum(e, axis=axis, keepdims=True)


def masked_mean(tokens: Array, mask: Array) -> Array:
  """[..., L, D], [..., L] -> [..., D] mean over valid positions (0 for an empty mask)."""
  m = mask.astype(tokens.dtype)
  return jnp.einsum("...ld,...l->...d", tokens, m) / jnp.maximum(m.sum(-1), 1.0)[..., None]


def parity_text_cut(tokens: Array, mask: Array, cut: int) -> tuple[Array, Array]:
  """The official evaluation's text storage: the first `cut` positions of the token features
  `[N, L, D]` and of the mask `[N, L]` (a text longer than `cut` loses its tail, [SEP]
  included; the features kept were computed from the whole text)."""
  cut = min(int(cut), tokens.shape[1])
  return tokens[:, :cut], mask[:, :cut]


def prepare_texts(tokens: Array, mask: Array) -> dict:
  """Per-text quantities that do not depend on the image.

  Args:
    tokens: [Nt, L, D] raw projected text tokens.
    mask: [Nt, L] bool, valid positions ([CLS] and [SEP] included).
  Returns:
    dict(glo=[Nt, D] normalised mean of the valid tokens (the selection guide),
         words=[Nt, L, D] normalised tokens, mask=[Nt, L] bool).
  """
  tokens = tokens.astype(jnp.float32)
  mask = mask.astype(bool)
  return dict(glo=l2_normalize(masked_mean(tokens, mask)), words=l2_normalize(tokens), mask=mask)


def hrpa_from_sims(sims: Array, mask: Array) -> Array:
  """HRPA from raw cosine similarities.

  Args:
    sims: [..., L, T] word . image-token cosines.
    mask: [..., L] bool valid words (broadcastable against sims[..., 0]).
  Returns:
    [...] mean over words of max over tokens + mean over tokens of max over words (a SUM).
  """
  a = jax.nn.leaky_relu(sims, LEAKY_SLOPE)
  m = jnp.broadcast_to(mask, a.shape[:-1])
  row = jnp.max(a, axis=-1)
  t2i = jnp.sum(jnp.where(m, row, 0.0), -1) / jnp.maximum(m.sum(-1), 1)
  # A large finite fill keeps padded (all-invalid) texts finite; they are sliced off anyway.
  col = jnp.max(jnp.where(m[..., None], a, -1e30), axis=-2)
  return t2i + jnp.mean(col, axis=-1)


# ----------------------------------------------------------------------------------------------
# SDTPS for a tile of pairs.
# ----------------------------------------------------------------------------------------------
def _index_mask(idx: Array, n: int) -> Array:
  """`[..., k]` indices into N positions -> `[..., N]` bool, True at the indexed positions.

  A scatter of k values per row, not a `[..., k, N]` comparison block (on CPU that block cost
  ~4% of SEPS scoring: 98 x 196 compares per pair)."""
  flat = idx.reshape(-1, idx.shape[-1])
  rows = jnp.arange(flat.shape[0])[:, None]
  mask = jnp.zeros((flat.shape[0], n), bool).at[rows, flat].set(True)
  return mask.reshape(idx.shape[:-1] + (n,))


def topk_keep(score: Array, k: int) -> Array:
  """`[..., N]` selection scores -> `[..., N]` bool mask of the k highest (ties: lower index
  first, as `lax.top_k`). The hard selection of `_selection_weights`, for tools (explain)."""
  _, idx = lax.top_k(lax.stop_gradient(score), k)
  return _index_mask(idx, score.shape[-1])


def _selection_weights(self_attn: Array, logits_t: Array, text_cos: Array, *, k: int,
                       selection: str, st_temperature: float) -> tuple[Array, Optional[Array]]:
  """SDTPS selection as weights on the patches, for (image, guide text) pairs.

  Args:
    self_attn: [..., N] cos(x_n, mean x) per image.
    logits_t: [..., N_c, N] aggregation logits per image (patch axis last).
    text_cos: [..., Tg, N] cos(x_n, guide-text mean) for Tg guide texts per image.
    k: number of kept patches (1 <= k <= N).
  Returns:
    (w [..., Tg, N_c, N]: row c is the softmax of the logits over the kept patches, exactly 0 on
     dropped ones; f [..., Tg, N]: fused-token weights, softmax of the scores over the dropped
     patches, 0 on kept ones; None when nothing is dropped, where the official softmax over an
     empty set sums to a zero token). Aggregated token c = sum_n w[c, n] x_n, fused = sum_n f[n]
     x_n.
  """
  score = self_attn[..., None, :] + text_cos
  n = score.shape[-1]
  straight = selection == "straight_through"
  top_v, top_i = lax.top_k(lax.stop_gradient(score), min(k + 1, n) if straight else k)
  hard = _index_mask(top_i[..., :k], n)  # [..., Tg, N]
  keep = hard.astype(score.dtype)
  if straight and k < n:
    theta = 0.5 * (top_v[..., k - 1] + top_v[..., k])
    soft = jax.nn.sigmoid((score - theta[..., None]) / st_temperature)
    keep = keep + (soft - lax.stop_gradient(soft))
  w = _masked_softmax(logits_t[..., None, :, :], keep[..., None, :], hard[..., None, :], axis=-1)
  f = _masked_softmax(score, 1.0 - keep, ~hard, axis=-1) if k < n else None
  return w, f


def sdtps_tokens(img: dict, text_cos: Array, *, k: int, selection: str, st_temperature: float,
                 precision=lax.Precision.HIGHEST) -> Array:
  """Selected + aggregated + fused image tokens for a tile of (image, guide text) pairs.

  The all-pairs scorer uses this only where the selection is per image (honest dense branch);
  per-pair branches go through `_image_pair_sims`, one image at a time.

  Args:
    img: per-image cache for Ti images (see `SEPSHead.prepare_images`): cls [Ti, C, D] (C in
      {0, 1}), x [Ti, N, D], self_attn [Ti, N], logits [Ti, N, N_c].
    text_cos: [Ti, Tg, N] cos(x_n, guide-text mean) for Tg guide texts per image.
    k: number of kept patches (1 <= k <= N).
  Returns:
    [Ti, Tg, C + N_c + 1, D] L2-normalised tokens [CLS?, aggregated, fused].
  """
  w, f = _selection_weights(img["self_attn"], jnp.swapaxes(img["logits"], -1, -2), text_cos,
                            k=k, selection=selection, st_temperature=st_temperature)
  agg = jnp.einsum("ijcn,ind->ijcd", w, img["x"], precision=precision)
  ti, tg = text_cos.shape[:2]
  d = img["x"].shape[-1]
  if f is not None:
    fused = jnp.einsum("ijn,ind->ijd", f, img["x"], precision=precision)[:, :, None]
  else:
    fused = jnp.zeros((ti, tg, 1, d), agg.dtype)
  cls = jnp.broadcast_to(img["cls"][:, None], (ti, tg) + img["cls"].shape[1:])
  return l2_normalize(jnp.concatenate([cls, agg, fused], axis=2))


def _word_token_cosines(words: Array, tok: Array, precision) -> Array:
  """`words [..., L, D]` (normalised) . `tok [..., T, D]` (unnormalised) -> `[..., L, T]`
  cosines: the raw dots scaled by 1 / max(||token||, eps), as the official L2-normalised tokens
  (torch F.normalize), without a normalised copy of the tokens."""
  raw = jnp.einsum("...ld,...td->...lt", words, tok, precision=precision)
  nsq = jnp.sum(jnp.square(tok), axis=-1)
  return raw * lax.rsqrt(jnp.maximum(nsq, NORM_EPS * NORM_EPS))[..., None, :]


# `_gathered_sims`: captions per iteration of its loop when scoring without gradients (the
# evaluator, `SEPS.score`). The per-iteration work of one caption (~5 MFLOP of small GEMMs) is
# near the loop's own per-iteration cost on CPU: 4 per iteration measured ~8% faster at 1 thread
# and ~15% at 2. Under autodiff (training) batching made the step ~20% slower, so training
# keeps 1 (docs/performance.md, session 29).
EVAL_GATHER_BATCH = 4


def _gathered_sims(im: dict, text_cos: Array, words: Array, *, k: int, precision,
                   batch: int = 1) -> Array:
  """`_image_pair_sims` without the CLS columns, contracting over the K kept patches only
  ("official" selection: the same values as the masked softmax over all N patches, up to
  summation order).

  Per caption, inside one loop: gather the K kept patch rows, aggregate them (N_c * K * D
  multiply-adds instead of N_c * N * D, about half at rho = 0.5) and dot the caption's words with
  the pair's tokens, so the gathered `[K, D]` block and the `[N_c + 1, D]` tokens stay in cache.
  The fused tokens are one plain GEMM over all patches for the tile (their weights are 0 on the
  kept ones). `batch`: captions per loop iteration (`EVAL_GATHER_BATCH` for scoring). Returns
  `[Tc, L, N_c + 1]`.
  """
  score = im["self_attn"][None, :] + text_cos  # [Tc, N]
  n = score.shape[-1]
  _, idx = lax.top_k(lax.stop_gradient(score), k)  # [Tc, K]
  # Softmax over the kept patches of each aggregation logit: all K are kept, no mask needed.
  w = jax.nn.softmax(jnp.take(im["logits"], idx, axis=0), axis=1)  # [Tc, K, N_c]
  if k < n:
    hard = _index_mask(idx, n)
    f = _masked_softmax(score, (~hard).astype(score.dtype), ~hard, axis=-1)
    fused = jnp.einsum("jn,nd->jd", f, im["x"], precision=precision)  # [Tc, D]
  else:  # zero fused token -> zero similarities, as the official normalised zero token
    fused = jnp.zeros((score.shape[0], im["x"].shape[-1]), im["x"].dtype)

  def one(args):
    i, wj, fj, words_j = args
    agg = jnp.einsum("kc,kd->cd", wj, jnp.take(im["x"], i, axis=0), precision=precision)
    tok = jnp.concatenate([agg, fj[None]], axis=0)  # [N_c + 1, D] unnormalised
    return _word_token_cosines(words_j, tok, precision)

  return lax.map(one, (idx, w, fused, words), batch_size=batch if batch > 1 else None)


GATHER_KEPT = ("auto", "on", "off")


def gather_kept_default(setting: str, selection: str) -> bool:
  """Whether the per-pair branches contract over the K kept patches only (`_gathered_sims`).

  `setting` ("auto" | "on" | "off"): "auto" is on where it was measured faster (CPU: the
  aggregation GEMM 1.67x faster at N = 196, K = 98, D = 512; docs/performance.md) and off on
  GPU/TPU, where the all-patch contraction is one large well-shaped matmul and a per-pair loop of
  small gathered ones is not measured to pay. Only the "official" selection can gather: the
  straight-through backward pass needs every patch's soft mask, so "on" with it is an error.
  """
  if setting not in GATHER_KEPT:
    raise ValueError(f"gather_kept must be one of {GATHER_KEPT}, got {setting!r}.")
  if setting == "on" and selection != "official":
    raise ValueError("gather_kept='on' needs selection='official' (the straight-through "
                     "backward pass needs every patch); use 'auto' or 'off'.")
  if setting == "auto":
    return selection == "official" and jax.default_backend() == "cpu"
  return setting == "on"


def _image_pair_sims(im: dict, text_cos: Array, words: Array, *, k: int, selection: str,
                     st_temperature: float, precision=lax.Precision.HIGHEST,
                     gather: bool = False, gather_batch: int = 1) -> Array:
  """Word . token cosines of ONE image against a tile of captions (per-pair selection).

  Every final token but the CLS is a combination of patches: aggregated c = sum_n w[c, n] x_n,
  fused = sum_n f[n] x_n. The official tokens are L2-normalised (x / max(||x||, eps)) before the
  dot with the words; here the raw dots are scaled by 1 / max(||token||, eps) instead, so no
  normalised or concatenated [Tc, T, D] copy is made. Working on one image keeps every
  contraction a plain GEMM or a caption-batched one in its natural layout (batching the
  aggregation over images and HRPA over captions forced a transpose of the whole token block).
  Cost per pair: T'*N*D (one [Tc*T', N] x [N, D] GEMM for the image) + T'*L*D multiply-adds,
  T' = N_c + 1. (Scoring through P = X words^T and the Gram matrix X X^T instead, which never
  builds a [*, D] block, costs N*L*D + T'*N*L + T'*N^2 and measured 1.3-1.7x slower on CPU; see
  docs/performance.md.)

  Args:
    im: one image: x [N, D], xn [N, D], cls_n [C, D] normalised CLS, self_attn [N],
      logits_t [N_c, N].
    text_cos: [Tc, N] cos(x_n, guide-text mean), guide j aligned with words j.
    words: [Tc, L, D] normalised words.
    gather: contract over the kept patches only (`_gathered_sims`; "official" selection).
    gather_batch: captions per iteration of the gathered loop (`_gathered_sims`'s `batch`).
  Returns:
    [Tc, L, C + N_c + 1] cosines word . normalised token, tokens [CLS?, aggregated, fused].
  """
  if gather:
    if selection != "official":
      raise ValueError("gather=True needs the 'official' selection (see gather_kept_default).")
    sims = _gathered_sims(im, text_cos, words, k=k, precision=precision, batch=gather_batch)
  else:
    w, f = _selection_weights(im["self_attn"], im["logits_t"], text_cos, k=k,
                              selection=selection, st_temperature=st_temperature)
    if f is not None:
      a = jnp.concatenate([w, f[:, None, :]], axis=1)  # [Tc, N_c + 1, N]
    else:  # zero fused token -> zero similarities, as the official normalised zero token
      a = jnp.pad(w, [(0, 0), (0, 1), (0, 0)])
    tok = jnp.einsum("jtn,nd->jtd", a, im["x"], precision=precision)  # unnormalised
    sims = _word_token_cosines(words, tok, precision)
  if im["cls_n"].shape[0] == 0:
    return sims
  cls_sims = jnp.einsum("jld,cd->jlc", words, im["cls_n"], precision=precision)
  return jnp.concatenate([cls_sims, sims], axis=-1)


def _tile(tree, size: int):
  """Pads every leaf's leading axis to a multiple of `size` and splits it: [n, ...] ->
  [ceil(n/size), size, ...]."""
  def one(a):
    n = a.shape[0]
    pad = (-n) % size
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((a.shape[0] // size, size) + a.shape[1:])
  return jax.tree_util.tree_map(one, tree)


def pair_scores(img: dict, cap: dict, dense: Optional[dict] = None, *, k: int,
                use_sparse: bool = True, use_dense: bool = True, dense_mode: str = "honest",
                selection: str = "official", st_temperature: float = 0.05,
                chunk: Union[None, int, Sequence[int]] = None,
                precision=lax.Precision.HIGHEST,
                dense_index: Optional[Array] = None,
                gather_kept: str = "auto", gather_batch: int = 1) -> Array:
  """All-pairs SEPS scores, tiled over the pair grid.

  Args:
    img: per-image cache, leaves with leading axis Ni (`SEPSHead.prepare_images`).
    cap: caption cache from `prepare_texts`, leading axis Nc.
    dense: dense-caption cache from `prepare_texts`; leading axis Nc (caption-aligned) in
      "parity" mode, Ni (image-aligned) in "honest" mode. Unused if `use_dense` is False.
    k: kept patches per selection.
    chunk: pair tile (images, captions); an int is used for both; None = one tile.
    dense_index: "parity" mode only: [Nc] int, caption j's row of `dense`, which then holds only
      the Nd distinct dense captions. The parity dense branch of (image, caption j) depends on
      the dense caption alone, so it is scored once per distinct dense caption ([Ni, Nd]) and
      gathered; the official evaluation repeats each image's dense caption for its 5 captions,
      which is 5x the dense work for the same scores.
    gather_kept: "on": per-pair branches contract over the K kept patches only; "off": over all
      N with a masked softmax; "auto": see `gather_kept_default`. Same scores either way, up to
      summation order, and the same gradients.
    gather_batch: captions per iteration of the gathered loop: `EVAL_GATHER_BATCH` where no
      gradient is taken (faster on CPU), 1 in training (batching slows the backward pass).
  Returns:
    [Ni, Nc] float32 scores (row = image, column = caption).
  """
  if not (use_sparse or use_dense):
    raise ValueError("SEPS needs at least one branch (sparse and/or dense).")
  if dense_mode not in DENSE_MODES:
    raise ValueError(f"dense_mode must be one of {DENSE_MODES}, got {dense_mode!r}.")
  if selection not in SELECTIONS:
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
  ni, nc = img["x"].shape[0], cap["words"].shape[0]
  if dense_index is not None:
    if not (use_dense and dense_mode == "parity"):
      raise ValueError("dense_index is for the parity dense branch (dense_mode='parity', "
                       "use_dense=True) only.")
    if dense is None:
      raise ValueError("The dense branch is on but no dense-caption features were given.")
    if tuple(dense_index.shape) != (nc,):
      raise ValueError(f"dense_index must be [Nc] = [{nc}] (caption j's dense-caption row), "
                       f"got shape {tuple(dense_index.shape)}.")
    # Each branch is the same per-pair computation with its own text; score the dense one on
    # the distinct dense captions only. s + d is the sum the single pass computes (0 + s + d).
    one_branch = functools.partial(pair_scores, k=k, use_sparse=True, use_dense=False,
                                   selection=selection, st_temperature=st_temperature,
                                   chunk=chunk, precision=precision, gather_kept=gather_kept,
                                   gather_batch=gather_batch)
    d = jnp.take(one_branch(img, dense), dense_index, axis=1)
    return one_branch(img, cap) + d if use_sparse else d
  if use_dense:
    if dense is None:
      raise ValueError("The dense branch is on but no dense-caption features were given.")
    want = nc if dense_mode == "parity" else ni
    if dense["words"].shape[0] != want:
      raise ValueError(
          f"dense_mode={dense_mode!r} needs dense features aligned with the "
          f"{'captions' if dense_mode == 'parity' else 'images'} ({want}), got "
          f"{dense['words'].shape[0]}.")
  honest = use_dense and dense_mode == "honest"
  parity = use_dense and dense_mode == "parity"
  sel = dict(k=k, selection=selection, st_temperature=st_temperature, precision=precision)
  gather = gather_kept_default(gather_kept, selection)

  def tile_scores(im, own, cp, dn):
    # One image at a time (lax.map over the tile's images): every contraction is then a plain
    # GEMM or a caption-batched one in its natural layout (see `_image_pair_sims`).
    one = dict(x=im["x"], xn=im["xn"], cls_n=l2_normalize(im["cls"]),
               self_attn=im["self_attn"], logits=im["logits"],
               logits_t=jnp.swapaxes(im["logits"], -1, -2))
    if honest:
      one["own"] = own

    def per_pair_branch(o, txt):  # guide and aligned words both from the caption-aligned text
      cos_j = jnp.einsum("nd,jd->jn", o["xn"], txt["glo"], precision=precision)
      sims = _image_pair_sims(o, cos_j, txt["words"], gather=gather, gather_batch=gather_batch,
                              **sel)
      return hrpa_from_sims(sims, txt["mask"])

    def image(o):  # -> [Tc]
      s = 0.0
      if use_sparse:
        s = s + per_pair_branch(o, cp)
      if parity:
        s = s + per_pair_branch(o, dn)
      if honest:
        sims = jnp.einsum("jld,td->jlt", cp["words"], o["own"], precision=precision)
        s = s + hrpa_from_sims(sims, cp["mask"])
      return s
    return lax.map(image, one)  # [Ti, Tc]

  def image_tile(im, dn_img):
    if not honest:
      return im, None
    # Honest dense branch: selection depends on the image alone, so its tokens are per image.
    guide = jnp.einsum("ind,id->in", im["xn"], dn_img["glo"], precision=precision)[:, None]
    return im, sdtps_tokens(im, guide, **sel)[:, 0]

  if chunk is None:
    ti, tc = ni, nc
  elif isinstance(chunk, int):
    ti, tc = chunk, chunk
  else:
    ti, tc = chunk
  ti, tc = max(1, min(ti, ni)), max(1, min(tc, nc))
  dense_img = dense if honest else None
  dense_cap = dense if parity else None
  if ti >= ni and tc >= nc:
    im, own = image_tile(img, dense_img)
    return tile_scores(im, own, cap, dense_cap)

  cap_tiles = _tile((cap, dense_cap), tc)

  def outer(args):
    im, own = image_tile(*args)
    return lax.map(lambda c: tile_scores(im, own, *c), cap_tiles)  # [nct, Ti, Tc]

  out = lax.map(outer, _tile((img, dense_img), ti))  # [nit, nct, Ti, Tc]
  out = out.transpose(0, 2, 1, 3).reshape(out.shape[0] * ti, out.shape[1] * tc)
  return out[:ni, :nc]
