"""Encoder pieces and helpers: bicubic resize vs torch, token counts, configs, bf16, dropout.

Parity of whole encoders with HF PyTorch models lives in tests/test_hf_import.py.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import common
from gseps_jax.models.encoders import (ENCODERS, encoder_from_config, encoder_grid,
                                       encoder_num_tokens, encoder_width)
from gseps_jax.models.swin import Swin
from gseps_jax.models.vit import bicubic_matrix, interpolate_pos_encoding, resize_bicubic


@pytest.mark.parametrize("src,dst", [((4, 4), (6, 6)), ((14, 14), (24, 24)), ((14, 14), (37, 11)),
                                     ((7, 7), (2, 3)), ((2, 2), (9, 9)), ((3, 3), (1, 1))])
def test_bicubic_matches_torch_interpolate(src, dst):
  x = np.random.default_rng(0).normal(size=(*src, 5)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=dst, mode="bicubic",
                       align_corners=False)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(np.asarray(resize_bicubic(jnp.asarray(x), dst)), want, atol=2e-5)


def test_bicubic_matrix_rows_sum_to_one_and_same_size_is_identity():
  np.testing.assert_allclose(bicubic_matrix(7, 12).sum(1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(bicubic_matrix(5, 5), np.eye(5, dtype=np.float32))
  pos = jnp.arange(1 * 17 * 3, dtype=jnp.float32).reshape(1, 17, 3)
  assert interpolate_pos_encoding(pos, (4, 4)) is pos
  out = interpolate_pos_encoding(pos, (2, 6))
  assert out.shape == (1, 13, 3)
  np.testing.assert_array_equal(out[:, 0], pos[:, 0])  # CLS position untouched


@pytest.mark.parametrize("cfg,size,tokens,width", [
    (common.VIT_B16, 224, 197, 768), (common.VIT_B16, 384, 577, 768),
    (common.SWIN_B, 224, 49, 1024), (dict(common.SWIN_B, window_size=12, image_size=384), 384,
                                     144, 1024),
    (common.VIT_TINY, 64, 17, 64), (common.SWIN_TINY, 64, 64, 64)])
def test_token_count_and_width_helpers(cfg, size, tokens, width):
  assert encoder_num_tokens(cfg, size) == tokens
  assert encoder_width(cfg) == width
  assert encoder_width(ml_collections.ConfigDict(cfg)) == width


@pytest.mark.parametrize("cfg", [common.VIT_B16, common.SWIN_B])
def test_helpers_agree_with_full_size_module_shapes(cfg):
  # Abstract evaluation only: checks the real ViT-B/Swin-B graphs without running them.
  module = encoder_from_config(ml_collections.ConfigDict(cfg))
  x = jnp.zeros((1, 224, 224, 3))
  out, _ = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), x))
  assert out.shape == (1, encoder_num_tokens(cfg), encoder_width(cfg))


def test_swin_odd_sizes_match_helper():
  module = encoder_from_config(common.SWIN_TINY)
  for size in (50, 70):  # not multiples of patch or window
    x = jnp.zeros((1, size, size + 6, 3))
    out, _ = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), x))
    gh, gw = encoder_grid(common.SWIN_TINY, (size, size + 6))
    assert out.shape == (1, gh * gw, 64)


def test_swin_map_smaller_than_window_is_a_clear_error():
  module = Swin(embed_dim=8, depths=(2,), num_heads=(2,), window_size=7, patch_size=(4, 4))
  with pytest.raises(ValueError, match="feature map 6x6 is smaller than window_size 7"):
    jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 24, 24, 3))))


def test_config_errors():
  with pytest.raises(ValueError, match="Unknown encoder model_type 'gpt2'"):
    encoder_from_config({"model_type": "gpt2"})
  with pytest.raises(ValueError, match="encoder_grid needs a vision encoder"):
    encoder_num_tokens(common.BERT_BASE, 224)
  with pytest.raises(ValueError, match="Unsupported hidden_act 'mish'"):
    m = encoder_from_config(dict(common.BERT_TINY, hidden_act="mish"))
    jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))


# Smallest configs that still cover each code path (compiles dominate the test time).
TINY = {"vit": dict(common.VIT_TINY, num_hidden_layers=1),
        "swin": dict(common.SWIN_TINY, depths=[2], num_heads=[2], drop_path_rate=0.5),
        "bert": dict(common.BERT_TINY, num_hidden_layers=1)}


def _random_params(module, inputs, seed):
  """Random params of the module's shapes (LayerNorm scales near 1), without compiling init."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  leaves = [(1.0 if kp[-1].key == "scale" else 0.0) + rng.normal(0, 0.1, s.shape)
            for kp, s in flat]
  return jax.tree.unflatten(jax.tree.structure(shapes), [np.float32(x) for x in leaves])


