"""Tiny configs and a generated dataset shared by the training/evaluation/export tests."""

import contextlib
import fcntl
import hashlib
import os
import pathlib
import tempfile

_REPO = pathlib.Path(__file__).resolve().parents[1]
# The generator's code: a changed generator (or example format) gets a fresh data dir instead of
# being tested on data an older version built. The config (sizes, seed, image size) is keyed by
# tfds itself: each combination is its own builder config folder below DATA_DIR.
GENERATOR_FILES = ("gseps_jax/data/synthetic.py", "gseps_jax/data/karpathy.py")


def generator_hash(root: pathlib.Path = _REPO) -> str:
  """A short hash of the generator's source files under `root` (the repository)."""
  h = hashlib.sha256()
  for name in GENERATOR_FILES:
    h.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
  return h.hexdigest()[:12]


DATA_DIR = (pathlib.Path(tempfile.gettempdir())
            / f"gseps_jax_test_tfds_{os.getuid()}_{generator_hash()}")


def minilm_dir() -> str:
  from gseps_jax.data import tokenizer
  return str(tokenizer.installed_minilm_dir())


def tiny_config(model: str = "grm", **overrides):
  """`configs/<model>_vit.py:tiny` on a 32-image synthetic_regions set (64 px)."""
  if model == "grm":
    from configs import grm_vit as mod
  elif model == "seps":
    from configs import seps_vit as mod
  else:
    from configs import laps_vit as mod
  c = mod.get_config("tiny")
  c.data.name = "synthetic_regions"
  c.data.data_dir = str(DATA_DIR)
  c.data.synthetic.update(dict(num_train=32, num_dev=8, num_test=8, image_size=64, seed=0))
  c.data.image_size = 64
  c.data.tokenizer_dir = minilm_dir()
  c.data.max_len = 16
  c.data.dense_max_len = 24
  c.train.batch_size = 8
  c.train.max_steps = 4
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.final_eval_split = ""
  c.checkpoint.every_steps = 1000
  c.eval.batch_size = 8
  c.eval.chunk = 8
  c.mesh.data = -1
  c.mesh.fsdp = 1
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


@contextlib.contextmanager
def _lock():
  DATA_DIR.parent.mkdir(parents=True, exist_ok=True)
  with open(str(DATA_DIR) + ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def ensure_data(config):
  """Builds the tiny synthetic set once (safe across pytest-xdist workers)."""
  from gseps_jax.data import prepare
  with _lock():
    prepare.ensure_prepared(config.data)


def random_checkpoint(workdir, config, seed: int = 0, step: int = 2):
  """A checkpoint of `config`'s model with random parameters far from any default init (every
  leaf N(0, 0.1); LayerNorm-like scales 1 + N(0, 0.1), scalar scales 1.7), saved as the trainer
  saves it (fresh optimiser state). Cheap: no training step is compiled. Returns the params."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gseps_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from gseps_jax import optim  # pylint: disable=g-import-not-at-top
  from gseps_jax.interop import common as interop_common  # pylint: disable=g-import-not-at-top
  from gseps_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def one(path, s):
    x = rng.normal(0.0, 0.1, s.shape)
    if path[-1].key == "scale":
      x = 1.0 + x if s.shape else np.full(s.shape, 1.7)
    return np.asarray(x, np.float32)

  params = jax.tree_util.tree_map_with_path(one, interop_common.abstract_params(config))
  tx, _, _ = optim.make_optimizer(config.optim, 10, params)
  state = state_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                             opt_state=jax.jit(tx.init)(params))
  ckpt = ckpt_lib.Checkpointer(workdir, best_metric=None, async_save=False)
  try:
    ckpt.save(step, state, {"config": config.to_dict(),
                            "fingerprint": ckpt_lib.fingerprint(config)})
    ckpt.wait()
  finally:
    ckpt.close()
  return params


def random_inputs(config, seed, num_images, caption_lengths, dense_lengths):
  """Random model inputs in the shapes `config` expects: images [num_images, H, W, 3], captions
  ([n, max_len] ids, mask) with the given lengths, dense captions ([num_images, dense_max_len]
  ids, mask) with theirs. Each text starts with [CLS] (101) and ends with [SEP] (102)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  images = rng.normal(size=(num_images, size, size, 3)).astype(np.float32)

  def texts(max_len, lengths):
    n = len(lengths)
    ids = rng.integers(1000, 30000, size=(n, max_len)).astype(np.int32)
    mask = (np.arange(max_len)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids[:, 0] = 101
    ids[np.arange(n), np.asarray(lengths) - 1] = 102
    return np.where(mask > 0, ids, 0).astype(np.int32), mask

  return (images, texts(config.data.max_len, caption_lengths),
          texts(config.data.dense_max_len, dense_lengths))


def abstract(tree):
  """jax.ShapeDtypeStruct (with sharding) of every array in `tree`: a restore target."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def fingerprinted_checkpoint(workdir, config, step: int = 1):
  """A one-leaf checkpoint ({"w": zeros(2)}) at `step` whose meta holds `config`'s model
  fingerprint, saved synchronously: enough to test which configs may restore it. Returns (the
  Checkpointer, the restore target)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gseps_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  ck = ckpt_lib.Checkpointer(workdir, best_metric=None, async_save=False)
  tree = {"w": jnp.zeros(2)}
  ck.save(step, tree, {"fingerprint": ckpt_lib.fingerprint(config)})
  ck.wait()
  return ck, abstract(tree)


def official_head_shapes(embed_dim: int, vision_width: int, text_width: int,
                         num_aggregated: int) -> dict:
  """Official SEPS name -> torch shape of every non-encoder tensor, written from the official
  module definitions (not from our tables): the oracle of the layout tests."""
  e, hidden, n_c = embed_dim, int(embed_dim * 0.2), num_aggregated
  return {
      "img_enc.vision_proj.weight": (e, vision_width), "img_enc.vision_proj.bias": (e,),
      "txt_enc.fc.weight": (e, text_width), "txt_enc.fc.bias": (e,),
      "cross_net.aggr_net.scale": (1, 1, 1),
      "cross_net.aggr_net.weight.0.weight": (e,), "cross_net.aggr_net.weight.0.bias": (e,),
      "cross_net.aggr_net.weight.1.weight": (hidden, e),
      "cross_net.aggr_net.weight.1.bias": (hidden,),
      "cross_net.aggr_net.weight.3.weight": (n_c, hidden),
      "cross_net.aggr_net.weight.3.bias": (n_c,)}
