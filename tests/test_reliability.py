"""Reliability (issue 17): re-runs, damaged checkpoints, silent corruption, exploded weights,
foreign workdirs and metrics after a resume. See docs/reliability.md for what each test covers.

One tiny GRM run (4 steps, checkpoints at 2 and 4) is trained once per module; every test works
on its own copy of that workdir. The rest runs at the Checkpointer level (no training).
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny
from conftest import REPO
from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import digest
from gseps_jax import fileio
from gseps_jax import metrics_log
from gseps_jax import state as state_lib
from gseps_jax import trainer

BASE = {"train.max_steps": 4, "checkpoint.every_steps": 2}


def _train(workdir, model="grm", **overrides):
  """train_and_evaluate in this process; the signal handlers it installs are put back."""
  config = tiny.tiny_config(model, **{**BASE, **overrides})
  saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    return trainer.train_and_evaluate(config, str(workdir))
  finally:
    for s, handler in saved.items():
      signal.signal(s, handler)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  tiny.ensure_data(tiny.tiny_config())
  wd = tmp_path_factory.mktemp("reliability") / "base"
  _train(wd)
  return wd


def _copy(base, tmp_path):
  dst = tmp_path / "wd"
  shutil.copytree(base, dst)
  return dst


def _damage(workdir, step):
  """Disk damage: the array data files of `step` (under state/**/d/) overwritten with random
  bytes of the same sizes."""
  rng = np.random.default_rng(step)
  files = sorted(f for f in (workdir / "checkpoints" / str(step) / "state").rglob("*")
                 if f.is_file() and f.parent.name == "d")
  assert files
  for f in files:
    f.write_bytes(rng.bytes(f.stat().st_size))


def _steps(workdir):
  ck = ckpt_lib.Checkpointer(workdir, read_only=True, best_metric=None)
  try:
    return ck.all_steps()
  finally:
    ck.close()


def _rows(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _tmp_leftovers(workdir):
  return [p for p in workdir.rglob("*") if ".tmp" in p.name]


_abstract = tiny.abstract


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


# ---------------------------------------------------------------------------------------------
# 1. Re-runs: small files are replaced atomically.


def test_atomic_write_text_replaces_whole_or_not_at_all(tmp_path):
  target = tmp_path / "results.json"
  fileio.atomic_write_text(target, "first")
  fileio.atomic_write_text(target, "second")
  assert target.read_text() == "second"
  with pytest.raises(TypeError):  # fails while writing: the old file stays, no temp file
    fileio.atomic_write_text(target, None)
  assert target.read_text() == "second"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_rerun_of_finished_run_and_repeated_evaluate(base_run, tmp_path):
  from gseps_jax import evaluate
  wd = _copy(base_run, tmp_path)
  # A finished run whose results.json exists (here stale) and whose test row is logged.
  (wd / "results.json").write_text('{"stale": true}')
  with (wd / "metrics.jsonl").open("a") as f:
    f.write(json.dumps({"step": 4, "test/rsum": -1.0}) + "\n")
  result = _train(wd, **{"train.final_eval_split": "test"})  # re-run: re-evaluates
  assert result["step"] == 4
  saved = json.loads((wd / "results.json").read_text())
  assert saved["step"] == 4 and saved["test"]["rsum"] >= 0
  # The re-run's final evaluation replaced its row instead of adding a second one.
  test_rows = [r for r in _rows(wd) if "test/rsum" in r]
  assert [r["step"] for r in test_rows] == [4] and test_rows[0]["test/rsum"] >= 0
  for _ in range(2):  # evaluating the same checkpoint twice
    evaluate.evaluate_checkpoint(str(wd), split="test", out=str(tmp_path / "eval"))
  assert json.loads((tmp_path / "eval" / "results.json").read_text())["checkpoint_step"] == 4
  assert _tmp_leftovers(wd) == [] and _tmp_leftovers(tmp_path / "eval") == []


# ---------------------------------------------------------------------------------------------
# 2. Damaged checkpoints: detected, named, moved aside (training) and the newest good step used.


def test_damaged_newest_checkpoint_is_moved_aside_and_training_continues(base_run, tmp_path,
                                                                         caplog):
  wd = _copy(base_run, tmp_path)
  _damage(wd, 4)
  # The lost run also logged steps 7 and 8 (never checkpointed) before it was killed mid-line.
  with (wd / "metrics.jsonl").open("a") as f:
    f.write("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in (7, 8)))
    f.write('{"step": 9, "train/lo')
  with caplog.at_level("WARNING"):
    result = _train(wd, **{"train.max_steps": 6})
  assert result["step"] == 6
  assert any("step 4" in m and "damaged" in m for m in _warnings(caplog))
  moved = list((wd / "checkpoints_damaged").iterdir())
  assert [p.name.split("-")[0] for p in moved] == ["4"] and (moved[0] / "state").is_dir()
  assert {4, 6} <= set(_steps(wd))  # step 4 was written again: no StepAlreadyExistsError
  # Resumed from step 2 while metrics.jsonl held rows 3, 4, 7, 8 and a torn line of the lost
  # run: cut to step 2 on resume, so each step appears once and no stale row is left.
  train_steps = [r["step"] for r in _rows(wd) if "train/loss" in r]
  assert train_steps == [1, 2, 3, 4, 5, 6]


def test_readers_fall_back_from_a_damaged_step_and_refuse_it_by_name(base_run, tmp_path, caplog):
  wd = _copy(base_run, tmp_path)
  _damage(wd, 4)
  with caplog.at_level("WARNING"):
    _, _, params, step = state_lib.restore_params(str(wd))
  assert step == 2
  assert any("step 4" in m and "damaged" in m for m in _warnings(caplog))
  assert _steps(wd) == [2, 4] and not (wd / "checkpoints_damaged").exists()  # readers move nothing
  with pytest.raises(ckpt_lib.CheckpointDamagedError) as e:
    state_lib.restore_params(str(wd / "checkpoints" / "4"))
  msg = str(e.value)
  assert "step 4" in msg and "\n" not in msg and len(msg) < 600


def test_all_checkpoints_damaged_stops_instead_of_restarting(base_run, tmp_path):
  wd = _copy(base_run, tmp_path)
  _damage(wd, 2)
  _damage(wd, 4)
  metrics_before = (wd / "metrics.jsonl").read_text()
  with pytest.raises(ckpt_lib.CheckpointDamagedError, match="Every checkpoint.*allow_restart"):
    _train(wd, **{"train.max_steps": 6})
  assert _steps(wd) == [2, 4] and not (wd / "checkpoints_damaged").exists()
  assert (wd / "metrics.jsonl").read_text() == metrics_before


_STALE_READS_SCRIPT = """
import sys
import jax, jax.numpy as jnp
from gseps_jax import checkpoint as ckpt_lib
abstract = {f"w{i}": jax.ShapeDtypeStruct((1000,), jnp.float32) for i in range(200)}
ck = ckpt_lib.Checkpointer(sys.argv[1], keep=5, best_metric=None)
print("RESTORED", ck.restore(abstract, move_damaged=True)[1]["step"])
ck.close()
"""


def test_damaged_step_is_one_warning_without_tracebacks(tmp_path):
  """A failed orbax read leaves the step's other reads in flight; when they finish they raised
  'Event loop is closed' on tensorstore threads (one traceback per array on stderr) and,
  now and then, asyncio's 'Task exception was never retrieved'. The restore runs in a fresh
  interpreter, so that what reaches stderr is what a CLI user sees."""
  tree = {f"w{i}": jnp.arange(1000.0) + i for i in range(200)}  # many arrays: many reads in flight
  ck = ckpt_lib.Checkpointer(tmp_path, keep=5, best_metric=None, async_save=False)
  ck.save(1, tree, {})
  ck.save(2, tree, {})
  ck.wait()
  _damage(tmp_path, 2)
  proc = subprocess.run([sys.executable, "-c", _STALE_READS_SCRIPT, str(tmp_path)],
                        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                        text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "RESTORED 1" in proc.stdout
  assert "Checkpoint step 2" in proc.stderr and "is damaged" in proc.stderr
  for noise in ("Traceback", "Event loop is closed", "never retrieved"):
    assert noise not in proc.stderr, proc.stderr[-4000:]


def test_stale_read_filters_pass_everything_else(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  asyncio_log = logging.getLogger("asyncio")
  monkeypatch.setattr(asyncio_log, "filters", [])
  ckpt_lib._drop_stale_read_reports()
  ckpt_lib._drop_stale_read_reports()  # installed once
  assert len(asyncio_log.filters) == 1 and sys.unraisablehook is not seen.append

  def unraisable(exc):
    try:
      raise exc
    except BaseException as e:  # pylint: disable=broad-except
      return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                   err_msg=None, object=None)
  other = unraisable(RuntimeError("Event loop is closed"))  # raised here, not by asyncio
  sys.unraisablehook(other)
  sys.unraisablehook(unraisable(ValueError("boom")))
  assert [u.exc_type for u in seen] == [RuntimeError, ValueError]

  def record(msg, exc):
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None,
                             (type(exc), exc, None))
  drop = asyncio_log.filters[0].filter
  assert not drop(record("Task exception was never retrieved", ValueError(
      "DATA_LOSS: ... [tensorstore_spec='{}']")))
  assert drop(record("Task exception was never retrieved", ValueError("other")))
  assert drop(record("Unclosed client session", ValueError("tensorstore_spec")))


def test_allow_restart_on_damage_sets_every_step_aside(tmp_path):
  """What --config.checkpoint.allow_restart_on_damage=True asks the trainer's restore for."""
  tree = {"w": jnp.arange(4.0)}
  ck = ckpt_lib.Checkpointer(tmp_path, keep=5, best_metric=None, async_save=False)
  ck.save(1, tree, {})
  ck.save(2, tree, {})
  ck.wait()
  for s in (1, 2):
    _damage(tmp_path, s)
  with pytest.raises(ckpt_lib.CheckpointDamagedError, match="steps \\[1, 2\\]"):
    ck.restore(_abstract(tree), move_damaged=True)
  assert ck.all_steps() == [1, 2]
  assert ck.restore(_abstract(tree), move_damaged=True, fresh_if_all_damaged=True) is None
  assert ck.all_steps() == []
  assert sorted(p.name.split("-")[0] for p in (tmp_path / "checkpoints_damaged").iterdir()) == [
      "1", "2"]
  ck.save(2, tree, {})  # the step can be written again
  ck.wait()
  assert ck.restore(_abstract(tree))[1]["step"] == 2


