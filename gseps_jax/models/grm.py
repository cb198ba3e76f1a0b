"""GRM: saliency adapters, region prompts and region uncertainty over a dual encoder, in Flax.

Spec: `spec/grm.md`. Per image, V `[Lv, E]` = projected vision tokens; per caption, T `[Lt, E]`
= projected word tokens with a padding mask.

  1. Saliency adapters (SA for vision, GA for text): LayerNorm -> Dense(E//4) -> GELU ->
     Dense(2) -> log_softmax; column 0 = keep. Training: Gumbel-Softmax (temperature `tau`),
     straight-through hard by default; eval: keep = argmax, no noise. Padding is never kept and at
     least one valid token always is. V_hat = V * A_V[:, None].
  2. Region prompts: A_r = sigmoid(scale * V_hat . normalize(P)^T + bias) `[Lv, K]`, dropped tokens
     0, columns normalised to Â; region means mu_k = sum_l Â[l, k] V_hat[l].
  3. Region uncertainty: log sigma^2 = clip(phi(mu)); training samples
     u_k = mu_k + sigma_k * ||Â[:, k]||_2 * xi_k (exactly the distribution of the per-token form
     sum_l Â[l, k] (mu_k + sigma_k eps_lk)); eval u_k = mu_k.
  4. Scores (the one kernel, `similarity.token_similarity`): ori = s(V, T), key = s(V_hat, T_hat)
     on the kept tokens, unc = s(U, T_hat).

Key-level tokens. The kernel normalises tokens, so V_hat restricted to kept tokens has exactly
the values of V there (the hard mask is 1). `encode_images` therefore stores V once with two
masks (`ori_mask`, `key_mask`) instead of a second copy; the training forward scores V_hat so the
straight-through path of the paper is kept (its gradient through the normalised kernel is ~0: the
saliency adapters learn from the region attention and the reconstruction loss, which see V_hat
unnormalised, and the key level's choice of tokens is not differentiable).
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gseps_jax import losses
from gseps_jax.models import encoders
from gseps_jax.models import layers
from gseps_jax.models.similarity import l2_normalize, token_similarity, token_similarity_multi

LEVELS = ("ori", "key", "unc")


# ----------------------------------------------------------------------------- saliency adapter


class SaliencyAdapter(nn.Module):
  """Per-token keep/drop decision (SA / GA).

  Attributes:
    tau: Gumbel-Softmax temperature.
    hard: training forward uses the 0/1 sample with straight-through gradients (True) or the
      soft keep probability of the perturbed logits (False).
    dtype: compute dtype of the MLP (logits and probabilities are float32).
  """
  tau: float = 1.0
  hard: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, valid: jax.Array, *, train: bool) -> dict:
    """Decides which tokens to keep.

    Args:
      tokens: `[B, L, D]`.
      valid: `[B, L]` bool, False on padding.
      train: Gumbel sampling (needs the 'gumbel' rng) vs deterministic argmax.

    Returns:
      dict with
        'mask': `[B, L]` float32 multiplier for the tokens: 0/1 in the forward pass (hard or
          eval), with the soft keep probability's gradient in training (straight-through);
          the soft probability itself when `hard=False`. Always 0 on padding.
        'keep': `[B, L]` bool, the tokens treated as present downstream (masked max / mean).
        'prob': `[B, L]` float32 keep probability softmax(logits)[..., 0] (no noise).
    """
    d = tokens.shape[-1]
    h = nn.LayerNorm(dtype=self.dtype, name="norm")(tokens)
    h = nn.Dense(max(1, d // 4), dtype=self.dtype, name="fc1")(h)
    h = layers.gelu(h)
    logits = nn.Dense(2, dtype=self.dtype, name="fc2")(h)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, L, 2]
    prob = jnp.exp(logp[..., 0])
    keep_logit = logp[..., 0] - logp[..., 1]
    valid = valid.astype(bool)
    if train:
      g = jax.random.gumbel(self.make_rng("gumbel"), logp.shape, jnp.float32)
      perturbed = (logp + g) / self.tau
      soft = jax.nn.softmax(perturbed, axis=-1)[..., 0]
      sampled = perturbed[..., 0] >= perturbed[..., 1]
    else:
      soft, sampled = prob, keep_logit >= 0.0
    keep = sampled & valid
    # At least one token per item: the valid token with the highest (noise-free) keep logit.
    best = jnp.argmax(jnp.where(valid, keep_logit, -jnp.inf), axis=-1)
    forced = (jax.nn.one_hot(best, keep.shape[-1], dtype=bool) & valid
              & ~jnp.any(keep, axis=-1, keepdims=True))
    keep = keep | forced
    if not train:
      mask = keep.astype(jnp.float32)
    elif self.hard:
      mask = keep.astype(jnp.float32) + soft - jax.lax.stop_gradient(soft)
    else:
      mask = soft
    return {"mask": jnp.where(valid, mask, 0.0), "keep": keep, "prob": prob}


# ----------------------------------------------------------------------------- region prompts


class RegionPrompts(nn.Module):
  """K learnable prompts -> column-normalised region attention and region means.

  Attributes:
    num_regions: K.
    normalize_tokens: score cos(V_hat, P) instead of V_hat . normalize(P) (avoids a saturated
      sigmoid when token norms are large; pair it with a learnable scale).
    learn_scale: learnable logit scale and bias (initialised to `init_scale`, 0).
    init_scale: (initial) logit scale; the paper's form is scale 1, bias 0, not learnable.
    eps: column-normalisation epsilon.
  """
  num_regions: int
  normalize_tokens: bool = False
  learn_scale: bool = False
  init_scale: float = 1.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens: jax.Array, keep: jax.Array):
    """Region attention over the kept tokens.

    Args:
      tokens: `[B, L, D]` V_hat.
      keep: `[B, L]` bool, the kept tokens (dropped tokens get attention 0).

    Returns:
      attn: `[B, L, K]` Â, each column sums to 1 over kept tokens.
      means: `[B, K, D]` mu.
      stats: {'region_entropy': mean column entropy of Â (nats), 'region_cos': mean pairwise
        cosine between region means (0 when K = 1)}; both scalars.
    """
    d = tokens.shape[-1]
    prompts = self.param("prompts", nn.initializers.normal(1.0), (self.num_regions, d))
    if self.learn_scale:
      scale = self.param("logit_scale", nn.initializers.constant(self.init_scale), ())
      bias = self.param("logit_bias", nn.initializers.zeros, ())
    else:
      scale, bias = self.init_scale, 0.0
    v = l2_normalize(tokens) if self.normalize_tokens else tokens.astype(jnp.float32)
    logits = jnp.einsum("bld,kd->blk", v, l2_normalize(prompts))
    a = jax.nn.sigmoid(scale * logits + bias) * keep[..., None].astype(jnp.float32)
    attn = a / (jnp.sum(a, axis=1, keepdims=True) + self.eps)
    means = jnp.einsum("blk,bld->bkd", attn, tokens.astype(jnp.float32))
    stats = {"region_entropy": jnp.mean(losses.column_entropy(attn)),
             "region_cos": mean_pairwise_cosine(means)}
    return attn, means, stats


def mean_pairwise_cosine(means: jax.Array) -> jax.Array:
  """Mean cosine over the K(K-1)/2 pairs of distinct regions, averaged over the batch.

  Args:
    means: `[B, K, D]`.

  Returns:
    scalar; 0 when K = 1 (no pairs).
  """
  k = means.shape[1]
  if k < 2:
    return jnp.zeros((), jnp.float32)
  n = l2_normalize(means)
  cos = jnp.einsum("bkd,bjd->bkj", n, n)
  off = ~jnp.eye(k, dtype=bool)
  return jnp.sum(jnp.where(off, cos, 0.0)) / (means.shape[0] * k * (k - 1))


# ----------------------------------------------------------------------------- uncertainty


def sample_regions(means: jax.Array, logvar: jax.Array, attn: jax.Array,
                   key: jax.Array) -> jax.Array:
  """Cheap sampler: u_k = mu_k + sigma_k * ||Â[:, k]||_2 * xi_k, xi_k ~ N(0, I). O(K D).

  Args:
    means: `[B, K, D]` mu.
    logvar: `[B, K, D]` log sigma^2.
    attn: `[B, L, K]` Â.
    key: PRNG key.

  Returns:
    `[B, K, D]` u.
  """
  # The 1e-12 keeps the sqrt's gradient finite for an all-zero column.
  col_norm = jnp.sqrt(jnp.sum(jnp.square(attn), axis=1) + 1e-12)  # [B, K]
  xi = jax.random.normal(key, means.shape, means.dtype)
  return means + jnp.exp(0.5 * logvar) * col_norm[..., None] * xi


def sample_regions_per_token(means: jax.Array, logvar: jax.Array, attn: jax.Array,
                             key: jax.Array) -> jax.Array:
  """The spec's per-token form (O(L K D); reference for `sample_regions`).

  z_lk = mu_k + sigma_k * eps_lk, u_k = sum_l Â[l, k] z_lk. Equal in distribution to
  `sample_regions` when the columns of Â sum to 1.

  Args/returns as `sample_regions`.
  """
  b, l, k = attn.shape
  eps = jax.random.normal(key, (b, l, k, means.shape[-1]), means.dtype)
  z = means[:, None] + jnp.exp(0.5 * logvar)[:, None] * eps  # [B, L, K, D]
  return jnp.einsum("blk,blkd->bkd", attn, z)


class RegionUncertainty(nn.Module):
  """phi: mu -> log sigma^2 (clipped), and the region tokens U.

  Attributes:
    hidden: width of phi's hidden layer.
    logvar_min, logvar_max: clip range of log sigma^2 (outside it the gradient is 0).
    dtype: compute dtype of phi.
  """
  hidden: int = 256
  logvar_min: float = -10.0
  logvar_max: float = 2.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, means: jax.Array, attn: jax.Array, *, train: bool):
    """Region tokens.

    Args:
      means: `[B, K, D]` mu.
      attn: `[B, L, K]` Â.
      train: sample with the 'noise' rng (True) or return the means (False).

    Returns:
      u: `[B, K, D]` region tokens; logvar: `[B, K, D]` float32.
    """
    h = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(means)
    h = layers.gelu(h)
    logvar = nn.Dense(means.shape[-1], dtype=self.dtype, name="fc2")(h).astype(jnp.float32)
    logvar = jnp.clip(logvar, self.logvar_min, self.logvar_max)
    if not train:
      return means, logvar
    return sample_regions(means, logvar, attn, self.make_rng("noise")), logvar


# ----------------------------------------------------------------------------- model


class GRM(nn.Module):
  """The full GRM model (model interface of docs/design.md).

  Attributes:
    config: `config.model` (vision, text, embed_dim, dtype, freeze_text, grm); see
      configs/grm_vit.py for the `grm` fields.

  Parameter tree: 'vision_encoder', 'text_encoder' (HF-named encoders), 'vision_proj',
  'text_proj', 'sa', 'ga', 'regions', 'uncertainty' and, with `grm.learn_temperature`, the scalar
  'log_temperature' used by the InfoNCE loss.
  """
  config: Any

  @classmethod
  def from_config(cls, model_cfg) -> "GRM":
    """`config.model` (with a `grm` sub-config, see configs/grm_vit.py) -> GRM."""
    return cls(config=model_cfg)

  def setup(self):
    c, g = self.config, self.config.grm
    dtype = jnp.dtype(c.dtype)
    self.vision_encoder = encoders.encoder_from_config(c.vision, dtype)
    self.text_encoder = encoders.encoder_from_config(c.text, dtype)
    self.vision_proj = nn.Dense(c.embed_dim, dtype=dtype)
    self.text_proj = nn.Dense(c.embed_dim, dtype=dtype)
    self.sa = SaliencyAdapter(tau=g.tau, hard=g.hard, dtype=dtype)
    self.ga = SaliencyAdapter(tau=g.tau, hard=g.hard, dtype=dtype)
    self.regions = RegionPrompts(num_regions=g.num_regions,
                                 normalize_tokens=g.region_normalize_tokens,
                                 learn_scale=g.region_learn_scale,
                                 init_scale=g.region_logit_scale)
    self.uncertainty = RegionUncertainty(hidden=g.phi_width, logvar_min=g.logvar_min,
                                         logvar_max=g.logvar_max, dtype=dtype)
    if g.get("learn_temperature", False):
      self.log_temperature = self.param(
          "log_temperature", nn.initializers.constant(math.log(g.init_temperature)), ())

  # -- kernel ----------------------------------------------------------------------------------

  def _kernel_args(self, chunk):
    dtype = jnp.dtype(self.config.dtype)
    # bf16 models feed bf16 tokens to the kernel's matmul; it accumulates in fp32 regardless.
    return dict(direction=self.config.grm.direction, chunk=chunk or None,
                compute_dtype=None if dtype == jnp.float32 else dtype)

  def _sim(self, x, xm, y, ym, chunk=None):
    return token_similarity(x, xm, y, ym, **self._kernel_args(chunk))

  # -- encoders --------------------------------------------------------------------------------

  def _image_tokens(self, images, train):
    v = self.vision_encoder(images, train=train)
    return self.vision_proj(v).astype(jnp.float32)  # [B, Lv, E]

  def _text_tokens(self, input_ids, attention_mask, train, hidden=None):
    if hidden is None:
      # A frozen tower is a fixed feature extractor: deterministic (no dropout), as its cached
      # features (data/text_cache.py) are.
      t = self.text_encoder(input_ids, attention_mask,
                            train=train and not self.config.freeze_text)
    else:  # precomputed frozen-tower features `[B, Lt, D_text]` (batch key 'text_hidden')
      t = jnp.asarray(hidden, jnp.dtype(self.config.dtype))
    if self.config.freeze_text:  # pretrained text tower used as a fixed feature extractor
      t = jax.lax.stop_gradient(t)
    return self.text_proj(t).astype(jnp.float32)  # [B, Lt, E]

  def image_branch(self, images: jax.Array, train: bool = False) -> dict:
    """Every intermediate of the image branch (used by training, `encode_images`, explain).

    Returns:
      dict(v `[B, Lv, E]` projected tokens V, valid `[B, Lv]`, v_hat V*mask, sa (saliency
      adapter outputs: keep, mask, prob, ...), attn `[B, K, Lv]` region attention, means, stats,
      u `[B, K, E]` region tokens U, logvar `[B, K, E]`).
    """
    v = self._image_tokens(images, train)
    valid = jnp.ones(v.shape[:2], bool)
    sa = self.sa(v, valid, train=train)
    v_hat = v * sa["mask"][..., None]
    attn, means, stats = self.regions(v_hat, sa["keep"])
    u, logvar = self.uncertainty(means, attn, train=train)
    return dict(v=v, valid=valid, v_hat=v_hat, sa=sa, attn=attn, means=means, stats=stats, u=u,
                logvar=logvar)

  def text_branch(self, input_ids: jax.Array, attention_mask: jax.Array,
                  train: bool = False, text_hidden=None) -> dict:
    """Every intermediate of the text branch: dict(t `[B, Lt, E]`, valid, t_hat, ga (adapter
    outputs: keep, mask, prob, ...)). `text_hidden`: cached frozen-tower outputs replacing the
    text encoder call (data/text_cache.py)."""
    t = self._text_tokens(input_ids, attention_mask, train, text_hidden)
    valid = attention_mask.astype(bool)
    ga = self.ga(t, valid, train=train)
    return dict(t=t, valid=valid, t_hat=t * ga["mask"][..., None], ga=ga)

  def encode_images(self, images: jax.Array, *, train: bool = False) -> dict:
    """Image features for scoring.

    Args:
      images: `[B, H, W, 3]` normalised NHWC.

    Returns:
      {'ori': `[B, Lv, E]` V, 'ori_mask': `[B, Lv]` bool (all True), 'key_mask': `[B, Lv]` bool
       (kept tokens: the key level scores V on these), 'unc': `[B, K, E]` U, 'unc_mask': `[B, K]`}.
    """
    b = self.image_branch(images, train)
    return {"ori": b["v"], "ori_mask": b["valid"], "key_mask": b["sa"]["keep"], "unc": b["u"],
            "unc_mask": jnp.ones(b["u"].shape[:2], bool)}

  def encode_texts(self, input_ids: jax.Array, attention_mask: jax.Array, text_hidden=None, *,
                   train: bool = False) -> dict:
    """Caption features: {'ori': `[B, Lt, E]` T, 'ori_mask': `[B, Lt]`, 'key_mask': `[B, Lt]`}.
    `text_hidden` `[B, Lt, D_text]`: cached frozen text-tower outputs (skips the encoder)."""
    b = self.text_branch(input_ids, attention_mask, train, text_hidden)
    return {"ori": b["t"], "ori_mask": b["valid"], "key_mask": b["ga"]["keep"]}

  def level_scores(self, img: dict, txt: dict, *, chunk=None) -> dict:
    """level -> `[Ni, Nc]` kernel scores from `encode_images` / `encode_texts` outputs."""
    # Evaluation: ori and key score the same tokens V, T with different masks, so one cosine
    # block per tile serves both (training scores key on V_hat, T_hat: separate calls there).
    # Token-length buckets skip padding (same scores; see `similarity.token_similarity`).
    kw = dict(self._kernel_args(chunk), buckets=int(self.config.grm.get("eval_buckets", 1)))
    ori, key = token_similarity_multi(
        img["ori"], (img["ori_mask"], img["key_mask"]), txt["ori"],
        (txt["ori_mask"], txt["key_mask"]), **kw)
    return {
        "ori": ori,
        "key": key,
        "unc": token_similarity(img["unc"], img["unc_mask"], txt["ori"], txt["key_mask"], **kw),
    }

  def score(self, img_feats: dict, txt_feats: dict, dense_feats=None, *, chunk=None,
            **unused) -> jax.Array:
    """All-pairs eval score a*s_ori + b*s_key + c*s_unc -> `[Ni, Nc]` (dense_feats unused)."""
    del dense_feats, unused
    w = self.config.grm.level_weights
    s = self.level_scores(img_feats, txt_feats, chunk=chunk)
    return sum(w[k] * s[k] for k in LEVELS)

  def __call__(self, batch: dict, *, train: bool):
    """Training forward.

    Args:
      batch: 'image' `[B, H, W, 3]`, 'input_ids' `[B, Lt]`, 'attention_mask' `[B, Lt]`;
        optional 'text_hidden' `[B, Lt, D_text]` (cached frozen text-tower outputs).
      train: dropout / Gumbel / noise on (rngs 'dropout', 'gumbel', 'noise').

    Returns:
      sims: {'ori', 'key', 'unc'} -> `[B, B]` (row = image i, column = caption j).
      aux: scalars 'recon', 'kl', 'ent' (auxiliary losses) and metrics 'keep_ratio_img',
        'keep_ratio_txt', 'region_entropy', 'region_cos'.
    """
    im = self.image_branch(batch["image"], train)
    tx = self.text_branch(batch["input_ids"], batch["attention_mask"], train,
                          batch.get("text_hidden"))
    chunk = self.config.grm.get("train_chunk", None)
    t_key = tx["ga"]["keep"]
    sims = {
        "ori": self._sim(im["v"], im["valid"], tx["t"], tx["valid"], chunk),
        "key": self._sim(im["v_hat"], im["sa"]["keep"], tx["t_hat"], t_key, chunk),
        "unc": self._sim(im["u"], jnp.ones(im["u"].shape[:2], bool), tx["t_hat"], t_key, chunk),
    }
    keep_ratio = lambda k, v: jnp.sum(k) / jnp.maximum(jnp.sum(v), 1)
    aux = {
        "recon": losses.recon_loss(im["means"], im["v_hat"], im["sa"]["keep"]),
        "kl": losses.kl_loss(im["logvar"]),
        "ent": losses.entropy_loss(im["attn"]),
        "keep_ratio_img": keep_ratio(im["sa"]["keep"], im["valid"]),
        "keep_ratio_txt": keep_ratio(t_key, tx["valid"]),
        **im["stats"],
    }
    return sims, aux
