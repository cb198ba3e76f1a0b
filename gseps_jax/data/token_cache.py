"""Tokenised texts of a split, computed once and read by every training batch.

Two kinds of text never change between epochs:
- a dense caption (fixed per image, not augmented; only left/right-swapped when its image is
  flipped). Tokenising it per example cost ~0.4 ms of host CPU per image (a LLaVA caption is
  ~80-150 words), a fifth of what the whole SEPS input path costs per image (docs/performance.md,
  "Input pipeline");
- a caption, when training applies no text augmentation (`data.text_aug_prob = 0`, e.g. every
  frozen, cached text tower): then its word pieces depend only on (image, caption choice,
  flipped). Tokenising one per example cost ~0.1 ms (the demo: ~7 ms of a ~30 ms batch of 64).

This module tokenises every such text of a split once (and, when the pipeline flips, the swapped
version of each text the swap changes) into

  <cache dir>/<dataset>_<split>_<kind>_tokens_<key>.npy   int32 `[R, L]`, memory-mapped

(kind `dense` or `captions`; the cache dir of `text_cache.cache_dir`), padding stored as -1 so
that the mask is `row >= 0` whatever the vocabulary's pad id is. `key` hashes the vocabulary
file, `max_len`, the texts and whether swapped rows are included, so a changed caption or
vocabulary gives a new file. Rows are addressed like the frozen text features
(`text_cache.TextCache`: row offsets per image, the swapped row of each text), written to a
temporary name and renamed (a reader never sees a partial file), one builder per file (the others
wait on a lock and read its result).

Training batches then carry `dense_ids`/`dense_mask` (and `input_ids`/`attention_mask`) looked up
by (image index, caption choice, flipped) at the batch level, equal to what per-example
tokenisation gives (`tests/test_token_cache.py`); `data.cache_dense_tokens = False`
(`data.cache_caption_tokens = False`) tokenises per example as before.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import numpy as np
from etils import epath

from gseps_jax.data import text_cache
from gseps_jax.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class TokenCache:
  """Token rows of a split's texts (`text_cache.TextCache` addressing, int32 table)."""
  rows: text_cache.TextCache
  pad_id: int

  def lookup(self, item, flipped, choice=None) -> tuple[np.ndarray, np.ndarray]:
    """(`ids [B, L] int32`, `mask [B, L] int32`) of text `choice` (default 0: the dense
    caption) of each `item`, swapped where `flipped`."""
    if choice is None:
      choice = np.zeros(len(np.asarray(item)), np.int64)
    table = self.rows.lookup(item, choice, flipped)
    valid = table >= 0
    return np.where(valid, table, self.pad_id).astype(np.int32), valid.astype(np.int32)


def cache_key(*, vocab: str, max_len: int, texts: Sequence[str], flips: bool) -> str:
  """Hex key of a token file: vocabulary digest, max_len, the texts (in order), flips."""
  return text_cache.texts_key({"format": FORMAT_VERSION, "vocab": vocab,
                               "max_len": int(max_len), "flips": bool(flips)}, texts)


def write_tokens(texts: Sequence[str], path, *, tok: tokenizer_lib.Tokenizer, max_len: int,
                 batch_size: int = 1024) -> None:
  """Tokenises `texts` into int32 `[len(texts), max_len]` at `path` (padding -1), atomically."""
  with text_cache.atomic_npy(path) as tmp:
    table = np.lib.format.open_memmap(str(tmp), mode="w+", dtype=np.int32,
                                      shape=(len(texts), max_len))
    for start in range(0, len(texts), batch_size):
      ids, mask = tok.encode_batch(texts[start:start + batch_size], max_len)
      table[start:start + len(ids)] = np.where(mask > 0, ids, -1)
    table.flush()
    del table


KINDS = ("dense", "captions")


def for_split(data_config, source, split: str, *, tok: tokenizer_lib.Tokenizer, max_len: int,
              flips: bool, kind: str = "dense") -> TokenCache:
  """The tokens of a split's dense captions (`kind="dense"`) or captions (`"captions"`), built
  if absent (module doc). `flips`: include the left/right-swapped rows (a training split with
  `data.hflip > 0`)."""
  if kind not in KINDS:
    raise ValueError(f"token cache kind must be one of {KINDS}, got {kind!r}.")
  texts, offsets = text_cache.split_texts(source, kind)
  flip_rows = None
  if flips:
    texts, flip_rows = text_cache.with_flips(texts)
  key = cache_key(vocab=text_cache.file_digest(epath.Path(tok.source)), max_len=max_len,
                  texts=texts, flips=flips)
  path = (text_cache.cache_dir(data_config)
          / f"{data_config.name}_{split}_{kind}_tokens_{key}.npy")

  def build():
    t0 = time.time()
    write_tokens(texts, path, tok=tok, max_len=max_len)
    log.info("Tokenised %d %s texts of %s %s in %.1f s into %s.", len(texts), kind,
             data_config.name, split, time.time() - t0, path)
  text_cache.build_once(path, build)
  return TokenCache(rows=text_cache.TextCache(path=str(path), offsets=offsets,
                                              flip_rows=flip_rows), pad_id=int(tok.pad_id))


def enabled(data_config, *, tokenizes_dense: bool) -> bool:
  """Whether training batches take their dense tokens from the cache."""
  return bool(tokenizes_dense) and bool(data_config.get("cache_dense_tokens", True))


def captions_enabled(data_config) -> bool:
  """Whether training batches take their caption tokens from the cache: only without text
  augmentation (`data.text_aug_prob = 0`; with it every draw is a new token sequence)."""
  return (bool(data_config.get("cache_caption_tokens", True))
          and float(data_config.get("text_aug_prob", 0.2)) == 0.0)
