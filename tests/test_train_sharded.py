"""The sharded train step (mesh data=4 x fsdp=2 on 8 fake CPU devices) computes the same gradient,
gradient norm and parameter updates as one device (tests/_grad_worker.py, `compare`), with a
learning rate that moves every parameter leaf; and the parameters really are split over 'fsdp'."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import _grad_worker
from conftest import REPO

WORKER = str(REPO / "tests" / "_grad_worker.py")


def _run(model, out, meshes=None, *args):
  """Both meshes in one process with 8 fake CPU devices (the same code for both)."""
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=8")
  env = {k: v for k, v in env.items() if not k.startswith(("GSEPS_", "SLURM_", "TPU_"))}
  meshes = meshes or {"one": {"data": 1, "fsdp": 1, "devices": 1},
                      "eight": {"data": 4, "fsdp": 2}}
  proc = subprocess.run([sys.executable, WORKER, model, str(out), json.dumps(meshes), *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])


def _check(model, tmp_path):
  result = _run(model, tmp_path)
  assert result["devices"] == 8
  ref, got = np.load(tmp_path / "one.npz"), np.load(tmp_path / "eight.npz")
  problems = _grad_worker.compare(ref, got)
  assert not problems, "\n".join(problems)
  # The comparison is not vacuous: a gradient summed over the 4 data shards instead of averaged
  # (every gradient and the norm x4; Adam would hide it in the parameters) is caught, and so is
  # one leaf's gradient off by 1%.
  scaled = {k: (got[k] * 4 if k.startswith("grad") else got[k]) for k in got.files}
  problems = _grad_worker.compare(ref, _Npz(scaled))
  leaves = sum(k.startswith("grad/") for k in ref.files)
  assert any(p.startswith("grad_norm") for p in problems), problems
  assert sum(p.startswith("grad/") for p in problems) >= 0.9 * leaves, problems
  key = sorted(k for k in got.files if k.startswith("grad/"))[0]
  assert _grad_worker.compare(ref, _Npz(dict(_Npz.of(got), **{key: got[key] * 1.01})))
  # Parameters really are split over 'fsdp': every kernel/embedding whose first dim divides by 2.
  assert result["split"]["one"] == []
  assert len(result["split"]["eight"]) >= 10, result["split"]


class _Npz(dict):
  """A dict with the `.files` of a loaded npz."""

  @property
  def files(self):
    return list(self)

  @staticmethod
  def of(npz):
    return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize("model", ["grm", "seps"])
def test_sharded_step_matches_single_device(model, tmp_path):
  _check(model, tmp_path)


@pytest.mark.parametrize("model", ["grm", "seps"])
def test_gradient_caching_on_eight_devices_matches_one_device_full_batch(model, tmp_path):
  """train.encoder_chunk=2 on a 4 x 2 mesh (each chunk of 8 rows spread over the 8 devices, the
  B x B scores over the whole batch of 16) trains like the plain full-batch step on one device:
  same gradient per leaf, grad_norm, loss and parameters after 2 steps (dropout off: chunked
  dropout masks differ by design)."""
  meshes = {"one": {"data": 1, "fsdp": 1, "devices": 1},
            "cached": {"data": 4, "fsdp": 2, "encoder_chunk": 2}}
  result = _run(model, tmp_path, meshes, "2", "batch=16", "nodropout")
  assert result["devices"] == 8
  problems = _grad_worker.compare(np.load(tmp_path / "one.npz"), np.load(tmp_path / "cached.npz"))
  assert not problems, "\n".join(problems)