def test_silent_corruption_is_caught_by_the_digest(tmp_path, caplog):
  rng = np.random.default_rng(0)
  # Random int32 words do not compress, so their bytes lie in the data file as they are.
  words = rng.integers(-2**31, 2**31 - 1, size=(64, 32), dtype=np.int32)
  tree = {"w": jnp.asarray(words), "b": jnp.asarray(rng.normal(size=5), jnp.float32)}
  ck = ckpt_lib.Checkpointer(tmp_path, keep=5, best_metric=None, async_save=False)
  ck.save(1, jax.tree.map(lambda x: x + 1, tree), {})
  ck.save(2, tree, {})
  ck.wait()
  needle = words.tobytes()[4000:4032]
  hits = [f for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*")
          if f.is_file() and needle in f.read_bytes()]
  assert len(hits) == 1
  data = bytearray(hits[0].read_bytes())
  data[data.index(needle) + 5] ^= 0x40  # one bit of one word
  hits[0].write_bytes(bytes(data))
  # orbax alone restores the changed value without complaint ...
  raw = ck.manager.restore(2, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(tree))))["state"]
  assert np.sum(np.asarray(raw["w"]) != words) == 1
  # ... the digest saved in the meta does not match it.
  reader = ckpt_lib.Checkpointer(tmp_path, read_only=True, best_metric=None)
  with caplog.at_level("WARNING"):
    state, meta = reader.restore(_abstract(tree))
  assert meta["step"] == 1
  np.testing.assert_array_equal(state["w"], words + 1)
  assert any("step 2" in m and "digest" in m and "['w']" in m for m in _warnings(caplog))
  with pytest.raises(ckpt_lib.CheckpointDamagedError, match="step 2.*digest"):
    reader.restore(_abstract(tree), step=2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "int8", "bool"])
