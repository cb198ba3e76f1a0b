"""Cached features of a frozen text tower: computed once per split, read by every batch.

With `config.model.freeze_text` the pretrained text encoder is a fixed feature extractor, so its
token features for a split's captions never change. Running it every step costs more than the
rest of a small model (the demo: MiniLM ~22 GFLOP per batch of 64 at 48 tokens, ~8x its ViT's
forward + backward). This module runs it once, deterministically (`train=False`), over every
caption of a split and keeps the outputs on disk:

  <cache dir>/<dataset>_<split>_<kind>_<key>.npy   float16 `[R, L, D_text]`, memory-mapped

where `key` hashes everything the features depend on: the text weight files, the vocabulary,
`max_len`, the text config and the split's texts (so a changed caption, vocabulary, weight file
or length gives a new file, never stale features). Rows are the split's texts in dataset order
(captions: all captions of image 0, then image 1, ...; dense: one per image), followed, when the
training pipeline flips images (`data.hflip > 0`), by the left/right-swapped version of every
text that changes under the swap. The file is written to a temporary name and renamed, so a
reader never sees a partial cache.

Batches carry the features as `text_hidden [B, L, D_text]` (`dense_hidden` for SEPS dense
captions); the models use them instead of calling the text encoder (whose parameters stay in the
tree, so export and `retrieve` on new text still work).

Not cached (the encoder runs as before): a trainable text tower, no pretrained `text_hf_dir`
(random init: the weights live only in the train state), training with text augmentation
(`data.text_aug_prob > 0`: every draw is a new text), or `config.model.cache_text = False`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from typing import Sequence

import numpy as np
from etils import epath

from gseps_jax.data import sources
from gseps_jax.data import transforms

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.msgpack")  # sharded checkpoints included
CACHE_SUBDIR = "text_features"
STALE_S = 600  # a temporary feature file untouched this long belongs to a dead builder


@dataclasses.dataclass(frozen=True, eq=False)
class TextCache:
  """Rows of a cached feature file, addressed by (item, text of the item, flipped).

  Attributes:
    path: the `.npy` file (float16 `[R, L, D_text]`).
    offsets: `[N + 1] int64`: the texts of item i (image) are rows `offsets[i]:offsets[i+1]`.
    flip_rows: `[offsets[-1]] int64` row of each text's left/right-swapped version (the row
      itself when the swap changes nothing), or None when no swapped rows were cached.
  """
  path: str
  offsets: np.ndarray
  flip_rows: np.ndarray | None = None

  def rows(self, item, choice, flipped) -> np.ndarray:
    rows = self.offsets[np.asarray(item, np.int64)] + np.asarray(choice, np.int64)
    flipped = np.asarray(flipped, bool)
    if flipped.any():
      if self.flip_rows is None:
        raise ValueError(f"The text feature cache {self.path} holds no left/right-swapped rows "
                         "but a flipped example asked for one; rebuild it with flips=True.")
      rows = np.where(flipped, self.flip_rows[rows], rows)
    return rows

  def lookup(self, item, choice, flipped) -> np.ndarray:
    """`[B, L, D_text] float16` features of text `choice` of each `item` (swapped if flipped)."""
    rows = self.rows(item, choice, flipped)
    table = np.load(self.path, mmap_mode="r")
    order = np.argsort(rows, kind="stable")  # sequential reads
    out = np.empty((len(rows),) + table.shape[1:], table.dtype)
    out[order] = table[rows[order]]
    return out


# ---------------------------------------------------------------------------------------------
# Keys and locations.


def file_digest(path: epath.Path) -> str:
  """sha256 hex digest of a file's bytes."""
  h = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def weights_digest(text_hf_dir: str) -> str:
  """sha256 over the weight files (and config.json) of an HF directory (hashing MiniLM's 90 MB
  takes well under a second)."""
  d = epath.Path(text_hf_dir)
  files = sorted({f.name for pattern in WEIGHT_PATTERNS for f in d.glob(pattern)})
  parts = [f"{name}:{file_digest(d / name)}" for name in ["config.json"] + files
           if (d / name).exists()]
  if not files or len(parts) < 2:
    raise FileNotFoundError(f"No text weight file ({', '.join(WEIGHT_PATTERNS)}) next to a "
                            f"config.json in {text_hf_dir}: the frozen text features cannot be "
                            "keyed; set config.model.text_hf_dir to the pretrained HF directory.")
  return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cache_key(*, weights: str, vocab: str, max_len: int, texts: Sequence[str],
              text_config: dict | None = None, flips: bool = False) -> str:
  """Hex key of a feature file: weights digest, vocabulary digest, max_len, text config, the
  texts (in order) and whether swapped rows are included."""
  return texts_key({"format": FORMAT_VERSION, "weights": weights, "vocab": vocab,
                    "max_len": int(max_len), "flips": bool(flips),
                    "text_config": text_config or {}}, texts)


