"""BERT text encoder in Flax Linen, numerically equal to HF `BertModel.last_hidden_state`.

Submodules carry the HF PyTorch names (`embeddings/word_embeddings`, `encoder/layer_3/attention/
self/query`, `.../output/LayerNorm`, ...) so `hf_import` maps weights by a mechanical rule.

This file also holds the transformer pieces that ViT and Swin share with BERT (HF's ViT/Swin
attention blocks are copies of BERT's): `activation`, `dot_product_attention`, `SelfAttention`.
"""

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from gseps_jax.models import layers

Dtype = Any

# Exact (erf) GELU is what HF calls "gelu"; the tanh form has its own names there.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": layers.gelu,
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation HF's `ACT2FN[name]` computes ("gelu" = exact erf GELU)."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"Unsupported hidden_act {name!r}; supported: {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[name]


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          bias: jax.Array | None = None, mask: jax.Array | None = None,
                          dropout_rate: float = 0.0,
                          dropout_rng: jax.Array | None = None) -> jax.Array:
  """Scaled dot-product attention with float32 logits and softmax.

  Args:
    query: `[..., Lq, H, Dh]`.
    key, value: `[..., Lk, H, Dh]`.
    bias: additive bias broadcastable to `[..., H, Lq, Lk]` (Swin relative positions/shift mask).
    mask: boolean, broadcastable to `[..., H, Lq, Lk]`; False = key not attended.
    dropout_rate: dropout on the attention probabilities (applied only with `dropout_rng`).
    dropout_rng: PRNG key for that dropout; None = deterministic.

  Returns:
    `[..., Lq, H, Dh]` in `value.dtype`.
  """
  scale = query.shape[-1] ** -0.5
  # Logits and softmax in float32 even for bf16 compute (HF also softmaxes in float32).
  logits = jnp.einsum("...qhd,...khd->...hqk", query, key,
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rng is not None and dropout_rate > 0.0:
    probs = layers.dropout(probs, dropout_rate, dropout_rng)
  return jnp.einsum("...hqk,...khd->...qhd", probs.astype(value.dtype), value)


def dense_layer(features: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
  # BERT-style init (normal 0.02) as HF's `_init_weights`; params always float32.
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(0.02), name=name)


def layer_norm(eps: float, name: str, dtype: Dtype) -> nn.LayerNorm:
  # Flax computes the statistics in float32 also for bf16 inputs.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class SelfAttention(nn.Module):
  """HF `BertSelfAttention` / `ViTSelfAttention`: `query`, `key`, `value` projections + attention.

  Input `[..., L, D]`, output (heads concatenated, before the output projection) `[..., L, D]`.
  """
  num_heads: int
  qkv_bias: bool = True
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, bias: jax.Array | None = None,
               mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"hidden size {d} is not a multiple of {self.num_heads} heads.")
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, d // self.num_heads)
    q = split(dense_layer(d, "query", self.dtype, self.qkv_bias)(x))
    k = split(dense_layer(d, "key", self.dtype, self.qkv_bias)(x))
    v = split(dense_layer(d, "value", self.dtype, self.qkv_bias)(x))
    rng = self.make_rng("dropout") if train and self.attention_dropout > 0 else None
    out = dot_product_attention(q, k, v, bias=bias, mask=mask,
                                dropout_rate=self.attention_dropout, dropout_rng=rng)
    return out.reshape(*x.shape[:-1], d)


class DenseDropout(nn.Module):
  """HF `ViTSelfOutput` / `SwinSelfOutput` / `SwinOutput`: `dropout(dense(x))`, `[..., F]`."""
  features: int
  dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, *, train):
    x = dense_layer(self.features, "dense", self.dtype)(x)
    return layers.Dropout(self.dropout)(x, deterministic=not train)


class _DenseLayerNorm(nn.Module):
  """HF `BertSelfOutput` / `BertOutput`: `LayerNorm(dropout(dense(x)) + residual)`."""
  features: int
  layer_norm_eps: float
  dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, residual, *, train):
    x = dense_layer(self.features, "dense", self.dtype)(x)
    x = layers.Dropout(self.dropout)(x, deterministic=not train)
    return layer_norm(self.layer_norm_eps, "LayerNorm", self.dtype)(x + residual)


class BertLayer(nn.Module):
  """One post-LayerNorm BERT block: `[B, L, D] -> [B, L, D]`.

  `train` is positional (not keyword-only) so that `layers.remat_block` can keep it static.
  """
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  hidden_dropout_prob: float
  attention_probs_dropout_prob: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    d = x.shape[-1]
    h = _BertAttention(self.num_attention_heads, self.layer_norm_eps, self.hidden_dropout_prob,
                       self.attention_probs_dropout_prob, self.dtype, name="attention")(
                           x, mask, train=train)
    y = Intermediate(self.intermediate_size, self.hidden_act, self.dtype, name="intermediate")(h)
    return _DenseLayerNorm(d, self.layer_norm_eps, self.hidden_dropout_prob, self.dtype,
                           name="output")(y, h, train=train)


