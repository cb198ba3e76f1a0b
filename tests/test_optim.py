"""Learning-rate schedules (step, cosine with warm-up) against their formulas; frozen
parameters get no update and no optimiser state."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from gseps_jax import optim


def _cfg(**kw):
  base = dict(lr=1e-3, backbone_lr_mult=0.1, weight_decay=1e-4, decay_epochs=(2,),
              decay_factor=0.3, warmup_steps=10, clip_norm=2.0, grad_accum=1,
              backbone_patterns=(r"^backbone/",), schedule="step", min_lr_ratio=0.0,
              frozen_patterns=())
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _cosine_formula(step, *, lr, warm, total, end):
  if step < warm:
    return lr * step / warm
  t = min(step - warm, total - warm) / (total - warm)
  return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("warm,min_ratio", [(10, 0.0), (0, 0.1)])
def test_cosine_schedule_matches_formula(warm, min_ratio):
  cfg = _cfg(schedule="cosine", warmup_steps=warm, min_lr_ratio=min_ratio)
  sched = optim.lr_schedule(cfg, steps_per_epoch=7, total_steps=110)
  for step in (0, 1, 5, 10, 11, 35, 60, 100, 109, 110, 150):
    want = _cosine_formula(step, lr=1e-3, warm=warm, total=110, end=1e-3 * min_ratio)
    assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step
  # Decays: the peak right after the warm-up, the end value at the last step.
  assert float(sched(warm)) == pytest.approx(1e-3, rel=1e-6)
  assert float(sched(110)) == pytest.approx(1e-3 * min_ratio, abs=1e-9)


def test_step_schedule_unchanged():
  sched = optim.lr_schedule(_cfg(), steps_per_epoch=7)
  # Linear warm-up over 10 steps, then lr, x0.3 from epoch 2 (step 14, shifted by the warm-up).
  assert float(sched(5)) == pytest.approx(5e-4)
  assert float(sched(10)) == pytest.approx(1e-3)
  assert float(sched(13)) == pytest.approx(1e-3)
  assert float(sched(10 + 14)) == pytest.approx(3e-4)
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.lr_schedule(_cfg(schedule="linear"), 7)


def test_frozen_parameters_not_updated_and_stateless():
  params = {"frozen": {"w": jnp.ones((3,))}, "backbone": {"w": jnp.ones((3,))},
            "head": {"w": jnp.ones((3,))}}
  cfg = _cfg(frozen_patterns=(r"^frozen/",), warmup_steps=0)
  tx, _, _ = optim.make_optimizer(cfg, 7, params, total_steps=100)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, _ = tx.update(grads, state, params)
  assert not np.asarray(updates["frozen"]["w"]).any()  # no step, no weight decay
  assert np.asarray(updates["head"]["w"]).all() and np.asarray(updates["backbone"]["w"]).all()
  # The frozen leaf carries no Adam moments: the state holds 2 moments x 2 trainable leaves.
  sizes = [x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0]
  assert sum(sizes) == 2 * 2 * 3
  # Without frozen patterns, the state keeps its former structure (old checkpoints restore).
  tx0, _, _ = optim.make_optimizer(_cfg(), 7, params)
  assert set(tx0.init(params)[1].inner_states) == {"head", "backbone"}
  assert isinstance(tx0, optax.GradientTransformation)
