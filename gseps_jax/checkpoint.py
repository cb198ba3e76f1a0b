"""Orbax checkpointing: resumable, atomic, sharding-aware, and refusing foreign checkpoints.

Layout: `WORKDIR/checkpoints/<step>/{state,meta}`. `state` is the train state (restored onto
abstract arrays that carry the current shardings, so a checkpoint restores onto a different
mesh); `meta` is JSON: the full config, the model fingerprint, the data iterator state, the step
and any metrics. Orbax writes each step into a temporary directory and renames it when complete,
so a job killed during a save never leaves a step that `latest_step` would pick; a step directory
that is damaged anyway (disk full, files deleted) is skipped with a warning in favour of the
previous one.
"""

import json
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

log = logging.getLogger(__name__)

# Parts of the config that decide the parameter tree; a checkpoint restores only if they agree.
FINGERPRINT_KEYS = ("model.name", "model.vision", "model.text", "model.embed_dim", "model.grm",
                    "model.seps")


class CheckpointMismatchError(ValueError):
  """The checkpoint was written by another model or an incompatible config."""


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


def fingerprint(config) -> dict:
  """JSON-able summary of everything that shapes the parameters."""
  return {k: _plain(_get(config, k)) for k in FINGERPRINT_KEYS}


def check_fingerprint(saved: dict, config, where: str) -> None:
  mine = fingerprint(config)
  diffs = [k for k in FINGERPRINT_KEYS if saved.get(k) != mine.get(k)]
  if diffs:
    detail = "; ".join(f"{k}: checkpoint={saved.get(k)!r} vs config={mine.get(k)!r}"
                       for k in diffs[:4])
    raise CheckpointMismatchError(
        f"Checkpoint {where} was written for a different model/config ({detail}). Use a fresh "
        f"--workdir, or the config the checkpoint was trained with (saved in its meta).")


def checkpoint_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


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
    meta = dict(meta, step=int(step))
    return self.manager.save(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           meta=ocp.args.JsonSave(_plain(meta))),
        metrics=metrics, force=force)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state: Any, config=None, step: int | None = None):
    """Restores (state, meta) from `step` or the newest readable step; None if there is none.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings. With `step=None`, a
    damaged newest step is skipped (with a warning) in favour of the one before it.
    """
    steps = [step] if step is not None else self.all_steps()[::-1]
    if step is not None and step not in self.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; available: "
                              f"{self.all_steps() or 'none'}.")
    for s in steps:
      try:
        meta = self.read_meta(s)
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        log.warning("Checkpoint step %d in %s is unreadable (%s); trying an older one.",
                    s, self.directory, type(e).__name__)
        continue
      if config is not None:
        check_fingerprint(meta.get("fingerprint", {}), config, f"{self.directory}/{s}")
      try:
        restored = self.manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        log.warning("Checkpoint step %d in %s is incomplete or corrupt (%s: %s); trying an older "
                    "one.", s, self.directory, type(e).__name__, str(e)[:200])
        continue
      return restored["state"], meta
    return None

  def wait(self):
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


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
  """Reads the config (as a ConfigDict) and step saved with a checkpoint, without its arrays."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  workdir, step = resolve(path)
  ckpt = Checkpointer(workdir, read_only=True, best_metric=None)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir} has no complete checkpoint.")
  meta = ckpt.read_meta(step)
  return ml_collections.ConfigDict(meta["config"]), step, meta
