"""Queries against an index: text -> images (`search_texts`), image -> captions (`search_image`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gseps_jax.search import encoder
from gseps_jax.search import index as index_lib


def search_texts(retriever: encoder.Retriever, index: index_lib.Index, texts: Sequence[str],
                 k: int = 5) -> list[list[dict]]:
  """Text -> images. Returns per text the top-k hits `{rank, score, index, name, path}`."""
  txt = retriever.encode_texts(texts)
  sims = retriever.score(index.images, txt, index.dense, dense_mode=index.meta["dense_mode"])
  return [_top_k(sims[:, j], k, lambda i: {"name": index.meta["images"][i]["name"],
                                           "path": index.meta["images"][i]["path"]})
          for j in range(sims.shape[1])]


def search_image(retriever: encoder.Retriever, image: bytes, captions: Sequence[str], *,
                 k: int = 5, caption_feats: dict | None = None,
                 dense_caption: str | None = None, name: str = "query") -> tuple[list[dict], str]:
  """Image -> captions. Returns (top-k hits `{rank, score, index, caption}`, dense mode used).

  A SEPS model with a dense branch scores honestly with `dense_caption` (the query image's own
  dense caption) and with the sparse branch only when there is none.
  """
  img = retriever.encode_images(retriever.preprocess(image, name)[None])
  txt = caption_feats if caption_feats is not None else retriever.encode_texts(captions)
  mode, dense = "none", None
  if retriever.model.uses_dense:
    mode = "honest" if dense_caption else "sparse_only"
    if dense_caption:
      dense = retriever.encode_texts([dense_caption], dense=True)
  sims = retriever.score(img, txt, dense, dense_mode=mode)
  return _top_k(sims[0], k, lambda i: {"caption": captions[i]}), mode


def _top_k(scores: np.ndarray, k: int, describe) -> list[dict]:
  # Stable sort on -score: ties keep index order, so results are reproducible.
  order = np.argsort(-scores, kind="stable")[:k]
  return [dict(rank=r + 1, score=float(scores[i]), index=int(i), **describe(int(i)))
          for r, i in enumerate(order)]


def format_hits(hits: list[dict], label: str) -> str:
  """A plain-text table: rank, score, `label` column."""
  key = "caption" if label == "caption" else "name"
  width = max([len(label)] + [len(str(h[key])) for h in hits])
  lines = [f"{'rank':>4}  {'score':>9}  {label}", f"{'-' * 4}  {'-' * 9}  {'-' * width}"]
  lines += [f"{h['rank']:>4}  {h['score']:9.4f}  {h[key]}" for h in hits]
  return "\n".join(lines)