class _BertAttention(nn.Module):
  """HF `BertAttention`: `self` (SelfAttention) then `output` (dense + residual LayerNorm)."""
  num_heads: int
  layer_norm_eps: float
  hidden_dropout: float
  attention_dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, mask, *, train):
    h = SelfAttention(self.num_heads, True, self.attention_dropout, self.dtype, name="self")(
        x, mask=mask, train=train)
    return _DenseLayerNorm(x.shape[-1], self.layer_norm_eps, self.hidden_dropout, self.dtype,
                           name="output")(h, x, train=train)


class Intermediate(nn.Module):
  """HF `*Intermediate` (BERT, ViT, Swin): `act(dense(x))`, `[..., D] -> [..., I]`."""
  features: int
  hidden_act: str
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    return activation(self.hidden_act)(dense_layer(self.features, "dense", self.dtype)(x))


class _BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout: `[B, L] -> [B, L, D]`."""
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, input_ids, token_type_ids, *, train):
    embed = lambda n, name: nn.Embed(n, self.hidden_size, dtype=self.dtype,
                                     param_dtype=jnp.float32,
                                     embedding_init=nn.initializers.normal(0.02), name=name)
    length = input_ids.shape[1]
    x = embed(self.vocab_size, "word_embeddings")(input_ids)
    x = x + embed(self.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = x + embed(self.max_position_embeddings, "position_embeddings")(
        jnp.arange(length)[None, :])
    x = layer_norm(self.layer_norm_eps, "LayerNorm", self.dtype)(x)
    return layers.Dropout(self.dropout)(x, deterministic=not train)


class _BertEncoder(nn.Module):
  """The stack of `layer_{i}` blocks (HF `encoder.layer.{i}`)."""
  num_hidden_layers: int
  layer: Callable[..., BertLayer]  # BertLayer (maybe rematerialised) with all but `name` bound

  @nn.compact
  def __call__(self, x, mask, *, train):
    for i in range(self.num_hidden_layers):
      x = self.layer(name=f"layer_{i}")(x, mask, train)  # positional: static under remat
    return x


class Bert(nn.Module):
  """BERT encoder returning every token (HF `BertModel(...).last_hidden_state`; no pooler).

  Attributes mirror HF `BertConfig` keys; `dtype` is the compute dtype (params stay float32).
  Absolute position embeddings only (HF 5.x has no other kind). `remat` ("none" | "blocks" |
  "dots", `layers.REMAT_POLICIES`) rematerialises each `encoder/layer_{i}` in the backward pass;
  the parameters are the same.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  dtype: Dtype = jnp.float32
  remat: str = "none"

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], dtype: Dtype = jnp.float32,
                  remat: str = "none") -> "Bert":
    """Builds from HF `config.json` keys (missing keys take HF `BertConfig` defaults)."""
    pos_type = cfg.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
      raise ValueError(f"Only absolute BERT position embeddings are supported, got {pos_type!r}.")
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
              "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob")
    return cls(**{k: cfg[k] for k in fields if k in cfg}, dtype=dtype, remat=remat)

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *, train: bool = False) -> jax.Array:
    """Encodes token ids.

    Args:
      input_ids: `[B, L]` int.
      attention_mask: `[B, L]` bool or int, 1/True = real token; None = all valid.
      token_type_ids: `[B, L]` int; None = all zeros (HF default).
      train: enables dropout (needs the `'dropout'` rng).

    Returns:
      `[B, L, hidden_size]` in `dtype`, after the last layer (padding positions included).
    """
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}.")
    if input_ids.shape[1] > self.max_position_embeddings:
      raise ValueError(f"Sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                       f"{self.max_position_embeddings}.")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = None
    if attention_mask is not None:
      mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1(H), 1(Lq), Lk]
    x = _BertEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                        self.type_vocab_size, self.layer_norm_eps, self.hidden_dropout_prob,
                        self.dtype, name="embeddings")(input_ids, token_type_ids, train=train)
    layer = functools.partial(
        layers.remat_block(BertLayer, self.remat, static_argnums=(3,)),
        num_attention_heads=self.num_attention_heads,
        intermediate_size=self.intermediate_size, hidden_act=self.hidden_act,
        layer_norm_eps=self.layer_norm_eps, hidden_dropout_prob=self.hidden_dropout_prob,
        attention_probs_dropout_prob=self.attention_probs_dropout_prob, dtype=self.dtype)
    return _BertEncoder(self.num_hidden_layers, layer, name="encoder")(x, mask, train=train)

