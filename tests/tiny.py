"""Tiny configs and a generated dataset shared by the training/evaluation/export tests."""

import contextlib
import fcntl
import os
import pathlib
import tempfile

DATA_DIR = pathlib.Path(tempfile.gettempdir()) / f"gseps_jax_test_tfds_{os.getuid()}"


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