def texts_key(header: dict, texts: Sequence[str]) -> str:
  """24 hex digits of sha256 over `header` (JSON, sorted keys) and the texts in order."""
  h = hashlib.sha256()
  h.update(json.dumps(header, sort_keys=True).encode())
  for t in texts:
    h.update(t.encode("utf-8"))
    h.update(b"\0")
  return h.hexdigest()[:24]


def cache_dir(data_config) -> epath.Path:
  """`data.text_cache_dir`, else `<data_dir>/text_features`; for a remote data_dir (`gs://`)
  `$XDG_CACHE_HOME/gseps_jax/text_features` (or ~/.cache/...): the file is memory-mapped, so it
  must be local."""
  d = data_config.get("text_cache_dir", "") or ""
  if d:
    return epath.Path(d)
  if "://" in str(data_config.data_dir):
    # local-path-ok: the cache is a local memory-mapped file, the data dir may be a bucket
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return epath.Path(base) / "gseps_jax" / CACHE_SUBDIR
  return epath.Path(data_config.data_dir) / CACHE_SUBDIR


# ---------------------------------------------------------------------------------------------
# Building.


def compute_features(texts: Sequence[str], path, *, encoder, params, tok, max_len: int,
                     batch_size: int = 256, desc: str = "text features") -> None:
  """Runs `encoder` (train=False) over `texts` and writes float16 `[len(texts), max_len, D]` to
  `path` atomically (a temporary file renamed at the end), printing a progress line.

  Texts run in order of length, each batch padded only to its longest text (rounded up to a
  multiple of 8: a few compiled shapes); outputs at padding positions are stored as zeros. The
  valid positions equal a full-length run (padding keys are masked out of attention and position
  embeddings are absolute), and the models read only valid positions (`attention_mask`)."""
  import jax  # pylint: disable=g-import-not-at-top

  apply = jax.jit(lambda p, i, m: encoder.apply({"params": p}, i, m, train=False))
  n = len(texts)
  batch_size = max(1, min(batch_size, n))
  table = None
  t0 = time.time()
  with atomic_npy(path) as tmp:
    lengths = np.array([len(x) for x in texts])  # characters: a cheap proxy for the order
    order = np.argsort(lengths, kind="stable")
    for done_before in range(0, n, batch_size):
      rows = np.sort(order[done_before:done_before + batch_size])
      ids, mask = tok.encode_batch([texts[r] for r in rows], max_len)
      k = len(rows)
      width = min(max_len, -(-int(mask.sum(1).max()) // 8) * 8)
      ids, mask = ids[:, :width], mask[:, :width]
      if k < batch_size:  # one compiled batch size
        ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - k, 0)])
        mask = np.concatenate([mask, np.repeat(mask[-1:], batch_size - k, 0)])
      out = np.asarray(apply(params, ids, mask))[:k] * mask[:k, :, None]
      if table is None:
        table = np.lib.format.open_memmap(str(tmp), mode="w+", dtype=np.float16,
                                          shape=(n, max_len) + out.shape[2:])
      full = np.zeros((k, max_len) + out.shape[2:], np.float16)
      full[:, :width] = out
      table[rows] = full
      done = done_before + k
      rate = done / max(time.time() - t0, 1e-6)
      print(f"\r{desc}: {done}/{n} texts ({rate:.0f}/s, ETA {(n - done) / rate:.0f} s)",
            end="" if done < n else "\n", file=sys.stderr, flush=True)
    table.flush()
    del table


