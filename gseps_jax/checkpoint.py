"""Orbax checkpointing: resumable, atomic, sharding-aware, verified, refusing foreign checkpoints.

Layout: `WORKDIR/checkpoints/<step>/{state,meta}`. `state` is the train state (restored onto
abstract arrays that carry the current shardings, so a checkpoint restores onto a different
mesh); `meta` is JSON: the full config, the model fingerprint, the data iterator state, the step,
any metrics and a digest of every saved array. Orbax writes each step into a temporary directory
and renames it when complete, so a job killed during a save never leaves a step that
`latest_step` would pick.

A step that is damaged anyway (disk full, files deleted, bytes flipped) is detected on restore:
orbax fails to read it, or the restored arrays do not match the digest saved in its meta, or they
are not finite. A training run moves such a step aside to `WORKDIR/checkpoints_damaged/` (never
deleting it) so the step can be written again, and continues from the newest good step; readers
(evaluate/export/retrieve) fall back the same way without moving anything. The one-line warning
naming the step is the whole report: the reads that a failed restore leaves in flight are kept
off stderr (`_drop_stale_read_reports`). See docs/reliability.md.
"""

import json
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

from gseps_jax import digest as digest_lib
from gseps_jax import fileio

log = logging.getLogger(__name__)

# Parts of the config that decide the parameter tree; a checkpoint restores only if they agree.
FINGERPRINT_KEYS = ("model.name", "model.vision", "model.text", "model.embed_dim", "model.grm",
                    "model.seps")
# Entries of those parts that only choose how scores are combined/computed or weight the training
# loss, not the parameters: a checkpoint restores (and is rescored) under other values, e.g.
# GRM's level weights at evaluation (docs/grm_design.md).
NOT_FINGERPRINTED = {"model.grm": ("level_weights", "eval_buckets", "train_chunk", "direction",
                                   "aux_weights", "keep_ratio", "keep_ratio_weight",
                                   "region_div_weight", "region_entropy_floor")}


class CheckpointMismatchError(ValueError):
  """The checkpoint was written by another model or an incompatible config."""


class CheckpointDamagedError(CheckpointMismatchError):
  """A checkpoint step cannot be used: unreadable, not what was saved (digest), or not finite.

  A subclass of CheckpointMismatchError (the stored step does not match what was saved) so that
  every CLI that reports an unusable checkpoint in one sentence reports this one too.
  """


class NonFiniteStateError(FloatingPointError):
  """Refused to save a state that holds NaN or Inf."""


def _get(cfg, dotted):
  node = cfg
  for k in dotted.split("."):
    if node is None or k not in node:
      return None
    node = node[k]
  return node


def _plain(x):
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  return json.loads(json.dumps(x, default=list))


def _parameter_part(key, value):
  """`value` of fingerprint part `key` without its NOT_FINGERPRINTED entries."""
  drop = NOT_FINGERPRINTED.get(key, ())
  if drop and isinstance(value, dict):
    value = {k: v for k, v in value.items() if k not in drop}
  return value


def fingerprint(config) -> dict:
  """JSON-able summary of everything that shapes the parameters."""
  return {k: _parameter_part(k, _plain(_get(config, k))) for k in FINGERPRINT_KEYS}


def check_fingerprint(saved: dict, config, where: str) -> None:
  mine = fingerprint(config)
  # Fingerprints saved before NOT_FINGERPRINTED existed hold those entries too.
  saved = {k: _parameter_part(k, v) for k, v in saved.items()}
  diffs = [k for k in FINGERPRINT_KEYS if saved.get(k) != mine.get(k)]
  if diffs:
    detail = "; ".join(f"{k}: checkpoint={saved.get(k)!r} vs config={mine.get(k)!r}"
                       for k in diffs[:4])
    raise CheckpointMismatchError(
        f"Checkpoint {where} was written for a different model/config ({detail}). Use a fresh "
        f"--workdir, or the config the checkpoint was trained with (saved in its meta).")


def checkpoint_dir(workdir) -> epath.Path:
  return fileio.absolute(workdir) / "checkpoints"


def damaged_dir(workdir) -> epath.Path:
  """Where damaged steps are moved: `WORKDIR/checkpoints_damaged/<step>-<UTC time>`."""
  return fileio.absolute(workdir) / "checkpoints_damaged"


def _first_line(e: BaseException, limit: int = 160) -> str:
  text = str(e).strip().splitlines()
  text = text[0] if text else ""
  return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


