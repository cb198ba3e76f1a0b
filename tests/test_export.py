"""Export to PyTorch and back (gseps_jax/export.py, gseps_jax/torch_export/gseps_torch.py).

* hf export of tiny GRM and SEPS checkpoints (random, non-trivial params after two AdamW steps):
  the encoders load with `transformers.*Model.from_pretrained`, the heads with the exported
  gseps_torch.py, and the PyTorch scores of images x captions equal our `score` to 1e-4 (both
  SEPS dense modes, parity with the text cut active).
* official -> ours -> official round trip of an official-layout state dict built from HF torch
  models (independent of our name tables), bit-exact on every tensor but the HF poolers.
* Clear errors: nonexistent checkpoint, unknown model type, official export of GRM, state dicts
  with missing / unexpected / mis-shaped tensors (all listed), and nothing half-written.
"""

import argparse
import functools
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.torch
import torch
import transformers

import tiny
from configs import grm_swin, grm_vit, laps_vit, seps_swin, seps_vit
from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import export
from gseps_jax import fileio
from gseps_jax import models
from gseps_jax import optim
from gseps_jax import state as state_lib
from gseps_jax.interop import common as interop_common
from gseps_jax.interop import official_seps
from gseps_jax.data import tokenizer as tok_lib

NI, CPI = 3, 2  # images, captions per image
ATOL = 1e-4


# ----------------------------------------------------------------------------------------------
# Fixtures: tiny checkpoints with non-trivial parameters.
# ----------------------------------------------------------------------------------------------
def random_params(shapes, seed):
  """Params of the given tree with values far from any default init (a transposed or misnamed
  tensor changes the scores): N(0, 0.1) everywhere, LayerNorm-like scales 1 + N(0, 0.1), region
  prompts N(0, 1)."""
  rng = np.random.default_rng(seed)

  def one(path, s):
    name = path[-1].key
    x = rng.normal(0.0, 0.1, s.shape)
    if name == "scale":
      x = 1.0 + x
    elif name == "prompts":
      x = rng.normal(0.0, 1.0, s.shape)
    return np.asarray(x, np.float32)

  return jax.tree_util.tree_map_with_path(one, shapes)


def make_checkpoint(workdir, config, seed, steps=2):
  """Random params, then `steps` updates of the trainer's optimiser on random gradients; saved
  as the trainer saves. Returns the saved params (numpy)."""
  params = random_params(interop_common.abstract_params(config), seed)
  tx, _, _ = optim.make_optimizer(config.optim, 10, params)
  rng = np.random.default_rng(seed + 1)

  @jax.jit  # one compile instead of op-by-op dispatch over every leaf
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = jax.jit(tx.init)(params)
  for _ in range(steps):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    params, opt_state = update(params, opt_state, grads)
  params = jax.tree.map(np.asarray, params)
  state = state_lib.TrainState(step=jnp.asarray(steps, jnp.int32), params=params,
                             opt_state=opt_state)
  ckpt = ckpt_lib.Checkpointer(workdir, best_metric=None, async_save=False)
  ckpt.save(steps, state, {"config": config.to_dict(),
                           "fingerprint": ckpt_lib.fingerprint(config)})
  ckpt.close()
  return params


def make_inputs(config, seed):
  """Images [NI, H, W, 3], captions [NI*CPI, L] with varied lengths, dense captions [NI, Ld]
  (some longer than SEPS's tiny eval_text_cut of 20, so the parity cut matters)."""
  return tiny.random_inputs(config, seed, NI, [5, 16, 9, 3, 12, 7][:NI * CPI], [24, 14, 22][:NI])


def load_torch_module(export_dir):
  """The gseps_torch.py COPIED INTO the export (not the package's), under a unique name.

  Compiled from its source text rather than imported: an import writes `__pycache__/` beside the
  file (unless PYTHONDONTWRITEBYTECODE is set, as on CI but not on users' machines), and the
  export directory's exact listing is under test."""
  name = f"gseps_torch_{abs(hash(str(export_dir)))}"
  path = export_dir / "gseps_torch.py"
  mod = types.ModuleType(name)
  mod.__file__ = str(path)
  sys.modules[name] = mod  # dataclasses and pickling look the module up by name
  exec(compile(path.read_text(), str(path), "exec"), mod.__dict__)  # pylint: disable=exec-used
  return mod


