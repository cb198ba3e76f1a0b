"""The sharded train step (mesh data=4 x fsdp=2 on 8 fake CPU devices) equals the 1-device step."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO

SCRIPT = r"""
import json, sys
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp, numpy as np
import tiny
from gseps_jax import models, optim, sharding, trainer

assert jax.device_count() == 8, jax.devices()
config = tiny.tiny_config("MODEL")
config.fsdp_min_size = 0  # split every kernel whose first dim divides by fsdp
model = models.build_model(config.model)
rng = np.random.default_rng(0)
batch = trainer.sample_batch(config, batch_size=8)
batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
batch["input_ids"] = rng.integers(1000, 5000, size=batch["input_ids"].shape).astype(np.int32)
batch["dense_ids"] = rng.integers(1000, 5000, size=batch["dense_ids"].shape).astype(np.int32)
batch["attention_mask"][:, 10:] = 0
key = jax.random.key(0)
abstract = jax.eval_shape(lambda: model.init({"params": key, "dropout": key, "gumbel": key,
                                              "noise": key}, batch, train=False)["params"])
tx, _, _ = optim.make_optimizer(config.optim, 4, abstract)
out = {}
for name, mesh_cfg, devices in (("one", {"data": 1, "fsdp": 1}, jax.devices()[:1]),
                                ("eight", {"data": 4, "fsdp": 2}, None)):
  mesh = sharding.make_mesh(mesh_cfg, devices)
  with jax.set_mesh(mesh):
    state, _, shardings = trainer.create_train_state(config, model, tx, batch, mesh, key)
    step = trainer.jit_train_step(config, model, tx, mesh, shardings, 4)
    gb = jax.device_put(batch, sharding.batch_sharding(mesh))
    state, metrics = step(state, gb, jax.random.key(1))
    state, metrics = step(state, gb, jax.random.key(1))
  leaves = jax.tree_util.tree_leaves_with_path(state.params)
  split = [(sharding.path_str(p), str(x.sharding.spec), x.addressable_shards[0].data.shape,
            x.shape) for p, x in leaves if "fsdp" in str(x.sharding.spec)]
  np.savez(f"OUT/{name}.npz", **{sharding.path_str(p): np.asarray(x) for p, x in leaves})
  out[name] = {"loss": float(metrics["loss"]), "split": split, "n": len(leaves)}
print("RESULT " + json.dumps(out))
"""


def _run(model, tmp_path):
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=8")
  code = SCRIPT.replace("MODEL", model).replace("OUT", str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])


def _check(model, tmp_path):
  out = _run(model, tmp_path)
  # fp32 reductions are ordered differently across 8 devices: agree to ~1e-5 relative.
  np.testing.assert_allclose(out["eight"]["loss"], out["one"]["loss"], rtol=1e-5)
  one, eight = np.load(tmp_path / "one.npz"), np.load(tmp_path / "eight.npz")
  assert sorted(one.files) == sorted(eight.files)
  # Adam divides by |g|: where a gradient is ~0 (e.g. a bias under a softmax, whose exact
  # gradient is 0) reduction-order noise between 1 and 8 devices moves the update by up to ~lr/4.
  # So: every element within lr/2 (lr = 2e-4), and fewer than 1% of elements off by more than
  # 1e-5; a wrong sharded gradient moves most elements by ~lr and fails both.
  off, total = 0, 0
  for k in one.files:
    np.testing.assert_allclose(eight[k], one[k], rtol=0, atol=1e-4, err_msg=k)
    off += int(np.sum(np.abs(eight[k] - one[k]) > 1e-5))
    total += one[k].size
  assert off < 0.01 * total, (off, total)
  # Parameters really are split over 'fsdp': each device holds half of every split kernel.
  assert out["one"]["split"] == []
  split = out["eight"]["split"]
  assert len(split) >= 10, split
  for name, spec, shard_shape, shape in split:
    assert shard_shape[0] * 2 == shape[0], (name, spec, shard_shape, shape)


def test_grm_sharded_step_matches_single_device(tmp_path):
  _check("grm", tmp_path)


def test_seps_sharded_step_matches_single_device(tmp_path):
  _check("seps", tmp_path)
