"""Swin Transformer in Flax Linen, numerically equal to HF `SwinModel.last_hidden_state`.

Submodules carry the HF PyTorch names (`embeddings/patch_embeddings/projection`, `embeddings/norm`,
`encoder/layers_1/blocks_0/attention/self/relative_position_bias_table`, `.../downsample/reduction`,
`layernorm`) so `hf_import` maps weights by a mechanical rule. Images are NHWC.

Behaviour copied from HF (including its quirks, so imported checkpoints give the same tokens):
- images and feature maps that are not a multiple of the patch / window size are zero-padded at
  the bottom/right (padded positions are not masked inside unshifted windows, as in HF);
- a stage whose feature map is not larger than the window uses plain (unshifted) windows;
- the `embeddings.norm` and `downsample.norm` LayerNorms use eps 1e-5 whatever the config says;
- stochastic depth (`drop_path_rate`, only with `train=True`) acts on the attention branch only.
"""

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gseps_jax.models import layers
from gseps_jax.models.bert import (DenseDropout, Intermediate, dense_layer, dot_product_attention,
                                   layer_norm)
from gseps_jax.models.vit import PatchEmbeddings, pair

Dtype = Any
_TORCH_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, used by HF for the two norms without eps


@functools.lru_cache(maxsize=16)
def relative_position_index(window: int) -> np.ndarray:
  """`[w*w, w*w]` index into the `[(2w-1)^2, H]` relative bias table (as HF builds it)."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """`[B, H, W, C] -> [B, nW, w*w, C]`, windows in row-major order (H, W multiples of w)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(x: jax.Array, window: int, h: int, w: int) -> jax.Array:
  """Inverse of `window_partition`: `[B, nW, w*w, C] -> [B, H, W, C]`."""
  b, c = x.shape[0], x.shape[-1]
  x = x.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


@functools.lru_cache(maxsize=32)
def shifted_window_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
  """Additive `[nW, w*w, w*w]` mask (0 or -100) for shifted windows on a padded `h x w` map.

  After the cyclic shift, a window may hold pixels from up to 3x3 image regions that were not
  neighbours; tokens only attend within their own region (HF `SwinLayer.get_attn_mask`).
  """
  def regions(n):
    i = np.arange(n)
    return (i >= n - window).astype(np.int64) + (i >= n - shift).astype(np.int64)
  label = (regions(h)[:, None] * 3 + regions(w)[None, :]).astype(np.float32)
  lw = np.asarray(window_partition(label[None, :, :, None], window))[0, :, :, 0]  # [nW, w*w]
  return np.where(lw[:, None, :] != lw[:, :, None], -100.0, 0.0).astype(np.float32)


class _SwinSelfAttention(nn.Module):
  """HF `SwinSelfAttention`: q/k/v and the relative position bias table, within windows.

  Input `[B, nW, w*w, C]` (+ optional `[nW, w*w, w*w]` shift mask), output same shape.
  """
  num_heads: int
  window_size: int
  qkv_bias: bool
  attention_dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, shift_mask, *, train):
    c = x.shape[-1]
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       ((2 * self.window_size - 1) ** 2, self.num_heads), jnp.float32)
    bias = table[relative_position_index(self.window_size)].transpose(2, 0, 1)  # [H, N, N]
    if shift_mask is not None:
      bias = bias[None] + jnp.asarray(shift_mask)[:, None]  # [nW, H, N, N]
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, c // self.num_heads)
    q = split(dense_layer(c, "query", self.dtype, self.qkv_bias)(x))
    k = split(dense_layer(c, "key", self.dtype, self.qkv_bias)(x))
    v = split(dense_layer(c, "value", self.dtype, self.qkv_bias)(x))
    rng = self.make_rng("dropout") if train and self.attention_dropout > 0 else None
    out = dot_product_attention(q, k, v, bias=bias, dropout_rate=self.attention_dropout,
                                dropout_rng=rng)
    return out.reshape(x.shape)


class _SwinAttention(nn.Module):
  """HF `SwinAttention`: `self` then `output` (dense + dropout)."""
  num_heads: int
  window_size: int
  qkv_bias: bool
  hidden_dropout: float
  attention_dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, shift_mask, *, train):
    h = _SwinSelfAttention(self.num_heads, self.window_size, self.qkv_bias,
                           self.attention_dropout, self.dtype, name="self")(
                               x, shift_mask, train=train)
    return DenseDropout(x.shape[-1], self.hidden_dropout, self.dtype, name="output")(h, train=train)


