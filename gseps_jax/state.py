"""The train state and how it is built: initialised in its shardings, or restored for inference.

Everything that needs the model's parameters without training them (evaluate, export, retrieve,
explain, the benchmarks) comes here, never to the trainer:

  * `init_params(model, batch, rng)`: the ONE place that calls `model.init` (with the rng streams
    every model may ask for, `RNG_NAMES`); `abstract_params` is its `jax.eval_shape`.
  * `create_train_state(...)`: `jit(init, out_shardings=...)` plus pretrained encoders spliced in.
  * `restore_params(path)`: (config, model, params, step) of a workdir or a checkpoint step,
    restored onto abstract arrays that carry their shardings (any mesh).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import models
from gseps_jax import optim
from gseps_jax import sharding

# The rng streams of `model.init` / `model.apply`: parameters, encoder dropout, GRM's Gumbel
# sampling and region noise (unused streams are ignored by Flax).
RNG_NAMES = ("params", "dropout", "gumbel", "noise")
TRAIN_RNG_NAMES = RNG_NAMES[1:]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def train_rngs(rng: jax.Array) -> dict:
  """The training forward's rng streams ('dropout', 'gumbel', 'noise') split from one key."""
  return dict(zip(TRAIN_RNG_NAMES, jax.random.split(rng, len(TRAIN_RNG_NAMES))))


def init_params(model, batch: dict, rng: jax.Array, *, split: bool = True) -> dict:
  """`model.init(...)['params']` as a plain (unfrozen) nested dict.

  Args:
    model: a model of `models.build_model`.
    batch: a batch of the model's inputs (`sample_batch`; only shapes matter).
    rng: PRNG key; `split=True` gives every stream its own key split from it (the trainer),
      `split=False` hands `rng` itself to every stream (so 'params' draws from `rng`).
  """
  keys = jax.random.split(rng, len(RNG_NAMES)) if split else [rng] * len(RNG_NAMES)
  variables = model.init(dict(zip(RNG_NAMES, keys)), batch, train=False)
  return flax.core.unfreeze(variables["params"])


def abstract_params(model, batch: dict) -> dict:
  """`jax.ShapeDtypeStruct` tree of the model's params (nothing is allocated or compiled)."""
  return jax.eval_shape(lambda: init_params(model, batch, jax.random.key(0)))


def sample_batch(config, batch_size: int = 2) -> dict:
  """A zero batch with the shapes the model expects (for init and abstract evaluation)."""
  d = config.data
  size = d.image_size
  return {
      "image": np.zeros((batch_size, size, size, 3), np.float32),
      "input_ids": np.zeros((batch_size, d.max_len), np.int32),
      "attention_mask": np.ones((batch_size, d.max_len), np.int32),
      "dense_ids": np.zeros((batch_size, d.dense_max_len), np.int32),
      "dense_mask": np.ones((batch_size, d.dense_max_len), np.int32),
      "image_index": np.arange(batch_size, dtype=np.int32),
  }


def initial_state(params, tx) -> TrainState:
  """Step 0 with a fresh optimiser state for `params`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_and_shardings(init_fn, mesh, config):
  """(abstract state of `init_fn()`, its shardings under `config.sharding_rules`)."""
  abstract = jax.eval_shape(init_fn)
  shardings = sharding.tree_shardings(abstract, mesh, config.sharding_rules, config.fsdp_min_size)
  return abstract, shardings


def with_shardings(abstract, shardings):
  """Abstract arrays that carry their shardings (what orbax restores onto)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def create_train_state(config, model, tx, batch, mesh, rng, pretrained=None):
  """Initialises the state directly in its shardings.

  Args:
    batch: a sample batch (`sample_batch`) fixing the input shapes.
    rng: the init key (split over the rng streams, `init_params`).
    pretrained: {submodule name: params} to splice in (`load_pretrained`).

  Returns:
    (state, abstract state, state shardings).
  """

  def init():
    return initial_state(init_params(model, batch, rng), tx)

  abstract, shardings = abstract_and_shardings(init, mesh, config)
  state = jax.jit(init, out_shardings=shardings,
                  compiler_options=sharding.compiler_options(config))()
  if pretrained:
    params = dict(state.params)
    for name, tree in pretrained.items():
      params[name] = jax.tree.map(
          lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
          tree, state.params[name])
    state = state.replace(params=params)
  return state, abstract, shardings


def load_pretrained(config) -> dict:
  """Encoder params from local HF directories named in the config (empty when training from
  scratch). Keys are the model's submodule names."""
  from gseps_jax.interop import hf  # pylint: disable=g-import-not-at-top
  out = {}
  for key, name in (("vision_hf_dir", "vision_encoder"), ("text_hf_dir", "text_encoder")):
    d = config.model.get(key, "")
    if d:
      _, params = hf.load_hf_encoder(d)
      out[name] = params
  return out


def restore_params(path, mesh=None, config=None):
  """(config, model, params, step) from a workdir or WORKDIR/checkpoints/STEP.

  The optimiser is rebuilt from the saved config only to know the state's structure; its
  values are not read into memory beyond what orbax restores.
  """
  saved_config, _, _ = ckpt_lib.load_config_from_checkpoint(path)
  config = config or saved_config
  mesh = mesh or sharding.make_mesh(config.mesh)
  model = models.build_model(config.model)
  sample = sample_batch(config)
  tx, _, _ = optim.make_optimizer(config.optim, 1, abstract_params(model, sample))

  def init():
    return initial_state(init_params(model, sample, jax.random.key(0)), tx)

  abstract = with_shardings(*abstract_and_shardings(init, mesh, config))
  # A step in `path` is used as asked (a damaged one is an error); a workdir falls back from a
  # damaged newest step to the newest good one, with a warning naming the damaged step.
  workdir, step = ckpt_lib.resolve(path)
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True, best_metric=None)
  try:
    restored = ckpt.restore(abstract, config, step=step)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"No readable checkpoint in {workdir}.")
  state, _ = restored
  return config, model, state.params, int(state.step)