@pytest.fixture(scope="module")
def tiny_models():
  """name -> (jitted fp32 apply, jitted bf16 apply, params, inputs)."""
  rng = np.random.default_rng(0)
  img = jnp.asarray(rng.normal(size=(2, 40, 40, 3)), jnp.float32)  # Swin: 10x10 map, padded to 12
  ids = jnp.asarray(rng.integers(0, 1000, size=(2, 8)), jnp.int32)
  mask = jnp.asarray(np.arange(8)[None] < np.array([[8], [5]]))
  out = {}
  for name, inputs in [("vit", (img,)), ("swin", (img,)), ("bert", (ids, mask))]:
    m32 = encoder_from_config(ml_collections.ConfigDict(TINY[name]))
    m16 = encoder_from_config(TINY[name], dtype="bfloat16")
    assert isinstance(m32, ENCODERS[name]) and m16.dtype == jnp.bfloat16
    # Params from a bf16 module stay float32.
    p16 = jax.eval_shape(m16.init, jax.random.key(1), *inputs)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(p16))
    out[name] = (jax.jit(m32.apply, static_argnames="train"), jax.jit(m16.apply),
                 _random_params(m32, inputs, seed=1), inputs)
  return out


@pytest.mark.parametrize("name", ["vit", "swin", "bert"])
def test_bf16_forward_is_close_to_fp32(tiny_models, name):
  apply32, apply16, params, inputs = tiny_models[name]
  y32 = apply32({"params": params}, *inputs)
  y16 = apply16({"params": params}, *inputs)
  assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  assert y32.shape == y16.shape
  err = np.abs(np.asarray(y16, np.float32) - np.asarray(y32))
  # Outputs are LayerNorm-ed (unit scale); bf16 has ~3 significant digits.
  assert err.mean() < 0.03 and err.max() < 0.3, (err.mean(), err.max())


def _key(seed):
  # 'rbg' keys compile much faster on CPU than threefry; the dropout logic is the same.
  return jax.random.key(seed, impl="rbg")


@pytest.mark.parametrize("name", ["bert", "swin"])  # BERT: dropout 0.1; Swin: drop path 0.5
def test_dropout_only_in_train_mode(tiny_models, name):
  apply, _, params, inputs = tiny_models[name]
  eval_out = apply({"params": params}, *inputs)  # train=False is the default
  a = apply({"params": params}, *inputs, train=True, rngs={"dropout": _key(0)})
  b = apply({"params": params}, *inputs, train=True, rngs={"dropout": _key(0)})
  np.testing.assert_array_equal(a, b)
  # Swin drops whole branches per sample (2 samples x 2 blocks), so two keys may agree by chance.
  others = [apply({"params": params}, *inputs, train=True, rngs={"dropout": _key(k)})
            for k in range(1, 5)]
  assert max(np.abs(np.asarray(a - c)).max() for c in others) > 1e-2
  assert np.abs(np.asarray(a - eval_out)).max() > 1e-2

