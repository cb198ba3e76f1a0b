"""Optimiser and learning-rate schedule of the SEPS/GRM recipe, in optax.

AdamW (weight decay 1e-4) with a linear warm-up, step decay (x`decay_factor` at each epoch in
`decay_epochs`), backbone parameters (ViT/Swin, BERT) at `backbone_lr_mult` x the head lr,
global-norm clipping before the update, and optional gradient accumulation.
"""

import re

import jax
import optax

from gseps_jax import sharding


def lr_schedule(optim_cfg, steps_per_epoch: int) -> optax.Schedule:
  """Head learning rate as a function of the (optimizer) step."""
  boundaries = {int(e * steps_per_epoch): optim_cfg.decay_factor
                for e in optim_cfg.decay_epochs if e * steps_per_epoch > 0}
  decay = optax.piecewise_constant_schedule(optim_cfg.lr, boundaries)
  warm = int(optim_cfg.warmup_steps)
  if warm <= 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, optim_cfg.lr, warm),
       lambda s: decay(s + warm)], [warm])


def param_labels(params, backbone_patterns) -> dict:
  """'backbone' or 'head' per leaf, from regexes over the '/'-joined parameter path."""
  pats = [re.compile(p) for p in backbone_patterns]

  def label(path, _):
    name = sharding.path_str(path)
    return "backbone" if any(p.search(name) for p in pats) else "head"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(optim_cfg, steps_per_epoch: int, params):
  """Returns (optax transformation, head schedule, backbone schedule)."""
  head = lr_schedule(optim_cfg, steps_per_epoch)
  mult = float(optim_cfg.backbone_lr_mult)
  backbone = lambda s: mult * head(s)

  def adamw(sched):
    return optax.adamw(sched, weight_decay=optim_cfg.weight_decay)

  tx = optax.chain(
      optax.clip_by_global_norm(optim_cfg.clip_norm),
      optax.multi_transform({"head": adamw(head), "backbone": adamw(backbone)},
                            param_labels(params, optim_cfg.backbone_patterns)),
  )
  if int(optim_cfg.grad_accum) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(optim_cfg.grad_accum))
  return tx, head, backbone
