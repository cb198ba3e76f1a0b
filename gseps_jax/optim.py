"""Optimiser and learning-rate schedule of the SEPS/GRM recipe, in optax.

AdamW (weight decay 1e-4) with a linear warm-up, then either step decay (`optim.schedule =
"step"`, the papers' recipe: x`decay_factor` at each epoch in `decay_epochs`) or cosine decay
(`"cosine"`: from `lr` to `min_lr_ratio * lr` at the run's last step, after the warm-up), backbone
parameters (ViT/Swin, BERT) at `backbone_lr_mult` x the head lr, frozen parameters
(`frozen_patterns`, e.g. a frozen text tower: no update, no optimiser state, no weight decay),
global-norm clipping before the update, and optional gradient accumulation.
"""

import re

import jax
import optax

from gseps_jax import sharding

SCHEDULES = ("step", "cosine")


def lr_schedule(optim_cfg, steps_per_epoch: int, total_steps: int | None = None) -> optax.Schedule:
  """Head learning rate as a function of the (optimizer) step.

  Args:
    optim_cfg: `config.optim` (lr, warmup_steps, schedule, decay_epochs, decay_factor,
      min_lr_ratio).
    steps_per_epoch: optimizer steps per epoch (step decay boundaries).
    total_steps: the run's length: the cosine schedule reaches `min_lr_ratio * lr` there. Only
      callers that need just the optimiser state's structure (restoring, exporting) may omit it.
  """
  kind = optim_cfg.get("schedule", "step")
  warm = int(optim_cfg.warmup_steps)
  lr = float(optim_cfg.lr)
  if kind == "cosine":
    total = max(int(total_steps or 1), warm + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warm, decay_steps=total,
        end_value=lr * float(optim_cfg.get("min_lr_ratio", 0.0)))
  if kind != "step":
    raise ValueError(f"config.optim.schedule must be one of {SCHEDULES}, got {kind!r}.")
  boundaries = {int(e * steps_per_epoch): optim_cfg.decay_factor
                for e in optim_cfg.decay_epochs if e * steps_per_epoch > 0}
  decay = optax.piecewise_constant_schedule(lr, boundaries)
  if warm <= 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warm),
       lambda s: decay(s + warm)], [warm])


def param_labels(params, backbone_patterns, frozen_patterns=()) -> dict:
  """'frozen', 'backbone' or 'head' per leaf, from regexes over the '/'-joined parameter path
  (frozen wins)."""
  frozen = [re.compile(p) for p in frozen_patterns]
  pats = [re.compile(p) for p in backbone_patterns]

  def label(path, _):
    name = sharding.path_str(path)
    if any(p.search(name) for p in frozen):
      return "frozen"
    return "backbone" if any(p.search(name) for p in pats) else "head"

  return jax.tree_util.tree_map_with_path(label, params)


def trainable_leaves(params, optim_cfg) -> list:
  """The leaves of `params` the optimiser updates (every leaf not matched by
  `optim_cfg.frozen_patterns`), in tree order. The train step's `param_norm` is their norm: a
  frozen leaf cannot explode, and reading it every step is not free (a frozen MiniLM is 22.6M
  floats, 90 MB; a frozen BERT-base 440 MB). Labels come from the static tree paths, so under
  `jit` this is a trace-time selection."""
  frozen = tuple(optim_cfg.get("frozen_patterns", ()))
  if not frozen:
    return jax.tree.leaves(params)
  labels = param_labels(params, (), frozen)
  return [p for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
          if lab != "frozen"]


def make_optimizer(optim_cfg, steps_per_epoch: int, params, total_steps: int | None = None):
  """Returns (optax transformation, head schedule, backbone schedule)."""
  head = lr_schedule(optim_cfg, steps_per_epoch, total_steps)
  mult = float(optim_cfg.backbone_lr_mult)
  backbone = lambda s: mult * head(s)

  def adamw(sched):
    return optax.adamw(sched, weight_decay=optim_cfg.weight_decay)

  frozen = tuple(optim_cfg.get("frozen_patterns", ()))
  transforms = {"head": adamw(head), "backbone": adamw(backbone)}
  if frozen:  # only then: the state of configs without frozen parameters keeps its structure
    transforms["frozen"] = optax.set_to_zero()
  tx = optax.chain(
      optax.clip_by_global_norm(optim_cfg.clip_norm),
      optax.multi_transform(transforms,
                            param_labels(params, optim_cfg.backbone_patterns, frozen)),
  )
  if int(optim_cfg.grad_accum) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(optim_cfg.grad_accum))
  return tx, head, backbone