def jax_features(config, params, inputs):
  """Our features of `inputs` (jitted: one compile beats op-by-op dispatch of a whole encoder)."""
  model = models.build_model(config.model)
  images, (ids, mask), (dids, dmask) = inputs
  v = {"params": params}
  enc_img = jax.jit(functools.partial(model.apply, method="encode_images"))
  enc_txt = jax.jit(functools.partial(model.apply, method="encode_texts"))
  return model, enc_img(v, images), enc_txt(v, ids, mask), enc_txt(v, dids, dmask)


def torch_features(model, inputs):
  images, (ids, mask), (dids, dmask) = inputs
  t = lambda a: torch.from_numpy(np.asarray(a, np.int64))
  with torch.no_grad():
    img = model.encode_images(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    return img, model.encode_texts(t(ids), t(mask)), model.encode_texts(t(dids), t(dmask))


class Exported:
  """One tiny checkpoint, its export, and both sides' features of the same inputs."""

  def __init__(self, tmp_path_factory, config, seed, fmt):
    self.config = config
    self.workdir = tmp_path_factory.mktemp(f"{config.model.name}_run")
    self.params = make_checkpoint(self.workdir, config, seed=seed)
    self.out = export.export(self.workdir / "checkpoints" / "2",
                             tmp_path_factory.mktemp("x") / f"{config.model.name}_{fmt}",
                             format=fmt)
    self.inputs = make_inputs(config, seed=seed + 10)
    self.model, self.img, self.txt, self.dense = jax_features(config, self.params, self.inputs)
    self.tmod = load_torch_module(self.out)
    self.tmodel = self.tmod.load(str(self.out))
    self.timg, self.ttxt, self.tdense = torch_features(self.tmodel, self.inputs)

    self._score = jax.jit(functools.partial(self.model.apply, method="score"),
                          static_argnames=("dense_mode", "chunk"))

  def jax_score(self, **kw):
    return np.asarray(self._score({"params": self.params}, self.img, self.txt, self.dense, **kw))


@pytest.fixture(scope="module")
def grm(tmp_path_factory):
  return Exported(tmp_path_factory, grm_vit.get_config("tiny"), seed=0, fmt="hf")


@pytest.fixture(scope="module")
def seps(tmp_path_factory):
  return Exported(tmp_path_factory, seps_vit.get_config("tiny"), seed=1, fmt="both")


# ----------------------------------------------------------------------------------------------
# hf export: score parity with PyTorch.
# ----------------------------------------------------------------------------------------------
def test_grm_hf_export_scores_match_pytorch(grm):
  assert sorted(p.name for p in grm.out.iterdir()) == [
      "README.md", "gseps_torch.py", "heads.safetensors", "metadata.json", "text_encoder",
      "vision_encoder"]
  img, txt = grm.img, grm.txt
  # The key level is only a real test if the adapters keep some tokens and drop others.
  ik, tk = np.asarray(img["key_mask"]), np.asarray(txt["key_mask"])
  assert 0 < ik.sum() < ik.size and 0 < tk.sum() < np.asarray(txt["ori_mask"]).sum()
  np.testing.assert_array_equal(grm.timg["key_mask"].numpy(), ik)
  np.testing.assert_array_equal(grm.ttxt["key_mask"].numpy(), tk)
  with torch.no_grad():
    got = grm.tmodel.score(grm.timg, grm.ttxt).numpy()
    levels = {k: v.numpy() for k, v in grm.tmodel.level_scores(grm.timg, grm.ttxt).items()}
  ours = grm.model.apply({"params": grm.params}, img, txt, method="level_scores")
  for k in ("ori", "key", "unc"):
    np.testing.assert_allclose(levels[k], np.asarray(ours[k]), atol=ATOL, rtol=0)
  want = grm.jax_score(chunk=2)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  assert want.shape == (NI, NI * CPI) and np.ptp(want) > 1e-3  # scores are not all equal


@pytest.mark.parametrize("mode", ["honest", "parity"])
def test_seps_hf_export_scores_match_pytorch(seps, mode):
  caption_image = np.arange(NI * CPI) // CPI
  want = seps.jax_score(dense_mode=mode, chunk=None, caption_image=caption_image)
  with torch.no_grad():
    got = seps.tmodel.score(seps.timg, seps.ttxt, seps.tdense, dense_mode=mode,
                            caption_image=torch.from_numpy(caption_image)).numpy()
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  assert want.shape == (NI, NI * CPI) and np.ptp(want) > 1e-3


@pytest.mark.parametrize("get_config", [grm_swin.get_config, seps_swin.get_config],
                         ids=["grm_swin", "seps_swin"])
def test_swin_hf_export_scores_match_pytorch(get_config, tmp_path_factory):
  """Swin backbones (no CLS; 8x8 tokens after one patch merging) in the exported PyTorch heads."""
  config = get_config("tiny")
  ex = Exported(tmp_path_factory, config, seed=7, fmt="hf")
  assert ex.config.model.vision.model_type == "swin"
  meta = json.loads((ex.out / "metadata.json").read_text())
  assert json.loads((ex.out / "vision_encoder" / "config.json").read_text())["model_type"] == "swin"
  ci = np.arange(NI * CPI) // CPI
  kw = (dict(chunk=2) if config.model.name == "grm" else
        dict(chunk=None, dense_mode="honest", caption_image=ci))
  want = ex.jax_score(**kw)
  with torch.no_grad():
    if config.model.name == "grm":
      got = ex.tmodel.score(ex.timg, ex.ttxt).numpy()
    else:
      got = ex.tmodel.score(ex.timg, ex.ttxt, ex.tdense, dense_mode="honest",
                            caption_image=torch.from_numpy(ci)).numpy()
  assert want.shape == (NI, NI * CPI) and np.ptp(want) > 1e-3, meta
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_seps_parity_text_cut_is_exercised(seps):
  """Ignoring the 20-token parity cut changes the scores, so the parity test above checks it."""
  ci = torch.arange(NI * CPI) // CPI
  heads = seps.tmodel.meta["heads"]
  with torch.no_grad():
    cut = seps.tmodel.score(seps.timg, seps.ttxt, seps.tdense, dense_mode="parity",
                            caption_image=ci)
    saved, heads["eval_text_cut"] = heads["eval_text_cut"], 0
    try:
      uncut = seps.tmodel.score(seps.timg, seps.ttxt, seps.tdense, dense_mode="parity",
                                caption_image=ci)
    finally:
      heads["eval_text_cut"] = saved
  assert float((cut - uncut).abs().max()) > 1e-4


def test_hf_directories_load_with_transformers(seps):
  config, out = seps.config, seps.out
  assert (out / interop_common.OFFICIAL_FILE).is_file()  # format=both
  # Every saved tensor is consumed and every weight is found (nothing freshly initialised).
  for cls, sub, cfg in ((transformers.ViTModel, "vision_encoder", config.model.vision),
                        (transformers.BertModel, "text_encoder", config.model.text)):
    m, info = cls.from_pretrained(out / sub, add_pooling_layer=False, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), \
        info
    assert m.config.hidden_size == cfg.hidden_size
    assert m.config.num_hidden_layers == cfg.num_hidden_layers
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["model_type"] == "seps" and meta["dense_mode"] == config.eval.dense_mode
  assert meta["heads"]["num_aggregated"] == 3 and meta["image_size"] == 64 and meta["step"] == 2
  # Tokenizer: same ids as our data pipeline's tokenizer; a common word is not [UNK].
  hf_tok = seps.tmod.load_tokenizer(str(out))
  texts = ["A man rides a red bicycle past two dogs.", "zebra"]
  ids, mask = seps.tmod.tokenize(hf_tok, texts, config.data.max_len)
  ours = tok_lib.load_tokenizer(out / "text_encoder").encode_batch(texts, config.data.max_len)
  np.testing.assert_array_equal(ids.numpy(), ours[0])
  np.testing.assert_array_equal(mask.numpy(), ours[1])
  assert hf_tok.unk_token_id not in ids[0].tolist()
  auto = transformers.AutoTokenizer.from_pretrained(out / "text_encoder")
  assert auto.convert_tokens_to_ids(auto.tokenize("man")) == hf_tok.convert_tokens_to_ids(["man"])


# ----------------------------------------------------------------------------------------------
# Official layout.
# ----------------------------------------------------------------------------------------------
def official_state_dict(config, tmp_dir, seed=0):
  """A random official-layout SEPS state dict built WITHOUT our name tables: HF torch ViT/BERT
  state dicts (poolers included, as the official model saves them) under the official prefixes,
  plus the head tensors with the shapes of the official modules (Linear [out, in], TokenAggregation
  scale [1, 1, 1], hidden int(0.2 D), N_c = int(num_patches * alpha * rho))."""
  torch.manual_seed(seed)
  mc = config.model
  sd = {}
  # save_pretrained writes the checkpoint names of the hub (and of the official .pth); the
  # in-memory module names of transformers 5 differ (e.g. ViT `layers.0.attention.q_proj`).
  for model, prefix in (
      (transformers.ViTModel(transformers.ViTConfig(**mc.vision.to_dict())),
       "img_enc.visual_encoder."),
      (transformers.BertModel(transformers.BertConfig(**mc.text.to_dict())), "txt_enc.bert.")):
    d = tmp_dir / prefix.rstrip(".")
    model.save_pretrained(d)
    sd.update({prefix + k: v for k, v in safetensors.torch.load_file(d / "model.safetensors")
               .items()})
  n_c = int((64 // 16) ** 2 * mc.seps.alpha * mc.seps.rho)
  shapes = tiny.official_head_shapes(mc.embed_dim, 64, 64, n_c)
  sd.update({k: torch.randn(s) for k, s in shapes.items()})
  return {k: v.clone() for k, v in sd.items()}


def save_official(path, sd, epoch=7):
  opt = argparse.Namespace(**dict(official_seps.OFFICIAL_OPT_DEFAULTS, embed_size=32,
                                  num_patches=16))
  torch.save({"model": sd, "opt": opt, "epoch": epoch, "best_rsum": 123.5, "Eiters": 99}, path)


@pytest.mark.parametrize("get_config", [seps_vit.get_config, laps_vit.get_config],
                         ids=["seps", "laps"])
def test_official_round_trip_is_bit_exact(tmp_path, get_config):
  config = get_config("tiny")
  sd = official_state_dict(config, tmp_path)
  pth = tmp_path / "model_best.pth"
  save_official(pth, sd)
  workdir = export.import_official(pth, config, tmp_path / "imported")
  # evaluate/train restore it through the trainer's own path (fingerprint checked).
  _, _, params, step = state_lib.restore_params(workdir)
  assert step == 0
  _, _, meta = ckpt_lib.load_config_from_checkpoint(workdir)
  assert meta["official"]["epoch"] == 7 and meta["official"]["best_rsum"] == 123.5
  np.testing.assert_array_equal(
      np.asarray(params["cross_net"]["aggr_net"]["fc2"]["kernel"]),
      sd["cross_net.aggr_net.weight.3.weight"].numpy().T)

  pth2 = export.export_official(workdir, tmp_path / "back")
  with torch.serialization.safe_globals([argparse.Namespace]):
    back = torch.load(pth2, map_location="cpu", weights_only=True)
  assert set(back) == {"model", "opt", "epoch", "best_rsum", "Eiters"}
  assert back["epoch"] == 7 and back["Eiters"] == 0
  opt = back["opt"]
  assert isinstance(opt, argparse.Namespace)
  assert (opt.embed_size, opt.sparse_ratio, opt.aggr_ratio, opt.vit_type, opt.num_patches) == (
      32, 0.5, 0.4, "vit", 16)
  dropped = sorted(set(sd) - set(back["model"]))
  assert dropped == sorted(k for k in sd if ".pooler." in k) and dropped
  assert set(back["model"]) <= set(sd)
  for k, v in back["model"].items():
    assert v.dtype == sd[k].dtype and v.shape == sd[k].shape, k
    assert torch.equal(v, sd[k]), k


def test_official_import_lists_every_bad_tensor(tmp_path):
  config = seps_vit.get_config("tiny")
  sd = official_state_dict(config, tmp_path)
  del sd["cross_net.aggr_net.weight.1.bias"]
  del sd["img_enc.visual_encoder.encoder.layer.0.output.dense.bias"]
  sd["cross_net.extra.weight"] = torch.zeros(3)
  sd["txt_enc.fc.weight"] = torch.zeros(32, 65)
  sd["cross_net.aggr_net.weight.3.weight"] = torch.zeros(4, 6)
  pth = tmp_path / "bad.pth"
  save_official(pth, sd)
  with pytest.raises(interop_common.ExportError) as e:
    export.import_official(pth, config, tmp_path / "out")
  msg = str(e.value)
  for name in ("cross_net.aggr_net.weight.1.bias",
               "img_enc.visual_encoder.encoder.layer.0.output.dense.bias",
               "cross_net.extra.weight", "txt_enc.fc.weight", "cross_net.aggr_net.weight.3.weight"):
    assert name in msg, (name, msg)
  assert "Missing" in msg and "Unexpected" in msg and "shape" in msg
  assert not (tmp_path / "out").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left


class NotAllowed:
  """An arbitrary class: loading it needs unrestricted unpickling."""


def test_official_import_refuses_other_pickles(tmp_path):
  pth = tmp_path / "evil.pth"
  torch.save({"model": {}, "opt": NotAllowed()}, pth)
  with pytest.raises(interop_common.ExportError, match="trust_pickle"):
    official_seps.load_official(pth)


# ----------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------
def test_nonexistent_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export.export_hf(tmp_path / "no_such_run", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_unknown_model_type_is_a_clear_error(tmp_path):
  config = seps_vit.get_config("tiny")
  config.model.name = "clip"
  state = state_lib.TrainState(step=jnp.asarray(1, jnp.int32), params={"w": np.zeros(2)},
                             opt_state=())
  ckpt = ckpt_lib.Checkpointer(tmp_path / "run", best_metric=None, async_save=False)
  ckpt.save(1, state, {"config": config.to_dict(), "fingerprint": {}})
  ckpt.close()
  for fmt in export.FORMATS:
    with pytest.raises(interop_common.ExportError, match=r"Unknown model type 'clip'.*grm.*seps"):
      export.export(tmp_path / "run", tmp_path / "out", format=fmt)
  assert not (tmp_path / "out").exists()


def test_official_export_of_grm_is_an_error(grm, tmp_path):
  workdir = grm.workdir
  for fmt in ("official", "both"):
    with pytest.raises(interop_common.ExportError, match="SEPS/LAPS only"):
      export.export(workdir, tmp_path / "out", format=fmt)
  assert not (tmp_path / "out").exists()
  with pytest.raises(interop_common.ExportError, match="SEPS/LAPS config"):
    export.import_official(tmp_path / "x.pth", grm_vit.get_config("tiny"), tmp_path / "out")


def test_outputs_are_atomic(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(RuntimeError):
    with fileio.atomic_dir(out) as tmp:
      (tmp / "half.bin").write_bytes(b"x")
      raise RuntimeError("killed mid-write")
  assert list(tmp_path.iterdir()) == []
  with fileio.atomic_dir(out) as tmp:
    (tmp / "a").write_text("1")
  with pytest.raises(FileExistsError, match="--overwrite"):
    with fileio.atomic_dir(out):
      pass
  with fileio.atomic_dir(out, overwrite=True) as tmp:
    (tmp / "b").write_text("2")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert sorted(p.name for p in out.iterdir()) == ["b"]