def _all_agree(ok: bool) -> bool:
  """True only if `ok` on every process (damage seen by one process is damage for all: every
  process must then take the same branch, or the next collective hangs)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _is_stale_read_callback(unraisable) -> bool:
  """True for the unraisable error of a tensorstore read that outlived a failed orbax restore.

  When one array of a step cannot be read, orbax's restore raises at once and closes its asyncio
  loop while tensorstore still reads the step's other arrays; as each read finishes, its callback
  posts to the closed loop (`call_soon_threadsafe`) and raises `RuntimeError('Event loop is
  closed')` on a tensorstore thread, which Python reports as unraisable: one traceback per array
  on stderr (hundreds for a ViT-B state) after the one-line damage warning.
  """
  if unraisable.object is not None or unraisable.exc_type is not RuntimeError:
    return False
  if str(unraisable.exc_value) != "Event loop is closed":
    return False
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return bool(frames) and frames[0].name == "call_soon_threadsafe" and (
      os.path.basename(frames[0].filename) == "base_events.py")  # local-path-ok: a source file


class _DropUnretrievedReadErrors(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for a tensorstore read error (its
  message carries the `tensorstore_spec`): a sibling of the read that failed the restore, which
  failed too and was left behind with the closed loop (the damage warning already says it)."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (str(record.msg).startswith("Task exception was never retrieved") and
                exc is not None and "tensorstore_spec" in str(exc))


def _drop_stale_read_reports() -> None:
  """Keeps a damaged step's one-line warning the whole report: `sys.unraisablehook` drops
  `_is_stale_read_callback` errors (anything else goes on to the hook installed before) and the
  `asyncio` logger drops `_DropUnretrievedReadErrors` records. Called before every state restore
  (a failed read's siblings can finish before its exception reaches us); process-wide, installed
  once."""
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropUnretrievedReadErrors) for f in asyncio_log.filters):
    asyncio_log.addFilter(_DropUnretrievedReadErrors())
  previous = sys.unraisablehook
  if getattr(previous, "gseps_drops_stale_reads", False):
    return

  def hook(unraisable):
    if not _is_stale_read_callback(unraisable):
      previous(unraisable)

  hook.gseps_drops_stale_reads = True
  sys.unraisablehook = hook


def _names(items) -> str:
  items = list(items)
  return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


class Checkpointer:
  """Keeps the last `keep` steps plus the best by `best_metric` (max)."""

  def __init__(self, workdir, *, keep: int = 3, best_metric: str | None = "rsum",
               async_save: bool = True, read_only: bool = False):
    policies = [ocp_managers.LatestN(n=keep)]
    if best_metric:
      policies.append(ocp_managers.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                                         keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    self.workdir = fileio.absolute(workdir)
    self.read_only = read_only
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None,
           force: bool = True) -> bool:
    """Saves asynchronously, with a digest of `state` in the meta; refuses a non-finite state."""
    digest, bad = digest_lib.state_digest(state)
    if bad:
      raise NonFiniteStateError(
          f"Refusing to save step {step} to {self.directory}: {_names(bad)} hold NaN or Inf.")
    meta = dict(meta, step=int(step), digest={"algo": digest_lib.DIGEST_ALGO, "leaves": digest})
    return self.manager.save(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           meta=ocp.args.JsonSave(_plain(meta))),
        metrics=metrics, force=force)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def newest_meta(self) -> tuple[int, dict] | None:
    """(step, meta) of the newest step whose meta reads; None if there is no step at all.

    Raises CheckpointDamagedError when steps exist but no meta reads."""
    steps = self.all_steps()
    for s in steps[::-1]:
      try:
        return s, self.read_meta(s)
      except Exception as e:  # pylint: disable=broad-except
        log.warning("Checkpoint step %d in %s is damaged (meta unreadable: %s); trying an "
                    "older one.", s, self.directory, _first_line(e))
    if steps:
      raise CheckpointDamagedError(
          f"No checkpoint in {self.directory} is readable (steps {steps} all have a damaged "
          f"meta); use another workdir, or move the damaged steps away to start over.")
    return None

  def _verify(self, s: int, abstract_state, meta: dict, validate) -> tuple[Any, str | None]:
    """(state, None) if step `s` restores, matches its digest and is finite, else (None, why)."""
    state, why = None, None
    _drop_stale_read_reports()  # before: a failed read's siblings may finish at any time
    try:
      state = self.manager.restore(
          s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      why = f"unreadable: {_first_line(e)}"
    if not _all_agree(why is None):
      return None, why or "unreadable on another process"
    digest, bad = digest_lib.state_digest(state)
    saved = (meta.get("digest") or {}).get("leaves")
    if saved is not None:  # steps written before digests existed are only checked for finiteness
      wrong = [p for p in sorted(set(saved) | set(digest)) if saved.get(p) != digest.get(p)]
      if wrong:
        return None, f"arrays differ from the digest saved with them: {_names(wrong)}"
    if bad:
      return None, f"not finite: {_names(bad)} hold NaN or Inf"
    if validate is not None:
      why = validate(state)
      if why:
        return None, why
    return state, None

  def _move_aside(self, s: int) -> epath.Path:
    """Moves step `s` to checkpoints_damaged/ (process 0 only) and re-reads the step list."""
    dest = damaged_dir(self.workdir) / f"{s}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(s)).rename(dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"gseps_jax_move_damaged_{s}")
    self.manager.reload()
    if jax.process_index() == 0:  # the others' clocks may name another second
      log.warning("Moved damaged checkpoint step %d to %s (kept for inspection; the step will "
                  "be saved again).", s, dest)
    return dest

  def restore(self, abstract_state: Any, config=None, step: int | None = None, *,
              validate: Callable[[Any], str | None] | None = None, move_damaged: bool = False,
              fresh_if_all_damaged: bool = False):
    """Restores (state, meta) from `step` or the newest good step; None if there is no step.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings. A step is good when its
    meta and arrays read, the arrays match the digest saved in the meta, they are finite, and
    `validate(state)` (optional) returns no reason. With `step=None` a damaged step is reported
    (one warning naming it) and the next older one tried; with `move_damaged` (training) it is
    also moved to checkpoints_damaged/ so the step can be saved again. An explicitly requested
    damaged step, or steps that are all damaged, raise CheckpointDamagedError, unless
    `fresh_if_all_damaged` (then, with `move_damaged`, they are moved aside and None returned).
    A checkpoint of another model raises CheckpointMismatchError.
    """
    if step is not None and step not in self.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; available: "
                              f"{self.all_steps() or 'none'}.")
    move = move_damaged and not self.read_only
    steps = [step] if step is not None else self.all_steps()[::-1]
    damaged = []
    for s in steps:
      try:
        meta, why = self.read_meta(s), None
      except Exception as e:  # pylint: disable=broad-except
        meta, why = None, f"meta unreadable: {_first_line(e)}"
      if why is None and config is not None:
        check_fingerprint(meta.get("fingerprint", {}), config, f"{self.directory}/{s}")
      if why is None:
        state, why = self._verify(s, abstract_state, meta, validate)
      if why is None:
        if move:
          for d in damaged:
            self._move_aside(d)
        return state, meta
      if step is not None:
        raise CheckpointDamagedError(
            f"Checkpoint step {s} in {self.directory} is damaged ({why}); pass another step "
            f"(available: {self.all_steps()}) or the workdir to use the newest good one.")
      damaged.append(s)
      log.warning("Checkpoint step %d in %s is damaged (%s); trying an older one.", s,
                  self.directory, why)
    if not damaged:
      return None
    if fresh_if_all_damaged:
      if move:
        for d in damaged:
          self._move_aside(d)
      return None
    how = ("restore them from a backup, use another workdir, or pass "
           "--config.checkpoint.allow_restart_on_damage=True to set them aside and start over"
           if move else "restore them from a backup or train again")
    raise CheckpointDamagedError(
        f"Every checkpoint in {self.directory} is damaged (steps {sorted(damaged)}; the warnings "
        f"above say why) and nothing was moved or overwritten: {how}.")

  def wait(self):
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def check_workdir(workdir, config) -> None:
  """Refuses (CheckpointMismatchError) a workdir whose newest readable checkpoint belongs to
  another model; reads only JSON meta, so it is cheap enough to run before anything is written."""
  if not checkpoint_dir(workdir).exists():
    return
  ckpt = Checkpointer(workdir, read_only=True, best_metric=None)
  try:
    found = ckpt.newest_meta()
  finally:
    ckpt.close()
  if found is not None:
    step, meta = found
    check_fingerprint(meta.get("fingerprint", {}), config, f"{checkpoint_dir(workdir)}/{step}")


def resolve(path) -> tuple[epath.Path, int | None]:
  """`WORKDIR`, `WORKDIR/checkpoints` or `WORKDIR/checkpoints/STEP` -> (workdir, step or None)."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"Checkpoint path {p} does not exist; pass a training --workdir "
                            f"(or WORKDIR/checkpoints/STEP).")
  if p.name.isdigit() and p.parent.name == "checkpoints":
    return p.parent.parent, int(p.name)
  if p.name == "checkpoints":
    return p.parent, None
  if (p / "checkpoints").exists():
    return p, None
  raise FileNotFoundError(f"{p} is not a gseps_jax workdir: it has no checkpoints/ folder.")


def load_config_from_checkpoint(path):
  """Reads the config (as a ConfigDict), step and meta saved with a checkpoint, without its
  arrays: from the step in `path`, or else from the newest step whose meta reads."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  workdir, step = resolve(path)
  ckpt = Checkpointer(workdir, read_only=True, best_metric=None)
  try:
    if step is None:
      found = ckpt.newest_meta()
      if found is None:
        raise FileNotFoundError(f"{workdir} has no complete checkpoint.")
      step, meta = found
    else:
      try:
        meta = ckpt.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointDamagedError(
            f"Checkpoint step {step} in {ckpt.directory} is damaged (meta unreadable: "
            f"{_first_line(e)}); pass another step (available: {ckpt.all_steps()}) or the "
            f"workdir to use the newest good one.") from None
  finally:
    ckpt.close()
  return ml_collections.ConfigDict(meta["config"]), step, meta
