"""Model families. `build_model(config.model)` is the only constructor train/evaluate use."""

from gseps_jax.models import grm
from gseps_jax.models import seps

MODELS = {"grm": grm.GRM, "seps": seps.SEPS}


def build_model(model_cfg):
  """The Linen model for `model_cfg.name` (grm | seps; LAPS is seps with the dense branch off)."""
  name = model_cfg.name
  if name not in MODELS:
    raise ValueError(f"config.model.name={name!r} is not a known model; choose one of "
                     f"{sorted(MODELS)}.")
  return MODELS[name].from_config(model_cfg)