class SwinLayer(nn.Module):
  """One Swin block (window or shifted-window attention + MLP) on an `h x w` map.

  `[B, h*w, C] -> [B, h*w, C]`; `shift_size` 0 = plain windows. `hw` and `train` are positional
  (not keyword-only) so that `layers.remat_block` can keep them static.
  """
  num_heads: int
  window_size: int
  shift_size: int
  mlp_ratio: float
  hidden_act: str
  layer_norm_eps: float
  qkv_bias: bool
  hidden_dropout_prob: float
  attention_probs_dropout_prob: float
  drop_path: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, hw: tuple[int, int], train: bool = False):
    h, w = hw
    b, _, c = x.shape
    window, shift = self.window_size, self.shift_size
    if min(h, w) <= window:
      # HF shrinks the window to the map; its bias table is sized for the configured window, so
      # only the "equal" case (e.g. the last 7x7 stage of Swin-B-224) is valid there and here.
      if min(h, w) < window:
        raise ValueError(f"Swin feature map {h}x{w} is smaller than window_size {window}; use a "
                         f"larger image (HF SwinModel fails on this input as well).")
      shift = 0
    shortcut = x
    x = layer_norm(self.layer_norm_eps, "layernorm_before", self.dtype)(x).reshape(b, h, w, c)
    pad_b, pad_r = (-h) % window, (-w) % window
    x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    hp, wp = h + pad_b, w + pad_r
    if shift:
      x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
    mask = shifted_window_mask(hp, wp, window, shift) if shift else None
    x = _SwinAttention(self.num_heads, window, self.qkv_bias, self.hidden_dropout_prob,
                       self.attention_probs_dropout_prob, self.dtype, name="attention")(
                           window_partition(x, window), mask, train=train)
    x = window_reverse(x, window, hp, wp)
    if shift:
      x = jnp.roll(x, (shift, shift), axis=(1, 2))
    x = x[:, :h, :w].reshape(b, h * w, c)
    x = shortcut + _drop_path(self, x, self.drop_path, train)
    y = layer_norm(self.layer_norm_eps, "layernorm_after", self.dtype)(x)
    y = Intermediate(int(self.mlp_ratio * c), self.hidden_act, self.dtype, name="intermediate")(y)
    return x + DenseDropout(c, self.hidden_dropout_prob, self.dtype, name="output")(y, train=train)


