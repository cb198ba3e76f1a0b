"""GRM's building blocks in Flax: saliency adapters (SA / GA), region prompts, region
uncertainty and its samplers. The model that wires them together is `models/grm.py` (whose
docstring describes the method; design choices: docs/grm_design.md).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gseps_jax import losses
from gseps_jax.models import layers
from gseps_jax.models.similarity import l2_normalize


# ----------------------------------------------------------------------------- saliency adapter


class SaliencyAdapter(nn.Module):
  """Per-token keep/drop decision (SA / GA).

  Attributes:
    tau: Gumbel-Softmax temperature.
    hard: training forward uses the 0/1 sample with straight-through gradients (True) or the
      soft keep probability of the perturbed logits (False).
    dtype: compute dtype of the MLP; its output layer (the two logits) and the probabilities are
      float32 whatever it is.
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
        'mask': `[B, L]` float32 keep weight: 0/1 in the forward pass (hard or eval), with the
          soft keep probability's gradient in training (straight-through); the soft
          probability itself when training with `hard=False`. Always 0 on padding.
        'keep': `[B, L]` bool, the hard keep decision (eval: the tokens scored at the key level;
          training with `hard=False`: the sampled decision, reported only: there every valid
          token is present with its soft weight).
        'prob': `[B, L]` float32 keep probability softmax(logits)[..., 0] (no noise).
    """
    d = tokens.shape[-1]
    h = nn.LayerNorm(dtype=self.dtype, name="norm")(tokens)
    h = nn.Dense(max(1, d // 4), dtype=self.dtype, name="fc1")(h)
    h = layers.gelu(h)
    ft = jnp.promote_types(self.dtype, jnp.float32)  # float32 (float64 in the x64 tests)
    # The logits in float32 also for bf16 compute: only their difference counts (log_softmax),
    # and bf16 keeps 8 significant bits of each (tests/test_bf16.py). Two outputs: free.
    logits = nn.Dense(2, dtype=ft, name="fc2")(h)
    logp = jax.nn.log_softmax(logits.astype(ft), axis=-1)  # [B, L, 2]
    prob = jnp.exp(logp[..., 0])
    keep_logit = logp[..., 0] - logp[..., 1]
    valid = valid.astype(bool)
    if train:
      g = jax.random.gumbel(self.make_rng("gumbel"), logp.shape, ft)
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
      mask = keep.astype(ft)
    elif self.hard:
      mask = keep.astype(ft) + soft - jax.lax.stop_gradient(soft)
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
    prompt_init: "orthogonal" (K orthonormal prompts: distinct directions from step 0; needs
      K <= D) or "normal" (i.i.d. N(0, 1), the first implementation's).
    eps: column-normalisation epsilon.
  """
  num_regions: int
  normalize_tokens: bool = False
  learn_scale: bool = False
  init_scale: float = 1.0
  prompt_init: str = "normal"
  eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens: jax.Array, keep: jax.Array):
    """Region attention over the kept tokens.

    Args:
      tokens: `[B, L, D]` V_hat.
      keep: `[B, L]` bool, or float keep weights (the adapters' straight-through mask: the
        attention is multiplied by it, so dropped tokens get attention 0 and the keep
        probability gets the gradient).

    Returns:
      attn: `[B, L, K]` Â, each column sums to 1 over kept tokens.
      means: `[B, K, D]` mu.
      stats: scalars 'region_entropy' (mean column entropy of Â, nats), 'region_cos' (overlap
        of the region maps: mean pairwise cosine between the columns of Â; 1 = every region
        on the same patches, 0 = disjoint; `map_overlap`), 'region_mean_cos' (mean pairwise
        cosine between the region means, uncentered: near 1 whenever the tokens share a
        common component, even for distinct maps); the cosines are 0 when K = 1.
    """
    d = tokens.shape[-1]
    if self.prompt_init == "orthogonal":
      if self.num_regions > d:
        raise ValueError(f"model.grm.region_prompt_init='orthogonal' needs num_regions <= "
                         f"embed_dim, got {self.num_regions} > {d}; use 'normal'")
      init = nn.initializers.orthogonal()
    elif self.prompt_init == "normal":
      init = nn.initializers.normal(1.0)
    else:
      raise ValueError(f"model.grm.region_prompt_init must be 'orthogonal' or 'normal', got "
                       f"{self.prompt_init!r}")
    prompts = self.param("prompts", init, (self.num_regions, d))
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
             "region_cos": map_overlap(attn),
             "region_mean_cos": mean_pairwise_cosine(means)}
    return attn, means, stats


def map_overlap(attn: jax.Array) -> jax.Array:
  """Mean pairwise cosine between the region maps (columns of Â), averaged over the batch.

  The collapse measure: the maps are non-negative, so this is 1 when every region attends the
  same patches with the same profile and 0 when the regions are disjoint. Unlike the cosine of
  the region means it does not see the tokens' common component.

  Args:
    attn: `[B, L, K]` Â.

  Returns:
    scalar; 0 when K = 1.
  """
  return mean_pairwise_cosine(jnp.swapaxes(attn, 1, 2))


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
