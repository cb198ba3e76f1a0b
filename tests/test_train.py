"""Training loop: resume after SIGTERM, multi-process gradients, NaN stop, checkpoints, optimiser
(lr schedule)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _grad_worker
import multiproc
import tiny
from conftest import REPO
from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import optim
from gseps_jax import state as state_lib
from gseps_jax import trainer

WORKER = str(REPO / "tests" / "_train_worker.py")


def run_worker(workdir, model="grm", overrides=None, *opts, env=None, check=True):
  env = dict(os.environ, **(env or {}))
  proc = subprocess.run([sys.executable, WORKER, str(workdir), model,
                         json.dumps(overrides or {}), *opts],
                        capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
  if check and proc.returncode != 0:
    raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  return json.loads(lines[-1][7:]) if lines else None, proc


def read_metrics(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  tiny.ensure_data(tiny.tiny_config())
  wd = tmp_path_factory.mktemp("straight")
  result, _ = run_worker(wd, "grm", {"train.max_steps": 6, "checkpoint.every_steps": 2})
  return wd, result


def _params(workdir):
  _, _, params, step = state_lib.restore_params(workdir)
  return jax.device_get(params), step


def test_resume_after_sigterm_matches_straight_run(straight_run, tmp_path):
  wd0, _ = straight_run
  wd = tmp_path / "resumed"
  over = {"train.max_steps": 6, "checkpoint.every_steps": 2}
  # First run: a real SIGTERM arrives while step 3 is fed; it must save step 3 and stop.
  result, proc = run_worker(wd, "grm", over, "--sigterm_at=3")
  assert result["step"] == 3, proc.stderr[-2000:]
  assert "Stopping at step 3" in proc.stderr
  assert ckpt_lib.Checkpointer(wd, read_only=True).latest_step() == 3
  # Same command again: resumes from step 3 and finishes.
  result, proc = run_worker(wd, "grm", over)
  assert result["step"] == 6
  assert "Resumed from" in proc.stderr
  straight, resumed = read_metrics(wd0), read_metrics(wd)
  assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
  # The same batches in the same order ...
  assert [straight[s]["train/batch_image_sum"] for s in range(1, 7)] == \
         [resumed[s]["train/batch_image_sum"] for s in range(1, 7)]
  # ... and the same trained parameters.
  p0, s0 = _params(wd0)
  p1, s1 = _params(wd)
  assert s0 == s1 == 6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p0, p1)
  np.testing.assert_allclose(straight[6]["train/loss"], resumed[6]["train/loss"], rtol=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  tiny.ensure_data(tiny.tiny_config())
  result, _ = run_worker(tmp_path, "grm", {"train.max_steps": 5, "checkpoint.every_steps": 1},
                         "--nan_at=3")
  assert "at step 3" in result["error"] and "last good checkpoint" in result["error"]
  ck = ckpt_lib.Checkpointer(tmp_path, read_only=True)
  assert ck.latest_step() == 2



def test_two_processes_agree_with_single_process(tmp_path):
  """Two CPU processes (jax.distributed via the same env the pod launcher sets), each reading its
  half of the first training batch through the data loader, compute the same gradient (per
  leaf), gradient norm, loss and parameter updates as one process reading the whole batch
  (tests/_grad_worker.py: `compare`, which a gradient summed instead of averaged fails)."""
  tiny.ensure_data(tiny.tiny_config())
  worker = str(REPO / "tests" / "_grad_worker.py")
  base = {k: v for k, v in os.environ.items() if not k.startswith(("GSEPS_", "SLURM_", "TPU_"))}
  cmd = lambda name: [sys.executable, worker, "grm", str(tmp_path),
                      json.dumps({name: {"data": -1, "fsdp": 1}}), "2", "pipeline"]
  proc = subprocess.run(cmd("one"), capture_output=True, text=True, env=base, timeout=600,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  port = multiproc.free_port()
  envs = [dict(base, GSEPS_COORDINATOR=f"localhost:{port}", GSEPS_NUM_PROCESSES="2",
               GSEPS_PROCESS_ID=str(pid)) for pid in range(2)]
  done = multiproc.run_processes([cmd("two")] * 2, envs, tmp_path / "logs", cwd=REPO)
  results = [json.loads([l for l in d.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
             for d in done]
  assert sorted((r["process_index"], r["devices"]) for r in results) == [(0, 2), (1, 2)]
  problems = _grad_worker.compare(np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz"))
  assert not problems, "\n".join(problems)


def test_damaged_newest_checkpoint_is_skipped_with_warning(tmp_path, caplog):
  ck = ckpt_lib.Checkpointer(tmp_path, keep=5, best_metric=None, async_save=False)
  tree = {"w": jnp.arange(6.0), "b": jnp.ones(3)}
  meta = {"fingerprint": {}}
  ck.save(1, tree, meta)
  ck.save(2, jax.tree.map(lambda x: x * 2, tree), meta)
  ck.wait()
  # Simulate a save killed half-way that still left a step folder: drop the array data.
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  for f in sorted(state_dir.rglob("*"), reverse=True):
    if f.is_file() and not f.name.startswith("_"):
      f.unlink()
  ck2 = ckpt_lib.Checkpointer(tmp_path, read_only=True, best_metric=None)
  abstract = tiny.abstract(tree)
  with caplog.at_level("WARNING"):
    state, meta = ck2.restore(abstract)
  assert meta["step"] == 1
  np.testing.assert_array_equal(state["w"], np.arange(6.0))
  assert any("step 2" in r.getMessage() for r in caplog.records)


def test_checkpoint_from_another_model_is_refused(tmp_path):
  grm_cfg, seps_cfg = tiny.tiny_config("grm"), tiny.tiny_config("seps")
  ck, abstract = tiny.fingerprinted_checkpoint(tmp_path, grm_cfg)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="model.name"):
    ck.restore(abstract, seps_cfg)
  assert ck.restore(abstract, grm_cfg)[1]["step"] == 1


def test_missing_data_and_weights_is_one_clear_paragraph(tmp_path):
  from configs import grm_vit
  c = grm_vit.get_config()
  c.data.data_dir = str(tmp_path / "nothing_here")
  with pytest.raises(trainer.SetupError) as e:
    trainer.train_and_evaluate(c, str(tmp_path / "wd"))
  msg = str(e.value)
  assert "\n" not in msg.strip()
  assert "flickr30k_karpathy" in msg and "python -m gseps_jax.data.prepare" in msg
  assert str(tmp_path / "nothing_here") in msg
  assert "google/vit-base-patch16-224-in21k" in msg and "bert-base-uncased" in msg
  assert "--config.model.vision_hf_dir=" in msg
  assert not (tmp_path / "wd").exists()  # nothing written before the check
  # A typo'd weight directory is named.
  c.model.vision_hf_dir = str(tmp_path / "typo_dir")
  with pytest.raises(trainer.SetupError, match="typo_dir"):
    trainer.train_and_evaluate(c, str(tmp_path / "wd"))


def test_lr_schedule_and_backbone_multiplier():
  """The update actually applied to a backbone and a head parameter at chosen steps equals
  -lr(step) (x0.1 for the backbone): with a constant unit gradient, Adam's normalised update is
  exactly 1 per element (weight decay off to isolate the lr)."""
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(
      lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.0, decay_epochs=(2, 3), decay_factor=0.3,
      warmup_steps=4, clip_norm=1e9, grad_accum=1,
      backbone_patterns=(r"^vision_encoder/", r"^text_encoder/")))
  params = {"vision_encoder": {"kernel": jnp.zeros(3)}, "vision_proj": {"kernel": jnp.zeros(3)}}
  steps_per_epoch = 5
  tx, head_lr, _ = optim.make_optimizer(cfg, steps_per_epoch, params)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  expected = []
  for s in range(20):
    if s < 4:
      lr = 1e-3 * s / 4
    else:
      lr = 1e-3 * (0.3 if s >= 10 else 1.0) * (0.3 if s >= 15 else 1.0)
    expected.append(lr)
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(-updates["vision_proj"]["kernel"], lr, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(-updates["vision_encoder"]["kernel"], 0.1 * lr, rtol=1e-4,
                               atol=1e-12)
  np.testing.assert_allclose([head_lr(s) for s in range(20)], expected, rtol=1e-6)


# ----------------------------------------------------------------------------- gradient caching


def test_chunks_spread_rows_and_unchunk_inverts():
  x = np.arange(12 * 2).reshape(12, 2)
  c = np.asarray(trainer._chunks(jnp.asarray(x), 3))  # pylint: disable=protected-access
  assert c.shape == (3, 4, 2)
  np.testing.assert_array_equal(c[1, :, 0], x[1::3, 0])  # chunk 1 = rows 1, 4, 7, 10
  np.testing.assert_array_equal(trainer._unchunk(c), x)  # pylint: disable=protected-access


def _cached_vs_full(model_name, chunks, dropout):
  from gseps_jax import models  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_config(model_name)
  config.loss.warmup_epochs = 0  # hardest negatives: the loss couples every row of the batch
  if not dropout:
    for tower in (config.model.vision, config.model.text):
      tower.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = models.build_model(config.model)
  batch = _grad_worker.fixed_batch(config)
  key = jax.random.key(0)
  params = state_lib.init_params(model, batch, key, split=False)
  rng, step = jax.random.key(3), jnp.int32(5)
  out = {}
  for k in (0, *chunks):
    config.train.encoder_chunk = k
    fn = jax.jit(lambda p, b, r, s, c=config.copy_and_resolve_references(): trainer.value_and_grad(
        p, b, r, s, model=model, config=c, steps_per_epoch=4))
    (loss, _), grads = fn(params, batch, rng, step)
    out[k] = (float(loss), grads)
  return out


@pytest.mark.parametrize("model_name,chunks", [("grm", 4), ("seps", 2)])
def test_gradient_caching_equals_the_full_batch_gradient(model_name, chunks):
  """train.encoder_chunk = K (batch 8): the same loss and the same gradient per leaf as the
  plain full-batch step (dropout off: chunked dropout masks differ by design; the head's
  Gumbel/noise draws are the same)."""
  out = _cached_vs_full(model_name, (chunks,), dropout=False)
  loss0, g0 = out[0]
  flat0 = dict(jax.tree_util.tree_leaves_with_path(g0))
  norm = float(optax_global_norm(g0))
  assert norm > 0
  for k in (chunks,):
    loss, g = out[k]
    assert loss == pytest.approx(loss0, rel=1e-6)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
      ref = np.asarray(flat0[path], np.float64)
      err = np.linalg.norm(np.asarray(leaf, np.float64) - ref)
      assert err <= 1e-5 * max(np.linalg.norm(ref), 1e-3 * norm), (k, jax.tree_util.keystr(path))


def optax_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_encoder_chunk_must_divide_the_batch():
  from configs import common  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_config("grm")
  config.train.encoder_chunk = 3  # batch 8
  with pytest.raises(common.ConfigError, match="encoder_chunk"):
    common.validate(config)


def test_param_norm_covers_the_trainable_parameters_only():
  """With a frozen text tower (`optim.frozen_patterns`), the step's `param_norm` (the
  explosion check before every save) is the norm of the updated trainable leaves: the frozen
  ones are neither updated nor read."""
  from gseps_jax import models  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_config("grm")
  config.optim.frozen_patterns = (r"^text_encoder/",)
  model = models.build_model(config.model)
  batch = _grad_worker.fixed_batch(config)
  params = state_lib.init_params(model, batch, jax.random.key(0), split=False)
  tx, _, _ = optim.make_optimizer(config.optim, 4, params, total_steps=10)
  state = state_lib.TrainState(step=jnp.int32(1), params=params, opt_state=tx.init(params))
  new, metrics = jax.jit(lambda s, b: trainer.train_step(
      s, b, jax.random.key(1), model=model, tx=tx, config=config, steps_per_epoch=4))(state, batch)
  flat = jax.tree_util.tree_leaves_with_path(new.params)
  is_text = lambda path: jax.tree_util.keystr(path).startswith("['text_encoder']")
  trainable = [np.asarray(x, np.float64) for p, x in flat if not is_text(p)]
  frozen = [np.asarray(x, np.float64) for p, x in flat if is_text(p)]
  assert trainable and frozen
  want = np.sqrt(sum(np.sum(x * x) for x in trainable))
  everything = np.sqrt(want ** 2 + sum(np.sum(x * x) for x in frozen))
  assert float(metrics["param_norm"]) == pytest.approx(want, rel=1e-5)
  assert abs(everything - want) > 1e-3 * want  # the frozen leaves would change it
  for (_, old), (_, now) in zip(jax.tree_util.tree_leaves_with_path(params["text_encoder"]),
                                jax.tree_util.tree_leaves_with_path(new.params["text_encoder"])):
    np.testing.assert_array_equal(np.asarray(old), np.asarray(now))
  # Without frozen patterns every leaf counts, as before.
  assert len(optim.trainable_leaves(params, config.optim)) == len(trainable)
  config.optim.frozen_patterns = ()
  assert len(optim.trainable_leaves(params, config.optim)) == len(flat)
