"""Jitted encoders and scorer of one restored model, for indexing and queries (`Retriever`)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np

from gseps_jax import sharding


def bucket(n: int, cap: int) -> int:
  """Padded batch size for `n` items: the next power of two, at most `cap`.

  Padding to a few sizes keeps the number of compiled programs small (log2(cap) + 1) while never
  spending more than 2x the compute on padding.
  """
  if n < 1:
    raise ValueError(f"Need at least one item, got {n}.")
  return min(cap, 1 << (n - 1).bit_length())


def concat(trees: list) -> Any:
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *trees)


class Retriever:
  """Jitted encoders and scorer for one restored model.

  Every batch is padded to `bucket(n, batch_size)` rows, so a session compiles at most
  log2(batch_size) + 1 programs per function whatever the query sizes.

  Attributes:
    config, model, params: as `state.restore_params` returns them.
    tok: the config's tokenizer; pp: its `pipeline.Preprocess`.
  """

  def __init__(self, config, model, params, *, batch_size: int | None = None,
               chunk: int | None = None):
    from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    self.config, self.model, self.params = config, model, params
    self.batch_size = int(batch_size or config.eval.batch_size)
    self.chunk = int(chunk or config.eval.chunk)
    self.tok = pipeline.tokenizer_from_config(config)
    self.pp = pipeline.Preprocess.from_config(config.data)
    self._encode_images = jax.jit(functools.partial(model.apply, method="encode_images"))
    self._encode_texts = jax.jit(functools.partial(model.apply, method="encode_texts"))
    self._scorers: dict[str, Callable] = {}

  # -- images ---------------------------------------------------------------------------------
  def preprocess(self, data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes -> `[S, S, 3]` float32 exactly as evaluation preprocesses them."""
    from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.eval_image(data, self.pp, name)

  def encode_images(self, images: np.ndarray) -> dict:
    """`[N, S, S, 3]` normalised images -> host feature tree, leading axis N."""
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = sharding.pad_rows(chunk, bucket(len(chunk), self.batch_size))
      feats = self._encode_images({"params": self.params}, padded)
      out.append(jax.tree.map(lambda a, n=len(chunk): np.asarray(a)[:n], feats))
    return concat(out)

  # -- texts ----------------------------------------------------------------------------------
  def tokenize(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    return self.tok.encode_batch(list(texts), max_len)

  def encode_texts(self, texts: Sequence[str], *, dense: bool = False) -> dict:
    """Captions (or dense captions) -> host feature tree, leading axis len(texts)."""
    if not texts:
      raise ValueError("No texts to encode.")
    max_len = self.pp.dense_max_len if dense else self.pp.max_len
    ids, mask = self.tokenize(texts, max_len)
    out = []
    for start in range(0, len(texts), self.batch_size):
      i, m = ids[start:start + self.batch_size], mask[start:start + self.batch_size]
      n = bucket(len(i), self.batch_size)
      feats = self._encode_texts({"params": self.params}, sharding.pad_rows(i, n),
                                 sharding.pad_rows(m, n))
      out.append(jax.tree.map(lambda a, k=len(i): np.asarray(a)[:k], feats))
    return concat(out)

  # -- scores ---------------------------------------------------------------------------------
  def _scorer(self, dense_mode: str) -> Callable:
    """dense_mode: 'none' (no dense branch), 'honest' (per-image dense features) or
    'sparse_only' (a model with a dense branch scored without it)."""
    if dense_mode not in self._scorers:
      model = self.model
      if dense_mode == "sparse_only":
        model = model.sparse_only()  # same params: the head's weights are shared
        kw = model.score_options()  # the trained dense mode (it sets the parity text cut)
      else:
        kw = model.score_options("honest")
      chunk = self.chunk

      def score(params, img, txt, dense):
        return model.apply({"params": params}, img, txt, dense, chunk=chunk, method="score",
                           **kw)

      self._scorers[dense_mode] = jax.jit(score)
    return self._scorers[dense_mode]

  def score(self, img_feats: dict, txt_feats: dict, dense_feats: dict | None = None, *,
            dense_mode: str = "none") -> np.ndarray:
    """`[Ni, Nc]` scores (row = image, column = caption); captions padded to a bucket size."""
    nc = len(jax.tree.leaves(txt_feats)[0])
    bs = self.batch_size
    n = bucket(nc, bs) if nc <= bs else -(-nc // bs) * bs
    txt = jax.tree.map(lambda a: sharding.pad_rows(np.asarray(a), n), txt_feats)
    dense = dense_feats if dense_mode == "honest" else None
    sims = self._scorer(dense_mode)(self.params, img_feats, txt, dense)
    return np.asarray(sims)[:, :nc]
