"""Vision Transformer in Flax Linen, numerically equal to HF `ViTModel.last_hidden_state`.

Submodules carry the HF PyTorch names (`embeddings/patch_embeddings/projection`,
`encoder/layer_3/attention/attention/query`, `.../layernorm_before`, `layernorm`) so `hf_import`
maps weights by a mechanical rule. Images are NHWC. Any input size works: position embeddings are
resized with PyTorch's bicubic kernel exactly as HF does with `interpolate_pos_encoding=True`.
"""

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gseps_jax.models import layers
from gseps_jax.models.bert import DenseDropout, Intermediate, SelfAttention, layer_norm

Dtype = Any


def pair(v: int | Sequence[int]) -> tuple[int, int]:
  """HF accepts `image_size`/`patch_size` as an int or a pair: `224 -> (224, 224)`."""
  if isinstance(v, (int, np.integer)):
    return int(v), int(v)
  if len(v) != 2:
    raise ValueError(f"Expected an int or a (height, width) pair, got {v!r}.")
  return int(v[0]), int(v[1])


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic-convolution weights of the 4 taps around a sample at fraction `t`, `[n, 4]`."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The `[out_size, in_size]` matrix of `torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False, antialias=False)` along one axis (A = -0.75, border taps clamped).

  Follows ATen's `upsample_bicubic2d` on CPU: source coordinate `(i + 0.5) * in/out - 0.5`
  (not clamped at 0 for cubic), integer part capped at `in_size - 1`, fraction clipped to [0, 1].
  Computed in float64; returned as float32.
  """
  scale = in_size / out_size
  real = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  idx = np.minimum(np.floor(real), in_size - 1).astype(np.int64)
  t = np.clip(real - idx, 0.0, 1.0)
  w = _cubic_weights(t)  # [out, 4]
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.repeat(np.arange(out_size), 4)
  cols = np.clip(idx[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1).reshape(-1)
  np.add.at(m, (rows, cols), w.reshape(-1))
  return m.astype(np.float32)


def resize_bicubic(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Bicubic resize of `[h, w, D]` to `[out_h, out_w, D]`, equal to torch's (see `bicubic_matrix`).

  `jax.image.resize(method="cubic")` uses a different border rule and A = -0.5, so the separable
  matrices are written out instead.
  """
  mh = jnp.asarray(bicubic_matrix(x.shape[0], out_hw[0]))
  mw = jnp.asarray(bicubic_matrix(x.shape[1], out_hw[1]))
  hp = jax.lax.Precision.HIGHEST
  return jnp.einsum("oh,hwd,pw->opd", mh, x.astype(jnp.float32), mw, precision=hp).astype(x.dtype)


def interpolate_pos_encoding(pos: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
  """HF `ViTEmbeddings.interpolate_pos_encoding`: `[1, 1 + n*n, D] -> [1, 1 + gh*gw, D]`.

  The CLS position is kept; the `n x n` patch grid is resized bicubically to `grid_hw`. Returns the
  input unchanged when the grid already matches (as HF does).
  """
  n_pos = pos.shape[1] - 1
  side = int(round(n_pos ** 0.5))
  if side * side != n_pos:
    raise ValueError(f"Position embeddings cover {n_pos} patches, not a square grid.")
  if (side, side) == tuple(grid_hw):
    return pos
  patch = resize_bicubic(pos[0, 1:].reshape(side, side, -1), grid_hw)
  return jnp.concatenate([pos[:, :1], patch.reshape(1, -1, pos.shape[-1])], axis=1)


class _ViTEmbeddings(nn.Module):
  """Patch projection, CLS token, (interpolated) position embeddings: `[B,H,W,C] -> [B,1+N,D]`."""
  hidden_size: int
  image_size: tuple[int, int]
  patch_size: tuple[int, int]
  dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, pixel_values, *, train):
    d = self.hidden_size
    ph, pw = self.patch_size
    n_pretrain = (self.image_size[0] // ph) * (self.image_size[1] // pw)
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param("cls_token", init, (1, 1, d), jnp.float32)
    pos = self.param("position_embeddings", init, (1, 1 + n_pretrain, d), jnp.float32)

    # HF's Conv2d(kernel=stride=patch) drops any remainder rows/columns; VALID does the same.
    x = PatchEmbeddings(d, self.patch_size, self.dtype, name="patch_embeddings")(pixel_values)
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, d)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
    x = x + interpolate_pos_encoding(pos, (gh, gw)).astype(self.dtype)
    return layers.Dropout(self.dropout)(x, deterministic=not train)


class PatchEmbeddings(nn.Module):
  """HF `*PatchEmbeddings`: `projection` conv, kernel = stride = patch; `[B,H,W,C] -> [B,h,w,D]`."""
  features: int
  patch_size: tuple[int, int]
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.features, self.patch_size, strides=self.patch_size, padding="VALID",
                   dtype=self.dtype, param_dtype=jnp.float32, name="projection")(
                       x.astype(self.dtype))


