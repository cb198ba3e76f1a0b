"""Evaluator: all-pairs scores equal the model's own single-pair forward; sharded == 1 device."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import tiny
from conftest import REPO
from gseps_jax import evaluator
from gseps_jax import models
from gseps_jax import sharding
from gseps_jax import state as state_lib
from gseps_jax.data import device_augment, pipeline


def _setup(model_name, **over):
  config = tiny.tiny_config(model_name, **over)
  tiny.ensure_data(config)
  model = models.build_model(config.model)
  key = jax.random.key(3)
  params = state_lib.init_params(model, state_lib.sample_batch(config), key, split=False)
  # Move away from the initialisation so selections and adapters are not degenerate.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape, l.dtype)
                                     for l, k in zip(leaves, keys)])
  return config, model, params


def _eval_inputs(ev):
  """The evaluator's inputs, images as the models read them (device augmentation applied), with
  dense captions whether or not the model reads them (the pairwise forward takes them)."""
  kw = dict(global_batch_size=ev.batch_size)
  imgs = [dict(device_augment.images_from_batch(b, ev.config.data), valid=b["valid"])
          for b in pipeline.eval_image_batches(ev.source, ev.tok,
                                               dataclasses.replace(ev.pp, dense=True), **kw)]
  caps = list(pipeline.eval_caption_batches(ev.source, ev.tok, ev.pp, **kw))
  cat = lambda bs, k: np.concatenate([b[k][b["valid"]] for b in bs])
  return ({k: cat(imgs, k) for k in ("image", "dense_ids", "dense_mask")},
          {k: cat(caps, k) for k in ("input_ids", "attention_mask")})


def _pairwise(config, model, params, imgs, caps, dense_mode):
  """Scores from the training forward on one (image, caption) pair at a time (train=False)."""
  fwd = jax.jit(functools.partial(model.apply, train=False))
  ni, nc = len(imgs["image"]), len(caps["input_ids"])
  out = np.zeros((ni, nc), np.float32)
  weights = (dict(config.model.grm.level_weights) if config.model.name == "grm" else {"seps": 1.0})
  for i in range(ni):
    for j in range(nc):
      d = i if dense_mode == "honest" else j // 5  # parity: the caption's own image's dense text
      batch = {"image": imgs["image"][i:i + 1], "input_ids": caps["input_ids"][j:j + 1],
               "attention_mask": caps["attention_mask"][j:j + 1],
               "dense_ids": imgs["dense_ids"][d:d + 1], "dense_mask": imgs["dense_mask"][d:d + 1],
               "image_index": np.zeros(1, np.int32)}
      sims, _ = fwd({"params": params}, batch)
      out[i, j] = sum(w * float(sims[k][0, 0]) for k, w in weights.items())
  return out


@pytest.mark.parametrize("model_name,dense_mode", [("grm", None), ("seps", "honest"),
                                                   ("seps", "parity")])
def test_evaluator_scores_equal_single_pair_forward(model_name, dense_mode):
  # The single-pair path is the model's training forward in eval mode, which follows the
  # model's own dense_mode; no test-time text cut so both paths see the same tokens.
  over = ({"model.seps.eval_text_cut": 0, "model.seps.dense_mode": dense_mode}
          if model_name == "seps" else {})
  config, model, params = _setup(model_name, **over)
  mesh = sharding.make_mesh(config.mesh)
  ev = evaluator.Evaluator(config, model, mesh, split="test", protocol="full",
                          dense_mode=dense_mode or "honest", chunk=3)
  sims = np.asarray(ev.scores(params))
  assert sims.shape == (8, 40)
  imgs, caps = _eval_inputs(ev)
  ref = _pairwise(config, model, params, imgs, caps, dense_mode or "honest")
  np.testing.assert_allclose(sims, ref, rtol=1e-4, atol=1e-4)
  m = ev.run(params)
  assert set(m) >= {"i2t_r1", "t2i_r10", "rsum", "encode_seconds", "score_seconds"}


SCRIPT = r"""
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
import test_evaluate as te
from gseps_jax import evaluator, sharding
assert jax.device_count() == 8
out = {}
for name in ("grm", "seps"):
  config, model, params = te._setup(name)
  res = {}
  for tag, mesh in (("one", sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])),
                    ("eight", sharding.make_mesh({"data": 8, "fsdp": 1}))):
    ev = evaluator.Evaluator(config, model, mesh, split="test", protocol="full", chunk=3,
                            batch_size=8)
    sims = ev.scores(params)
    res[tag] = {"sims": np.asarray(sims).tolist(), "spec": str(sims.sharding.spec)
                if hasattr(sims.sharding, "spec") else "", "metrics": ev.run(params)}
  out[name] = res
print("RESULT " + json.dumps(out))
"""


def test_evaluate_on_8_devices_matches_one_device():
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  for name, res in out.items():
    np.testing.assert_allclose(res["eight"]["sims"], res["one"]["sims"], rtol=1e-5, atol=1e-6)
    assert "data" in res["eight"]["spec"], res["eight"]["spec"]  # rows stay sharded
    for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum", "i2t_meanr", "t2i_meanr"):
      assert res["eight"]["metrics"][k] == pytest.approx(res["one"]["metrics"][k]), (name, k)
