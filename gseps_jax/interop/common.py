"""What every conversion shares: its error type, the model check, the expected param tree."""

import json

import numpy as np

from gseps_jax import models
from gseps_jax import state as state_lib
from gseps_jax.interop import layout

OFFICIAL_FILE = "model_best.pth"  # the official SEPS code's checkpoint file name


class ExportError(ValueError):
  """The checkpoint or state dict cannot be converted (with the reason and what to do)."""


def model_cfg(config):
  """`config.model` of a full run config; a model config as it is."""
  return config.model if "model" in config else config


def check_model_type(config) -> str:
  """`config.model.name`, checked against the model registry."""
  name = model_cfg(config).get("name")
  if name not in models.MODELS:
    raise ExportError(f"Unknown model type {name!r} (config.model.name); export supports "
                      f"{sorted(models.MODELS)}.")
  return name


def abstract_params(config, model=None):
  """`jax.ShapeDtypeStruct` tree of the model's params (nothing is allocated or compiled)."""
  model = model or models.build_model(model_cfg(config))
  return state_lib.abstract_params(model, state_lib.sample_batch(config, 1))


def check_params(params, expected, what: str) -> None:
  """Raises ExportError listing every missing, unexpected and mis-shaped leaf of `params`."""
  problems = layout.compare_shapes(
      {"/".join(p): np.shape(x) for p, x in layout.flatten(params).items()},
      {"/".join(p): x.shape for p, x in layout.flatten(expected).items()})
  if problems:
    raise ExportError(f"{what} does not match the model of this config. " + " ".join(problems))


def _json_default(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  return list(x)


def config_dict(config) -> dict:
  """The config as plain JSON values."""
  return json.loads(json.dumps(config.to_dict(), default=_json_default))