class _ViTAttention(nn.Module):
  """HF `ViTAttention`: `attention` (q/k/v + softmax) then `output` (dense + dropout)."""
  num_heads: int
  qkv_bias: bool
  hidden_dropout: float
  attention_dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, *, train):
    h = SelfAttention(self.num_heads, self.qkv_bias, self.attention_dropout, self.dtype,
                      name="attention")(x, train=train)
    return DenseDropout(x.shape[-1], self.hidden_dropout, self.dtype, name="output")(h, train=train)


class ViTLayer(nn.Module):
  """One pre-LayerNorm ViT block: `[B, L, D] -> [B, L, D]`.

  `train` is positional (not keyword-only) so that `layers.remat_block` can keep it static.
  """
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  qkv_bias: bool
  hidden_dropout_prob: float
  attention_probs_dropout_prob: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = x.shape[-1]
    h = layer_norm(self.layer_norm_eps, "layernorm_before", self.dtype)(x)
    x = x + _ViTAttention(self.num_attention_heads, self.qkv_bias, self.hidden_dropout_prob,
                          self.attention_probs_dropout_prob, self.dtype, name="attention")(
                              h, train=train)
    h = layer_norm(self.layer_norm_eps, "layernorm_after", self.dtype)(x)
    h = Intermediate(self.intermediate_size, self.hidden_act, self.dtype, name="intermediate")(h)
    return x + DenseDropout(d, self.hidden_dropout_prob, self.dtype, name="output")(h, train=train)


class _ViTEncoder(nn.Module):
  """The stack of `layer_{i}` blocks (HF `encoder.layer.{i}`)."""
  num_hidden_layers: int
  layer: Callable[..., ViTLayer]  # ViTLayer (maybe rematerialised) with all but `name` bound

  @nn.compact
  def __call__(self, x, *, train):
    for i in range(self.num_hidden_layers):
      x = self.layer(name=f"layer_{i}")(x, train)  # positional: static under remat
    return x


class ViT(nn.Module):
  """ViT returning CLS + patch tokens after the final LayerNorm (HF `ViTModel`, no pooler).

  Attributes mirror HF `ViTConfig` keys; `image_size` is the pretraining size (it fixes the
  position-embedding grid), inputs of any size are accepted. `dtype` is the compute dtype
  (params stay float32). `remat` ("none" | "blocks" | "dots", `layers.REMAT_POLICIES`)
  rematerialises each `encoder/layer_{i}` in the backward pass; the parameters are the same.
  """
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: tuple[int, int] = (224, 224)
  patch_size: tuple[int, int] = (16, 16)
  num_channels: int = 3
  qkv_bias: bool = True
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0
  dtype: Dtype = jnp.float32
  remat: str = "none"

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], dtype: Dtype = jnp.float32,
                  remat: str = "none") -> "ViT":
    """Builds from HF `config.json` keys (missing keys take HF `ViTConfig` defaults)."""
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "layer_norm_eps", "num_channels", "qkv_bias", "hidden_dropout_prob",
              "attention_probs_dropout_prob")
    kw = {k: cfg[k] for k in fields if k in cfg}
    return cls(**kw, image_size=pair(cfg.get("image_size", 224)),
               patch_size=pair(cfg.get("patch_size", 16)), dtype=dtype, remat=remat)

  @nn.compact
  def __call__(self, pixel_values: jax.Array, *, train: bool = False) -> jax.Array:
    """Encodes images.

    Args:
      pixel_values: `[B, H, W, C]` normalised images; H, W at least one patch (a remainder that
        is not a whole patch is dropped, as HF's strided conv does).
      train: enables dropout (needs the `'dropout'` rng).

    Returns:
      `[B, 1 + (H // p) * (W // p), hidden_size]` in `dtype`, CLS first.
    """
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.num_channels:
      raise ValueError(f"ViT expects NHWC images with {self.num_channels} channels, got shape "
                       f"{pixel_values.shape}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}.")
    x = _ViTEmbeddings(self.hidden_size, pair(self.image_size), pair(self.patch_size),
                       self.hidden_dropout_prob, self.dtype, name="embeddings")(
                           pixel_values, train=train)
    layer = functools.partial(
        layers.remat_block(ViTLayer, self.remat, static_argnums=(2,)),
        num_attention_heads=self.num_attention_heads,
        intermediate_size=self.intermediate_size, hidden_act=self.hidden_act,
        layer_norm_eps=self.layer_norm_eps, qkv_bias=self.qkv_bias,
        hidden_dropout_prob=self.hidden_dropout_prob,
        attention_probs_dropout_prob=self.attention_probs_dropout_prob, dtype=self.dtype)
    x = _ViTEncoder(self.num_hidden_layers, layer, name="encoder")(x, train=train)
    return layer_norm(self.layer_norm_eps, "layernorm", self.dtype)(x)
