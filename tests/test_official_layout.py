"""The official SEPS checkpoint layout, checked by MEANING (not by round trip).

An independent PyTorch reference of the official model, written from the official code's module definitions, reads an
official state dict BY NAME: `img_enc.visual_encoder.*` into a HF `ViTModel` / `SwinModel` (loaded
by transformers itself from the hub checkpoint names), `img_enc.vision_proj` and `txt_enc.fc` into
`torch.nn.Linear`, `txt_enc.bert.*` into a HF `BertModel`, and `cross_net.aggr_net.*` (LayerNorm
`weight.0`, Linear `weight.1`, GELU, Linear `weight.3`, `scale`) into the float64 SEPS head of
tests/seps_reference.py. Its scores must equal ours:

* import: a random official state dict -> `export.import_official` -> our checkpoint scores;
* export: our random checkpoint -> `export.export_official` (`model_best.pth`) -> the reference.

Equal shapes make a swap invisible to a round trip: `img_enc.vision_proj.weight` and
`txt_enc.fc.weight` are both [embed, 64] in the tiny configs (and the LayerNorm weight and bias
both [embed]); each test checks that the reference sees such a swap. ViT (with CLS) and Swin (no
CLS) backbones, honest dense mode.
"""

import argparse
import functools
import json

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import seps_reference as ref
import tiny
from configs import seps_swin, seps_vit
from gseps_jax import export
from gseps_jax import models
from gseps_jax import state as state_lib
from gseps_jax.interop import official_seps

NI, CPI = 3, 2
ATOL = 1e-4  # fp32 encoders on both sides, float64 head in the reference
HF = {"vit": (transformers.ViTConfig, transformers.ViTModel),
      "swin": (transformers.SwinConfig, transformers.SwinModel),
      "bert": (transformers.BertConfig, transformers.BertModel)}


# ----------------------------------------------------------------------------- the reference


def _hf_from_state_dict(sd, prefix, cfg, tmp_dir):
  """A HF model whose weights are the `prefix.*` entries of `sd`, loaded by transformers from
  their checkpoint names (poolers dropped); every weight must be found and used."""
  config_cls, model_cls = HF[cfg["model_type"]]
  sub = {k[len(prefix):]: torch.as_tensor(np.asarray(v)).contiguous() for k, v in sd.items()
         if k.startswith(prefix) and ".pooler." not in k}
  d = tmp_dir / prefix.strip(".").replace(".", "_")
  d.mkdir(parents=True, exist_ok=True)
  config_cls(**cfg).save_pretrained(d)
  safetensors.torch.save_file(sub, str(d / "model.safetensors"))
  model, info = model_cls.from_pretrained(d, add_pooling_layer=False, output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model.eval()


def _linear(sd, name):
  w = torch.as_tensor(np.asarray(sd[name + ".weight"]))
  lin = torch.nn.Linear(w.shape[1], w.shape[0])
  with torch.no_grad():
    lin.weight.copy_(w)
    lin.bias.copy_(torch.as_tensor(np.asarray(sd[name + ".bias"])))
  return lin


class OfficialReference:
  """The official model's scoring from an official state dict, by name."""

  def __init__(self, sd, config, tmp_dir):
    mc = config.model
    self.vision = _hf_from_state_dict(sd, "img_enc.visual_encoder.", mc.vision.to_dict(),
                                      tmp_dir)
    self.bert = _hf_from_state_dict(sd, "txt_enc.bert.", mc.text.to_dict(), tmp_dir)
    self.vision_proj = _linear(sd, "img_enc.vision_proj")
    self.fc = _linear(sd, "txt_enc.fc")
    f64 = lambda k: np.asarray(sd[f"cross_net.aggr_net.{k}"], np.float64)
    self.head = dict(ln_w=f64("weight.0.weight"), ln_b=f64("weight.0.bias"),
                     w1=f64("weight.1.weight"), b1=f64("weight.1.bias"),
                     w2=f64("weight.3.weight"), b2=f64("weight.3.bias"),
                     scale=float(f64("scale").reshape(())))
    self.rho = float(mc.seps.rho)

  @torch.no_grad()
  def scores(self, images, caps, dense):
    (ids, mask), (dids, dmask) = caps, dense
    img = self.vision_proj(self.vision(
        torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).last_hidden_state)
    text = lambda i, m: self.fc(self.bert(torch.from_numpy(i.astype(np.int64)),
                                          attention_mask=torch.from_numpy(m.astype(np.int64))
                                          ).last_hidden_state)
    cap, den = text(ids, mask), text(dids, dmask)
    f64 = lambda t: t.numpy().astype(np.float64)
    return ref.seps_scores(f64(img), f64(cap), mask.sum(1), f64(den), dmask.sum(1), self.head,
                           self.rho, mode="honest")


# ----------------------------------------------------------------------------- our side


def _inputs(config, seed):
  return tiny.random_inputs(config, seed, NI, [5, 16, 9, 3, 12, 7], [19, 11, 20])


def _our_scores(config, params, inputs):
  model = models.build_model(config.model)
  images, (ids, mask), (dids, dmask) = inputs
  v = {"params": params}
  img = jax.jit(functools.partial(model.apply, method="encode_images"))(v, images)
  enc = jax.jit(functools.partial(model.apply, method="encode_texts"))
  score = jax.jit(functools.partial(model.apply, method="score"),
                  static_argnames=("dense_mode", "chunk"))
  return np.asarray(score(v, img, enc(v, ids, mask), enc(v, dids, dmask), dense_mode="honest",
                          chunk=None))


def _perturbed_hf_state_dict(cfg, prefix, tmp_dir, seed):
  """A HF model's checkpoint (hub names, poolers included as the official .pth has them) with
  every tensor perturbed, so zero biases and unit LayerNorms are not special."""
  config_cls, model_cls = HF[cfg["model_type"]]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**cfg))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape))
  d = tmp_dir / f"src_{prefix.strip('.')}"
  model.save_pretrained(d)
  return {prefix + k: v for k, v in safetensors.torch.load_file(d / "model.safetensors").items()}


