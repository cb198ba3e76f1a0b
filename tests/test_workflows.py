"""User workflows beyond training, on tiny random checkpoints (no training step compiled):

* `evaluate` protocols: `coco1k` = the mean of per-fold metrics over consecutive image folds
  (fold size shrunk from 1,000 to 4 images so the 8-image tiny test split has 2 folds), `all` =
  whole-split metrics prefixed `5k_` plus the fold means; results.json records them;
* `python -m gseps_jax.export --from_official=... --config=...` imports an official `.pth` into a
  workdir equal to the library's `import_official` (what the import MEANS is checked in
  tests/test_official_layout.py).
"""

import argparse
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import torch

import tiny
from conftest import REPO
from configs import seps_vit
from gseps_jax import evaluate
from gseps_jax import export
from gseps_jax import metrics
from gseps_jax import state as state_lib
from gseps_jax.interop import official_seps
from test_official_layout import random_official_state_dict


def _fold_means(sims, cpi, fold):
  folds = [metrics.retrieval_metrics(sims[f:f + fold, f * cpi:(f + fold) * cpi], cpi)
           for f in range(0, sims.shape[0], fold)]
  return {k: float(np.mean([m[k] for m in folds])) for k in folds[0]}


def test_evaluate_protocols_coco1k_and_all(tmp_path, monkeypatch):
  config = tiny.tiny_config("grm")
  tiny.ensure_data(config)
  wd = tmp_path / "run"
  tiny.random_checkpoint(wd, config, seed=3)
  monkeypatch.setattr(metrics, "coco_1k_folds",
                      functools.partial(metrics.coco_1k_folds, fold_size=4))
  out = {}
  for protocol in ("flickr1k", "coco1k", "all"):
    res = evaluate.evaluate_checkpoint(str(wd), split="test", protocol=protocol,
                                       out=str(tmp_path / protocol), save_scores=True)
    saved = json.loads((tmp_path / protocol / "results.json").read_text())
    assert saved["protocol"] == protocol and saved["split"] == "test"
    assert saved["checkpoint_step"] == 2 and saved["model"] == "grm"
    assert saved["metrics"] == json.loads(json.dumps(res["metrics"]))
    out[protocol] = (saved["metrics"], np.load(tmp_path / protocol / "scores.npy"))
  sims = out["flickr1k"][1]
  assert sims.shape == (8, 40)
  for protocol in ("coco1k", "all"):  # the same scores whatever the protocol
    np.testing.assert_array_equal(out[protocol][1], sims)
  whole = metrics.retrieval_metrics(sims, 5)
  folds = _fold_means(sims, 5, 4)
  assert abs(whole["rsum"] - folds["rsum"]) > 1e-3  # the protocols differ on these scores
  for k, v in whole.items():
    np.testing.assert_allclose(out["flickr1k"][0][k], v, rtol=1e-6)
    np.testing.assert_allclose(out["all"][0][f"5k_{k}"], v, rtol=1e-6)
  for k, v in folds.items():
    np.testing.assert_allclose(out["coco1k"][0][k], v, rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(out["all"][0][k], v, rtol=1e-6, err_msg=k)


def test_export_from_official_command_line(tmp_path):
  config = seps_vit.get_config("tiny")
  sd = random_official_state_dict(config, tmp_path, seed=8)
  pth = tmp_path / "model_best.pth"
  opt = argparse.Namespace(**dict(official_seps.OFFICIAL_OPT_DEFAULTS, embed_size=32,
                                  num_patches=16))
  torch.save({"model": sd, "opt": opt, "epoch": 3, "best_rsum": 1.5, "Eiters": 40}, pth)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("GSEPS_", "SLURM_", "TPU_"))}
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  proc = subprocess.run(
      [sys.executable, "-m", "gseps_jax.export", f"--from_official={pth}",
       f"--config={REPO / 'configs' / 'seps_vit.py'}:tiny", "--out=imported"],
      capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "imported" / "config.json").is_file()
  _, _, got, step = state_lib.restore_params(str(tmp_path / "imported"))
  assert step == 0
  lib = export.import_official(pth, config, tmp_path / "lib")
  _, _, want, _ = state_lib.restore_params(str(lib))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  np.testing.assert_array_equal(np.asarray(got["cross_net"]["aggr_net"]["fc1"]["kernel"]),
                                sd["cross_net.aggr_net.weight.1.weight"].numpy().T)