@contextlib.contextmanager
def atomic_npy(path):
  """Yields a temporary `.npy` path beside `path`; renamed to `path` when the block completes,
  deleted if it raises, so a reader never sees a partial file."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f"{path.name}.tmp{os.getpid()}.npy"
  try:
    yield tmp
    os.replace(tmp, path)  # local-path-ok: the memory-mapped caches are local files
  finally:
    if tmp.exists():
      tmp.unlink()


def build_once(path: epath.Path, build) -> None:
  """Calls `build()` to write `path` unless it exists: one builder per file among the processes
  of this machine (the others wait on its lock and find the file), stale temporaries of killed
  builders removed first."""
  if not path.exists():
    with build_lock(path):
      if not path.exists():
        remove_stale(path)
        build()


def split_texts(source, kind: str, *, chunk: int = 1000) -> tuple[list[str], np.ndarray]:
  """(texts in dataset order, `[N + 1]` offsets) of a split: its captions, or its dense
  captions (one per image)."""
  texts, offsets = [], [0]
  for start in range(0, len(source), chunk):
    for r in sources.read_records(source, range(start, min(start + chunk, len(source)))):
      item = ([sources.as_text(c) for c in r["captions"]] if kind == "captions"
              else [sources.as_text(r["dense_caption"])])
      texts.extend(item)
      offsets.append(offsets[-1] + len(item))
  return texts, np.asarray(offsets, np.int64)


def with_flips(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """`texts` + the left/right-swapped version of each text the swap changes, and the row of
  each original text's swapped version."""
  out = list(texts)
  flip_rows = np.arange(len(texts), dtype=np.int64)
  for i, t in enumerate(texts):
    s = transforms.swap_left_right(t)
    if s != t:
      flip_rows[i] = len(out)
      out.append(s)
  return out, flip_rows


def enabled(config, *, kind: str = "captions", train: bool = False) -> bool:
  """Whether `config` uses cached text features for this kind of text (see module doc)."""
  m = config.model
  if not (m.get("freeze_text", False) and m.get("cache_text", True) and m.get("text_hf_dir", "")):
    return False
  if train and kind == "captions" and float(config.data.get("text_aug_prob", 0.0)) > 0:
    log.warning("Text augmentation is on (data.text_aug_prob = %s): the frozen text tower runs "
                "every step instead of reading cached features.", config.data.text_aug_prob)
    return False
  return True


def for_split(config, source, split: str, *, kind: str = "captions",
              train: bool = False, tok=None) -> TextCache | None:
  """The cache of a split's captions (`kind="captions"`) or dense captions (`"dense"`), built if
  absent; None when `config` does not cache (see `enabled`). `train`: the training split, with
  swapped rows when `data.hflip > 0`."""
  if not enabled(config, kind=kind, train=train):
    return None
  from gseps_jax.interop import hf as hf_import  # pylint: disable=g-import-not-at-top

  tok = tok or sources.tokenizer_from_config(config)
  max_len = int(config.data.max_len if kind == "captions" else config.data.dense_max_len)
  texts, offsets = split_texts(source, kind)
  flips = train and float(config.data.get("hflip", 0.5)) > 0
  flip_rows = None
  if flips:
    texts, flip_rows = with_flips(texts)
  text_dir = config.model.text_hf_dir
  key = cache_key(weights=weights_digest(text_dir), vocab=file_digest(epath.Path(tok.source)),
                  max_len=max_len, texts=texts, text_config=hf_import.hf_config(text_dir),
                  flips=flips)
  path = cache_dir(config.data) / f"{config.data.name}_{split}_{kind}_{key}.npy"

  def build():
    encoder, params = hf_import.load_hf_encoder(text_dir)
    gb = len(texts) * max_len * int(config.model.text.hidden_size) * 2 / 1e9
    log.info("Caching frozen text features of %s %s %s (%d texts, %.2f GB) in %s.",
             config.data.name, split, kind, len(texts), gb, path)
    compute_features(texts, path, encoder=encoder, params=params, tok=tok, max_len=max_len,
                     desc=f"frozen text features, {split} {kind}")
  build_once(path, build)
  return TextCache(path=str(path), offsets=offsets, flip_rows=flip_rows)


def remove_stale(path: epath.Path) -> None:
  """Deletes temporary files of `path` left by a killed builder (or an older, lock-less one)."""
  for stale in path.parent.glob(f"{path.name}.tmp*"):
    if time.time() - stale.stat().st_mtime > STALE_S:
      stale.unlink()


@contextlib.contextmanager
def build_lock(path: epath.Path):
  """An exclusive lock on `<path>.lock` (processes on this machine building the same cache)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(f"{path}.lock", "w") as f:  # local-path-ok: flock needs a local file
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