def random_official_state_dict(config, tmp_dir, seed=0):
  mc = config.model
  sd = {}
  sd.update(_perturbed_hf_state_dict(mc.vision.to_dict(), "img_enc.visual_encoder.", tmp_dir,
                                     seed))
  sd.update(_perturbed_hf_state_dict(mc.text.to_dict(), "txt_enc.bert.", tmp_dir, seed + 1))
  # Head shapes from the official module definitions, not from our tables.
  e = int(mc.embed_dim)
  vw = (mc.vision.hidden_size if mc.vision.model_type == "vit"
        else mc.vision.embed_dim * 2 ** (len(mc.vision.depths) - 1))
  n_c = int(_num_patches(config) * mc.seps.alpha * mc.seps.rho)
  g = torch.Generator().manual_seed(seed + 2)
  shapes = tiny.official_head_shapes(e, vw, mc.text.hidden_size, n_c)
  for k, s in shapes.items():
    sd[k] = 0.3 * torch.randn(s, generator=g)
  sd["cross_net.aggr_net.weight.0.weight"] += 1.0
  sd["cross_net.aggr_net.scale"] = torch.full((1, 1, 1), 1.7)
  return sd


def _num_patches(config):
  v, size = config.model.vision, config.data.image_size
  n = size // v.patch_size
  if v.model_type == "swin":
    n //= 2 ** (len(v.depths) - 1)
  return n * n


def _swap(sd, a, b):
  out = dict(sd)
  out[a], out[b] = sd[b], sd[a]
  return out


SWAPS = (("img_enc.vision_proj.weight", "txt_enc.fc.weight"),
         ("cross_net.aggr_net.weight.0.weight", "cross_net.aggr_net.weight.0.bias"))


def _assert_reference_sees_swaps(sd, config, tmp_dir, inputs, ours):
  for a, b in SWAPS:
    swapped = OfficialReference(_swap(sd, a, b), config, tmp_dir / "swapped").scores(*inputs)
    assert np.abs(swapped - ours).max() > 100 * ATOL, (a, b)


CONFIGS = {"vit": lambda: seps_vit.get_config("tiny"), "swin": lambda: seps_swin.get_config("tiny")}


@pytest.mark.parametrize("backbone", sorted(CONFIGS))
def test_import_official_scores_like_the_reference(backbone, tmp_path):
  config = CONFIGS[backbone]()
  sd = random_official_state_dict(config, tmp_path, seed=3)
  pth = tmp_path / "model_best.pth"
  opt = argparse.Namespace(**dict(official_seps.OFFICIAL_OPT_DEFAULTS,
                                  embed_size=config.model.embed_dim,
                                  num_patches=_num_patches(config)))
  torch.save({"model": sd, "opt": opt, "epoch": 1, "best_rsum": 0.0, "Eiters": 5}, pth)
  workdir = export.import_official(pth, config, tmp_path / "imported")
  _, _, params, _ = state_lib.restore_params(workdir)
  inputs = _inputs(config, seed=4)
  ours = _our_scores(config, params, inputs)
  want = OfficialReference({k: v.numpy() for k, v in sd.items()}, config,
                           tmp_path / "ref").scores(*inputs)
  assert ours.shape == (NI, NI * CPI) and np.ptp(want) > 1e-2
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)
  _assert_reference_sees_swaps({k: v.numpy() for k, v in sd.items()}, config, tmp_path, inputs,
                               ours)


@pytest.mark.parametrize("backbone", sorted(CONFIGS))
def test_export_official_loads_by_name_into_the_reference(backbone, tmp_path):
  config = CONFIGS[backbone]()
  params = tiny.random_checkpoint(tmp_path / "run", config, seed=5)
  pth = export.export_official(tmp_path / "run", tmp_path / "out")
  with torch.serialization.safe_globals([argparse.Namespace]):
    saved = torch.load(pth, map_location="cpu", weights_only=True)
  assert saved["opt"].vit_type == ("swin" if backbone == "swin" else "vit")
  sd = {k: v.numpy() for k, v in saved["model"].items()}
  inputs = _inputs(config, seed=6)
  ours = _our_scores(config, params, inputs)
  want = OfficialReference(sd, config, tmp_path / "ref").scores(*inputs)
  assert np.ptp(want) > 1e-2
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)
  _assert_reference_sees_swaps(sd, config, tmp_path, inputs, ours)
  # Every tensor the official model has is there under its name (poolers aside): the reference
  # consumed each one (from_pretrained reported nothing missing or unexpected) and no extra one.
  heads = {k for k in sd if not k.startswith(("img_enc.visual_encoder.", "txt_enc.bert."))}
  assert heads == {"img_enc.vision_proj.weight", "img_enc.vision_proj.bias", "txt_enc.fc.weight",
                   "txt_enc.fc.bias", "cross_net.aggr_net.scale",
                   *(f"cross_net.aggr_net.weight.{i}.{w}" for i in (0, 1, 3)
                     for w in ("weight", "bias"))}
  json.dumps(vars(saved["opt"]), default=str)  # the opt namespace is plain data
