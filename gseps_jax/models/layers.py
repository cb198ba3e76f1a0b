"""Elementwise building blocks shared by every model: exact GELU and a fast dropout; and the
rematerialisation (gradient checkpointing) wrapper of the encoder blocks (`remat_block`).

Both are speed choices measured on the CPU train step (docs/performance.md, "Train step"):

* `gelu`: HF's exact GELU, `0.5 x (1 + erf(x / sqrt 2))`, the formula PyTorch evaluates.
  `jax.nn.gelu(approximate=False)` computes the same function through `erfc`, which XLA:CPU
  evaluates about 1.5x slower than `erf`; the two differ by < 1e-6.
* `dropout`: the keep mask comes from a counter-based hash of (element position, 64-bit seed
  drawn from the PRNG key) instead of `jax.random.bernoulli`. Threefry costs about 5 ns per
  element on CPU and the hash about 1 ns, and dropout masks were ~10% of the CPU train step.
  Randomness still enters only through the explicit key: the same key gives the same mask, on
  one device or sharded over many (the position is the global one), and distinct keys give
  independent-looking masks (tests/test_layers.py checks the keep rate, the independence of
  neighbours and of keys, and the gradient).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

_SQRT_HALF = np.float32(math.sqrt(0.5))


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, HF's "gelu" and `torch.nn.functional.gelu`."""
  return 0.5 * x * (1.0 + lax.erf(x * _SQRT_HALF.astype(x.dtype)))


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection on uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def keep_mask(rng: jax.Array, keep_prob: float, shape) -> jax.Array:
  """Boolean mask, True with probability `keep_prob` (quantised to 2^-32) per element.

  Element at flat position i is kept iff fmix32(fmix32(i ^ s0) + s1) < keep_prob * 2^32, with
  (s0, s1) = `jax.random.bits(rng, (2,), uint32)`. Both fmix32 steps are bijections, so for a
  fixed seed no two positions share a hash.
  """
  shape = tuple(shape)
  size = math.prod(shape)
  if size >= 2**32:
    raise ValueError(f"keep_mask: {size} elements exceed the 2^32 positions of the hash; "
                     "apply dropout in pieces.")
  if not 0.0 <= keep_prob <= 1.0:
    raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}.")
  if keep_prob >= 1.0:
    return jnp.ones(shape, bool)
  s = jax.random.bits(rng, (2,), jnp.uint32)
  pos = lax.iota(jnp.uint32, size).reshape(shape) if shape else jnp.zeros((), jnp.uint32)
  h = _fmix32(_fmix32(pos ^ s[0]) + s[1])
  threshold = min(int(round(keep_prob * 2.0**32)), 2**32 - 1)
  return h < np.uint32(threshold)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout: zero with probability `rate`, scale the rest by 1 / (1 - rate).

  `rng` None or `rate` 0 -> `x` unchanged (deterministic).
  """
  if rng is None or rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = keep_mask(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """`flax.linen.Dropout` with the hashed mask above (same `'dropout'` rng collection)."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate <= 0.0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"))


# `config.model.remat` -> what a rematerialised block keeps for the backward pass (configs/common.py
# REMAT_MODES holds the same names, checked without importing JAX; tests/test_remat.py checks they
# agree). "blocks": only the block's inputs, everything inside is recomputed; "dots": the matmul
# outputs too (no batch dimensions: the dense layers, not the attention einsums), the rest
# (LayerNorm, GELU, softmax, dropout masks) is recomputed.
REMAT_POLICIES = {
    "blocks": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(block: type[nn.Module], remat: str, static_argnums: tuple[int, ...]
                ) -> type[nn.Module]:
  """`block` (a Module class) wrapped in `nn.remat` with the policy of `remat`; "none" -> as is.

  The wrapped class takes the same attributes and creates the same parameter tree (same names),
  so checkpoints and HF imports do not depend on the setting.

  Args:
    block: the transformer block class (ViTLayer, BertLayer, SwinLayer).
    remat: "none" | "blocks" | "dots" (`REMAT_POLICIES`).
    static_argnums: positions of the `__call__` arguments that are Python values (`train`, Swin's
      `(h, w)`), counting `self` as 0. They must be passed positionally: `nn.remat` traces keyword
      arguments as arrays.

  Raises:
    ValueError: unknown `remat`.
  """
  if remat == "none":
    return block
  if remat not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat {remat!r}; supported: {('none', *REMAT_POLICIES)}.")
  return nn.remat(block, policy=REMAT_POLICIES[remat], static_argnums=static_argnums,
                  prevent_cse=True)
