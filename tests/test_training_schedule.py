"""What the training loop promises, on tiny configs:

* the loss schedule: during warm-up epochs the all-negative hinge ramps by i / n_batches
  within the epoch (the first batch weighs 0, as in the official code), then hardest negatives
  only (trainer.loss_fn with the step traced, against a hand-written NumPy hinge);
* gradient accumulation (optim.grad_accum = k): no update for k - 1 micro-steps, then exactly
  the update of one step on the MEAN of the k gradients;
* `train.eval_every` evaluates on dev at those steps and the best-rsum checkpoint is kept beside
  the newest ones (checkpoint.keep_best);
* `train.max_minutes` stops with a checkpoint and still writes the final results.json;
* SIGINT (Ctrl-C) checkpoints at the step boundary and stops (resuming: tests/test_train.py).
"""

import json
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import tiny
from conftest import REPO
from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import optim
from gseps_jax import trainer

MARGIN = 0.2


def _hinge(s, ids, hardest):
  """VSE++ hinge by hand: image i vs caption j, pairs sharing an image id are no negatives."""
  b = len(ids)
  cost_c = np.zeros((b, b))
  cost_im = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      if ids[i] != ids[j]:
        cost_c[i, j] = max(0.0, MARGIN + s[i, j] - s[i, i])
        cost_im[i, j] = max(0.0, MARGIN + s[i, j] - s[j, j])
  if hardest:
    return cost_c.max(1).sum() + cost_im.max(0).sum()
  return cost_c.sum() + cost_im.sum()


class _ScoresAreParams:
  """A stand-in model whose [B, B] scores are its parameters."""

  def apply(self, variables, batch, *, train, rngs):
    del batch, train, rngs
    return {"s": variables["params"]["s"]}, {}


def test_warmup_epoch_ramp_then_hardest_negatives():
  config = ml_collections.ConfigDict({
      "loss": {"kind": "hinge", "margin": MARGIN, "warmup_epochs": 1},
      "model": {"name": "stub"}})
  rng = np.random.default_rng(0)
  s = rng.normal(0, 0.3, (6, 6)).astype(np.float32)
  ids = np.array([0, 1, 1, 2, 3, 4])  # captions 1 and 2 share an image
  batch = {"image_index": jnp.asarray(ids)}
  spe = 4  # steps per epoch
  fn = jax.jit(lambda step: trainer.loss_fn({"s": jnp.asarray(s)}, batch, jax.random.key(0), step,
                                            model=_ScoresAreParams(), config=config,
                                            steps_per_epoch=spe)[0])
  all_neg, hardest = _hinge(s, ids, False), _hinge(s, ids, True)
  assert all_neg > 2 * hardest > 0  # the two forms are distinguishable
  got = [float(fn(jnp.asarray(step, jnp.int32))) for step in range(3 * spe)]
  want = [all_neg * step / spe for step in range(spe)] + [hardest] * (2 * spe)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Two warm-up epochs: the ramp restarts with the second epoch.
  config.loss.warmup_epochs = 2
  fn2 = jax.jit(lambda step: trainer.loss_fn({"s": jnp.asarray(s)}, batch, jax.random.key(0),
                                             step, model=_ScoresAreParams(), config=config,
                                             steps_per_epoch=spe)[0])
  np.testing.assert_allclose([float(fn2(jnp.asarray(st, jnp.int32))) for st in (4, 7, 8)],
                             [0.0, all_neg * 3 / spe, hardest], rtol=1e-5, atol=1e-7)


def test_grad_accum_is_one_step_on_the_mean_gradient():
  cfg = ml_collections.ConfigDict(dict(
      lr=1e-2, backbone_lr_mult=0.1, weight_decay=1e-4, decay_epochs=(), decay_factor=0.3,
      warmup_steps=0, clip_norm=2.0, grad_accum=1,
      backbone_patterns=(r"^vision_encoder/", r"^text_encoder/")))
  rng = np.random.default_rng(1)
  params = {"vision_encoder": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
            "head": {"kernel": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 3, jnp.float32), params)
           for _ in range(6)]
  one, _, _ = optim.make_optimizer(cfg, 10, params)
  cfg.grad_accum = 3
  acc, _, _ = optim.make_optimizer(cfg, 10, params)
  # Reference: plain optimiser, one step per mean of 3 micro-batch gradients.
  ref_p, ref_s = params, one.init(params)
  acc_p, acc_s = params, acc.init(params)
  for k in range(2):
    mean = jax.tree.map(lambda *g: sum(g) / 3, *grads[3 * k:3 * k + 3])
    upd, ref_s = one.update(mean, ref_s, ref_p)
    ref_p = optax.apply_updates(ref_p, upd)
    for m in range(3):
      before = acc_p
      upd, acc_s = acc.update(grads[3 * k + m], acc_s, acc_p)
      acc_p = optax.apply_updates(acc_p, upd)
      if m < 2:  # accumulating: parameters unchanged
        jax.tree.map(np.testing.assert_array_equal, acc_p, before)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), acc_p,
                 ref_p)
  # The clip (norm 2) acts on the mean, not on each micro-batch: the gradients are ~3x larger.
  assert float(optax.tree.norm(grads[0])) > 2.0


# ----------------------------------------------------------------------------- the loop


def _metrics(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_eval_every_keeps_the_best_checkpoint(tmp_path):
  config = tiny.tiny_config("grm", **{
      "train.max_steps": 4, "train.eval_every": 1, "checkpoint.keep": 1,
      "checkpoint.keep_best": True, "checkpoint.every_steps": 1000, "optim.lr": 3e-3})
  tiny.ensure_data(config)
  trainer.train_and_evaluate(config, str(tmp_path))
  rows = _metrics(tmp_path)
  dev = {r["step"]: r["dev/rsum"] for r in rows if "dev/rsum" in r}
  assert sorted(dev) == [1, 2, 3]  # every step but the last (the final evaluation is on test)
  ck = ckpt_lib.Checkpointer(tmp_path, read_only=True, best_metric=None)
  kept = ck.all_steps()
  best = max(dev.values())
  # The newest step and one step with the best dev rsum; the others are deleted.
  assert 4 in kept and len(kept) == 2, (kept, dev)
  (other,) = set(kept) - {4}
  assert dev[other] == best, (kept, dev)


def test_max_minutes_stops_with_a_checkpoint_and_results(tmp_path):
  config = tiny.tiny_config("grm", **{
      "train.max_steps": 50, "train.max_minutes": 1e-6, "checkpoint.every_steps": 1000,
      "train.final_eval_split": "test"})
  tiny.ensure_data(config)
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 1  # the budget is spent after the first step
  assert ckpt_lib.Checkpointer(tmp_path, read_only=True, best_metric=None).latest_step() == 1
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["step"] == 1 and "rsum" in saved["test"]


def test_sigint_checkpoints_and_stops(tmp_path):
  tiny.ensure_data(tiny.tiny_config("grm"))
  over = {"train.max_steps": 3, "checkpoint.every_steps": 1000}
  worker = str(REPO / "tests" / "_train_worker.py")

  proc = subprocess.run([sys.executable, worker, str(tmp_path), "grm", json.dumps(over),
                         f"--signal_at=2:{int(signal.SIGINT)}"],
                        capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  assert result["step"] == 2, proc.stderr[-2000:]
  assert f"Received signal {int(signal.SIGINT)}" in proc.stderr
  assert ckpt_lib.Checkpointer(tmp_path, read_only=True, best_metric=None).latest_step() == 2
  # Resuming after the stop is the same path as after SIGTERM (tests/test_train.py).