def _drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per sample, `[B, ...]`."""
  if not train or rate == 0.0:
    return x
  keep = layers.keep_mask(module.make_rng("dropout"), 1.0 - rate,
                          (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class _PatchMerging(nn.Module):
  """HF `SwinPatchMerging`: 2x2 neighbours concatenated, `norm`, `reduction` (no bias).

  `[B, h*w, C] -> [B, ceil(h/2)*ceil(w/2), 2C]` (odd maps zero-padded bottom/right).
  """
  dtype: Dtype

  @nn.compact
  def __call__(self, x, hw):
    h, w = hw
    b, _, c = x.shape
    x = jnp.pad(x.reshape(b, h, w, c), ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    # Order (row, col) = (0,0), (1,0), (0,1), (1,1) as HF, which the reduction weights expect.
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    x = x.reshape(b, -1, 4 * c)
    x = layer_norm(_TORCH_LN_EPS, "norm", self.dtype)(x)
    return dense_layer(2 * c, "reduction", self.dtype, use_bias=False)(x)


class _SwinStage(nn.Module):
  """HF `SwinStage`: `blocks_{j}` (alternating shift) then optional `downsample`."""
  depth: int
  num_heads: int
  window_size: int
  drop_path: tuple[float, ...]
  downsample: bool
  # SwinLayer (maybe rematerialised) with the settings shared by all stages bound.
  block: Callable[..., SwinLayer]
  dtype: Dtype

  @nn.compact
  def __call__(self, x, hw, *, train):
    for j in range(self.depth):
      shift = 0 if j % 2 == 0 else self.window_size // 2
      x = self.block(num_heads=self.num_heads, window_size=self.window_size, shift_size=shift,
                     drop_path=self.drop_path[j], name=f"blocks_{j}")(
                         x, hw, train)  # positional: static under remat
    if self.downsample:
      x = _PatchMerging(self.dtype, name="downsample")(x, hw)
      hw = ((hw[0] + 1) // 2, (hw[1] + 1) // 2)
    return x, hw


class _SwinEncoder(nn.Module):
  """The `layers_{i}` stages (HF `encoder.layers.{i}`)."""
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]
  window_size: int
  drop_path_rate: float
  block: Callable[..., SwinLayer]
  dtype: Dtype

  @nn.compact
  def __call__(self, x, hw, *, train):
    total = sum(self.depths)
    dpr = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    start = 0
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      x, hw = _SwinStage(depth, heads, self.window_size, tuple(dpr[start:start + depth]),
                         i < len(self.depths) - 1, self.block, self.dtype, name=f"layers_{i}")(
                             x, hw, train=train)
      start += depth
    return x, hw


class _SwinEmbeddings(nn.Module):
  """Patch projection (image padded to whole patches), `norm`, optional absolute positions."""
  embed_dim: int
  image_size: tuple[int, int]
  patch_size: tuple[int, int]
  use_absolute_embeddings: bool
  dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, pixel_values, *, train):
    ph, pw = self.patch_size
    _, h, w, _ = pixel_values.shape
    pixel_values = jnp.pad(pixel_values, ((0, 0), (0, (-h) % ph), (0, (-w) % pw), (0, 0)))
    x = PatchEmbeddings(self.embed_dim, self.patch_size, self.dtype, name="patch_embeddings")(
        pixel_values)
    b, gh, gw, d = x.shape
    x = layer_norm(_TORCH_LN_EPS, "norm", self.dtype)(x.reshape(b, gh * gw, d))
    if self.use_absolute_embeddings:
      grid = (self.image_size[0] // ph) * (self.image_size[1] // pw)
      pos = self.param("position_embeddings", nn.initializers.zeros, (1, grid, d), jnp.float32)
      if pos.shape[1] != gh * gw:
        raise ValueError(f"Swin absolute position embeddings cover {pos.shape[1]} patches but the "
                         f"input has {gh}x{gw}; use the pretraining image size.")
      x = x + pos.astype(self.dtype)
    return layers.Dropout(self.dropout)(x, deterministic=not train), (gh, gw)


class Swin(nn.Module):
  """Swin returning the final-stage tokens after the final LayerNorm (HF `SwinModel`, no pooler).

  Attributes mirror HF `SwinConfig` keys; `dtype` is the compute dtype (params stay float32).
  `remat` ("none" | "blocks" | "dots", `layers.REMAT_POLICIES`) rematerialises each
  `encoder/layers_{i}/blocks_{j}` in the backward pass; the parameters are the same.
  """
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  image_size: tuple[int, int] = (224, 224)
  patch_size: tuple[int, int] = (4, 4)
  num_channels: int = 3
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  use_absolute_embeddings: bool = False
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0
  drop_path_rate: float = 0.1
  dtype: Dtype = jnp.float32
  remat: str = "none"

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], dtype: Dtype = jnp.float32,
                  remat: str = "none") -> "Swin":
    """Builds from HF `config.json` keys (missing keys take HF `SwinConfig` defaults)."""
    fields = ("embed_dim", "window_size", "num_channels", "mlp_ratio", "qkv_bias", "hidden_act",
              "layer_norm_eps", "use_absolute_embeddings", "hidden_dropout_prob",
              "attention_probs_dropout_prob", "drop_path_rate")
    kw = {k: cfg[k] for k in fields if k in cfg}
    for k in ("depths", "num_heads"):
      if k in cfg:
        kw[k] = tuple(int(v) for v in cfg[k])
    return cls(**kw, image_size=pair(cfg.get("image_size", 224)),
               patch_size=pair(cfg.get("patch_size", 4)), dtype=dtype, remat=remat)

  @property
  def num_features(self) -> int:
    """Output width: `embed_dim * 2**(num_stages - 1)`."""
    return int(self.embed_dim * 2 ** (len(self.depths) - 1))

  @nn.compact
  def __call__(self, pixel_values: jax.Array, *, train: bool = False) -> jax.Array:
    """Encodes images.

    Args:
      pixel_values: `[B, H, W, C]` normalised images.
      train: enables dropout and stochastic depth (needs the `'dropout'` rng).

    Returns:
      `[B, h*w, num_features]` in `dtype`, where `h = ceil(ceil(H/p) / 2**(S-1))` (each patch
      merging rounds up) and likewise `w`.
    """
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.num_channels:
      raise ValueError(f"Swin expects NHWC images with {self.num_channels} channels, got shape "
                       f"{pixel_values.shape}.")
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length.")
    x, hw = _SwinEmbeddings(self.embed_dim, pair(self.image_size), pair(self.patch_size),
                            self.use_absolute_embeddings, self.hidden_dropout_prob, self.dtype,
                            name="embeddings")(pixel_values, train=train)
    block = functools.partial(
        layers.remat_block(SwinLayer, self.remat, static_argnums=(2, 3)), mlp_ratio=self.mlp_ratio,
        hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps, qkv_bias=self.qkv_bias,
        hidden_dropout_prob=self.hidden_dropout_prob,
        attention_probs_dropout_prob=self.attention_probs_dropout_prob, dtype=self.dtype)
    x, _ = _SwinEncoder(tuple(self.depths), tuple(self.num_heads), self.window_size,
                        self.drop_path_rate, block, self.dtype, name="encoder")(
                            x, hw, train=train)
    return layer_norm(self.layer_norm_eps, "layernorm", self.dtype)(x)


def swin_output_grid(image_hw: Sequence[int], patch_size: Sequence[int],
                     num_stages: int) -> tuple[int, int]:
  """Final-stage `(h, w)` for an input of `image_hw` (the rounding `Swin.__call__` applies)."""
  h = -(-int(image_hw[0]) // int(patch_size[0]))
  w = -(-int(image_hw[1]) // int(patch_size[1]))
  for _ in range(num_stages - 1):
    h, w = (h + 1) // 2, (w + 1) // 2
  return h, w
