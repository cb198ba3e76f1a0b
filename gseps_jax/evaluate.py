r"""Retrieval evaluation: `python -m gseps_jax.evaluate --checkpoint=WORKDIR --protocol=flickr1k`.

Encodes every image and caption of a split once (batched, sharded over the mesh), scores all
image x caption pairs on device with the model's tiled scorer under `jax.jit` (GRM: three kernel
calls on precomputed token sets; SEPS: caption-dependent selection per tile), then computes
R@1/5/10, median/mean rank and rSum. The same `Evaluator` runs inside the training loop.

Protocols: flickr1k (whole 1K test), coco1k (mean over the 5 folds of 1,000 images), coco5k
(whole 5K test), all (coco1k and coco5k). SEPS: `--dense_mode=honest` (default: the dense
caption describes the candidate image) or `parity` (the official code's behaviour: the caption's
own ground-truth dense caption — leaks the answer; reported as such).
"""

import functools
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from etils import epath
from jax.experimental.shard_map import shard_map
from jax.sharding import PartitionSpec as P

from gseps_jax import metrics as metrics_lib
from gseps_jax import sharding

log = logging.getLogger(__name__)

PROTOCOLS = ("flickr1k", "coco1k", "coco5k", "all")


def _pad_rows(x, multiple):
  n = x.shape[0]
  pad = (-n) % multiple
  if pad:
    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
  return x


def format_table(m: dict, title: str = "") -> str:
  cols = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
  head = " | ".join(f"{c:>7}" for c in cols)
  row = " | ".join(f"{m[c]:7.2f}" for c in cols)
  lines = [title, head, row] if title else [head, row]
  return "\n".join(lines)
