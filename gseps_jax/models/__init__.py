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


def uses_dense(model_cfg) -> bool:
  """Whether the model `model_cfg` describes scores dense captions (the data layer asks this to
  decide which text features to cache). A model outside `MODELS` (e.g. the baselines of
  benchmarks/demo_table.py, trained by the same loop) reads none."""
  return model_cfg.get("name") in MODELS and build_model(model_cfg).uses_dense


def tokenizes_dense(model_cfg) -> bool:
  """Whether batches for the model `model_cfg` describes carry tokenised dense captions (GRM's
  do not: the data layer skips their tokenisation). True outside `MODELS` (as before)."""
  return model_cfg.get("name") not in MODELS or build_model(model_cfg).tokenizes_dense