def test_digest_sees_any_changed_or_swapped_element(dtype):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(7, 9))
  x = x > 0 if dtype == "bool" else np.asarray(jnp.asarray(x * 50).astype(dtype))
  ref = digest.state_digest({"x": jnp.asarray(x)})[0]
  assert digest.state_digest({"x": jnp.asarray(x.copy())})[0] == ref
  flat = x.reshape(-1)
  for i in rng.choice(flat.size, 6, replace=False):
    y = flat.copy()
    y[i] = (np.logical_not(y[i]) if dtype == "bool" else
            np.asarray(jnp.asarray(y[i]).astype(jnp.float32) + 1).astype(y.dtype))
    assert digest.state_digest({"x": jnp.asarray(y.reshape(x.shape))})[0] != ref
  i, j = [k for k in range(flat.size) if flat[k] != flat[0]][0], 0
  y = flat.copy()
  y[i], y[j] = flat[j], flat[i]
  assert digest.state_digest({"x": jnp.asarray(y.reshape(x.shape))})[0] != ref


def _reference_leaf_digest(x):
  """The digest formula written with jnp ops over the whole array (how steps saved before the
  host-side digest were stamped): an independent reference for `state_digest`."""
  x = jnp.asarray(x)
  size = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    w = x.astype(jnp.uint32)
  elif size == 4:
    w = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    w = jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  idx = jnp.arange(w.size, dtype=jnp.uint32).reshape(w.shape)
  w1 = idx * jnp.uint32(2) + jnp.uint32(1)
  w2 = (idx * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
  rot = (w << jnp.uint32(13)) | (w >> jnp.uint32(19))
  d = jax.device_get(jnp.stack([jnp.sum(w * w1, dtype=jnp.uint32),
                                jnp.sum(rot * w2, dtype=jnp.uint32)]))
  return "%08x%08x" % (int(d[0]), int(d[1]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "int8", "bool"])
def test_digest_matches_the_whole_array_formula(dtype):
  x = np.random.default_rng(2).normal(size=(5, 3, 11)) * 40
  x = jnp.asarray(x > 0 if dtype == "bool" else x).astype(dtype)
  got, bad = digest.state_digest({"a": {"x": x}, "s": jnp.asarray(3, dtype)})
  assert got == {"['a']['x']": _reference_leaf_digest(x),
                 "['s']": _reference_leaf_digest(jnp.asarray(3, dtype))}
  assert bad == []


_SHARDED_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from gseps_jax import checkpoint as c
from gseps_jax import digest
x = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
one = digest.state_digest({"x": jnp.asarray(x)})[0]
four = jax.make_mesh((4,), ("d",))
rows = jax.device_put(x, NamedSharding(four, P("d", None)))
assert digest.state_digest({"x": rows})[0] == one
ck = c.Checkpointer(sys.argv[1], best_metric=None, async_save=False)
ck.save(1, {"x": rows}, {})
grid = NamedSharding(jax.make_mesh((2, 2), ("a", "b")), P("b", "a"))
state, meta = ck.restore({"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=grid)})
assert meta["step"] == 1 and state["x"].sharding == grid
np.testing.assert_array_equal(state["x"], x)
ck.close()
print("OK")
"""


def test_digest_is_the_same_for_any_sharding(tmp_path):
  """4 fake CPU devices: rows sharded over 4 devices digest like one device, and a checkpoint
  saved that way verifies after restoring onto a 2 x 2 mesh."""
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=4", PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# 3. Non-finite states: never saved, never restored; advice that fits the config.


def test_non_finite_state_is_neither_saved_nor_restored(tmp_path):
  good = {"w": jnp.ones(4)}
  bad = {"w": jnp.array([1.0, jnp.nan, 2.0, 3.0])}
  ck = ckpt_lib.Checkpointer(tmp_path, keep=5, best_metric=None, async_save=False)
  with pytest.raises(ckpt_lib.NonFiniteStateError, match=r"step 1.*\['w'\]"):
    ck.save(1, bad, {})
  assert ck.all_steps() == []
  ck.save(1, good, {})
  # A step written without a digest (older code) that holds NaN is refused on restore.
  ck.manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(bad),
                                             meta=ocp.args.JsonSave({"step": 2})))
  ck.wait()
  assert ck.restore(_abstract(good))[1]["step"] == 1
  with pytest.raises(ckpt_lib.CheckpointDamagedError, match="step 2.*not finite"):
    ck.restore(_abstract(good), step=2)


def test_huge_lr_stops_before_saving_exploded_weights(base_run, tmp_path):
  wd = _copy(base_run, tmp_path)
  with pytest.raises(trainer.NonFiniteLossError) as e:
    _train(wd, **{"train.max_steps": 6, "checkpoint.every_steps": 1, "optim.lr": 1e30})
  msg = str(e.value)
  assert "step 5" in msg and "exploded" in msg
  # Advice for this config: clipping is already on (2.0), so tighten it; lr named with its value.
  assert "optim.lr (now 1e+30" in msg and "optim.clip_norm (now 2" in msg
  assert "enable" not in msg and "hinge" in msg
  assert _steps(wd) == [2, 4]  # nothing saved after the explosion
  _, _, params, step = state_lib.restore_params(str(wd))
  assert step == 4
  assert all(np.isfinite(float(jnp.sum(jnp.square(p)))) for p in jax.tree.leaves(params))


def test_nan_advice_follows_the_config():
  c = tiny.tiny_config("grm")
  c.optim.clip_norm = 1e9
  c.loss.kind = "infonce"
  msg = trainer.nan_advice(c)
  assert "enable gradient clipping" in msg and "1e+09" in msg and "temperature" in msg
  c.optim.clip_norm, c.optim.warmup_steps, c.loss.kind = 2.0, 100, "hinge"
  msg = trainer.nan_advice(c)
  assert "tighten optim.clip_norm (now 2" in msg and "enable" not in msg
  assert "warm-up" not in msg and "temperature" not in msg


# ---------------------------------------------------------------------------------------------
# 4. Another model's workdir; 5. metrics after a resume.


def test_foreign_model_workdir_is_refused_before_config_json_is_written(base_run, tmp_path):
  wd = _copy(base_run, tmp_path)
  before = (wd / "config.json").read_bytes()
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="model.name"):
    _train(wd, model="seps")
  assert (wd / "config.json").read_bytes() == before


def test_metrics_writer_keeps_each_step_once(tmp_path):
  rows = [{"step": s, "train/loss": float(s)} for s in range(1, 6)]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "train/lo')  # torn last line
  w = metrics_log.MetricsWriter(tmp_path, resume_step=3)
  assert _rows(tmp_path) == rows[:3]
  w.write(4, {"loss": 4.5}, "train/")
  w.write(4, {"rsum": 1.0}, "test/")
  w.write(4, {"rsum": 2.0}, "test/")  # a re-run's final evaluation replaces the row
  w.close()
  assert _rows(tmp_path) == rows[:3] + [{"step": 4, "train/loss": 4.5},
                                        {"step": 4, "test/rsum": 2.0}]
  assert _tmp_leftovers(tmp_path) == []
