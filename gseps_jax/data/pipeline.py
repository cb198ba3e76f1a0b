"""Input pipeline over tfds array_record data sources: no tf.data, no TensorFlow.

Training (`TrainLoader`): the batch of step `s` is a pure function of (seed, s):
  epoch e = s // steps_per_epoch; the epoch's order is a permutation of the split drawn from
  (seed, e); global batch s covers positions [w*G, (w+1)*G) of it (w = s mod steps_per_epoch,
  G = global batch, the remainder of an epoch is dropped); process p of P reads only the slice
  [p*G/P, (p+1)*G/P) of that batch. Each example's randomness (which of its 5 captions, crop, flip,
  text augmentation) comes from a generator keyed by (seed, epoch, image index), so it does not
  depend on batch size, process count or worker count. The iterator state is just
  `{"seed", "step"}`: a loader built with `start_step=s` (or `set_state`) yields exactly the batches
  an uninterrupted one would.

  Augmentation (config `data.*`): RandomResizedCrop with area fraction `crop_scale` ((1, 1) = no
  crop, a plain resize) and a horizontal flip with probability `hflip` (0 = never); a flipped
  image's caption (and dense caption) has "left" and "right" (and their variants) swapped, so the
  words still describe the pixels.

  Batch (local, B = G / P): image [B, H, W, 3] float32 (normalised), input_ids [B, L] int32,
  attention_mask [B, L] int32, dense_ids [B, Ld] int32, dense_mask [B, Ld] int32,
  image_index [B] int32 (index of the image within the split); with cached frozen text features
  (data/text_cache.py) also text_hidden [B, L, D_text] float16 (and dense_hidden [B, Ld, D_text]).

Evaluation (`eval_image_batches`, `eval_caption_batches`): dataset order, no randomness. Global
batch s covers images (or captions; caption j belongs to image j // 5) [s*G, (s+1)*G); process p
gets its slice; positions past the end are padding with `valid = False`, so every process runs the
same number of steps and the global arrays are in dataset order.

`num_workers > 0` runs batch construction in that many spawned processes (ordered, bounded
prefetch); `num_workers = 0` runs in-process (tests). `to_global(batch, sharding)` turns a
process-local batch into global `jax.Array`s.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import math
import multiprocessing
import os
import re
from typing import Any, Callable, Iterator

import numpy as np

from gseps_jax.data import tokenizer as tokenizer_lib

Batch = dict[str, np.ndarray]
# SeedSequence stream tags: keep the permutation and per-example streams disjoint.
_PERM_TAG, _EXAMPLE_TAG = 1, 2
_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop aspect-ratio range (torchvision default)


class CorruptImageError(ValueError):
  """An example's image bytes cannot be decoded."""


# ---------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Everything the per-example functions need (from `config.data`)."""
  image_size: int = 224
  mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
  std: tuple[float, float, float] = (0.229, 0.224, 0.225)
  crop_scale: tuple[float, float] = (0.6, 1.0)
  hflip: float = 0.5
  max_len: int = 32
  dense_max_len: int = 90  # > 0 here; config 0 (auto) is resolved by `from_config`
  text_aug_prob: float = 0.2

  @classmethod
  def from_config(cls, data_config) -> "Preprocess":
    """From `config.data`; `dense_max_len = 0` (auto) becomes `recorded_dense_len(data_config)`
    (normally `resolve_dense_max_len` has already written the concrete length into the config)."""
    get = data_config.get
    dense_len = int(get("dense_max_len", 90))
    if dense_len == DENSE_AUTO:
      dense_len = recorded_dense_len(data_config)
    return cls(image_size=int(get("image_size", 224)),
               mean=tuple(float(x) for x in get("mean", cls.mean)),
               std=tuple(float(x) for x in get("std", cls.std)),
               crop_scale=tuple(float(x) for x in get("crop_scale", cls.crop_scale)),
               hflip=float(get("hflip", cls.hflip)),
               max_len=int(get("max_len", 32)), dense_max_len=dense_len,
               text_aug_prob=float(get("text_aug_prob", 0.2)))


# ---------------------------------------------------------------------------------------------
# Dense caption length: full length, as the official code (which pads each batch to its longest
# dense caption and never truncates). `config.data.dense_max_len = 0` (auto) means "the longest
# dense caption of the dataset": [CLS] + word pieces + [SEP], over every split, at most BERT's
# 512 positions. The longest is measured once per dataset and vocabulary and recorded next to
# the prepared data (`<builder data_dir>/dense_lengths.json`); `resolve_dense_max_len` writes
# the concrete number into the config before training, so checkpoints, evaluation and exports
# all use the length the model was trained with.

DENSE_AUTO = 0
BERT_MAX_POSITIONS = 512
DENSE_LENGTHS_FILE = "dense_lengths.json"


def longest_dense_pieces(source, tok: tokenizer_lib.Tokenizer, *, batch: int = 512) -> int:
  """Longest dense caption of a split in word pieces ([CLS]/[SEP] not counted); 0 if none."""
  longest = 0
  for start in range(0, len(source), batch):
    records = read_records(source, range(start, min(start + batch, len(source))))
    texts = [_text(r["dense_caption"]) for r in records]
    encs = tok.backend.encode_batch(texts, add_special_tokens=False)
    longest = max([longest] + [len(e.ids) for e in encs])
  return longest


def _vocab_key(tok: tokenizer_lib.Tokenizer) -> str:
  import hashlib
  from etils import epath
  return hashlib.sha1(epath.Path(tok.source).read_bytes()).hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def _recorded_pieces(builder_dir: str, tok_dir: str) -> dict:
  """{split: longest dense caption in word pieces} of the prepared dataset in `builder_dir`, for
  the vocabulary in `tok_dir`: read from `builder_dir/dense_lengths.json`, or measured (one pass
  over every split) and recorded there. Memoised per process."""
  import json
  import logging
  import tensorflow_datasets as tfds
  from etils import epath

  tok = tokenizer_lib.load_tokenizer(tok_dir)
  key = _vocab_key(tok)
  path = epath.Path(builder_dir) / DENSE_LENGTHS_FILE
  table = {}
  if path.exists():
    try:
      table = json.loads(path.read_text())
    except ValueError:  # a torn file: measure again
      table = {}
  if key in table:
    return table[key]
  builder = tfds.builder_from_directory(builder_dir)
  pieces = {}
  for split in sorted(builder.info.splits):
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    pieces[split] = longest_dense_pieces(source, tok)
  table[key] = pieces
  tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
  try:
    tmp.write_text(json.dumps(table, indent=2, sort_keys=True))
    tmp.replace(path)  # atomic; another process may have written it meanwhile
  except OSError as e:  # a read-only data_dir: measured again by the next process
    logging.getLogger(__name__).warning("Cannot record dense caption lengths in %s: %s", path, e)
  return pieces


def recorded_dense_len(data_config, tok_dir: str = "") -> int:
  """The auto dense caption length of `config.data`: 2 ([CLS], [SEP]) + the longest dense caption
  over all splits in word pieces, capped at `BERT_MAX_POSITIONS` (2 for a dataset without any)."""
  from gseps_jax.data import prepare

  builder = prepare.ensure_prepared(data_config)
  tok_dir = str(tok_dir or tokenizer_lib.resolve_tokenizer_dir(data_config))
  pieces = _recorded_pieces(str(builder.data_dir), tok_dir)
  return min(2 + max(pieces.values(), default=0), BERT_MAX_POSITIONS)


def resolve_dense_max_len(config) -> int:
  """Writes the concrete dense caption length into `config.data.dense_max_len` when it is 0
  (auto) and returns it; a SEPS model's text encoder must have that many positions."""
  d = config.data
  if int(d.get("dense_max_len", 90)) == DENSE_AUTO:
    text_dir = config.model.get("text_hf_dir", "") if "model" in config else ""
    d.dense_max_len = recorded_dense_len(
        d, str(tokenizer_lib.resolve_tokenizer_dir(d, text_dir)))
  n = int(d.dense_max_len)
  positions = (config.model.text.get("max_position_embeddings", BERT_MAX_POSITIONS)
               if "model" in config else BERT_MAX_POSITIONS)
  if "model" in config and config.model.get("name") == "seps" and n > positions:
    raise ValueError(
        f"config.data.dense_max_len = {n} (the longest dense caption of {d.name}) exceeds the "
        f"text encoder's {positions} positions (config.model.text.max_position_embeddings); set "
        "config.data.dense_max_len to at most that (longer dense captions are then truncated).")
  return n


def open_split(data_config, split: str):
  """Random-access source of a split (builds synthetic_regions if absent). Image stays JPEG bytes."""
  import tensorflow_datasets as tfds

  from gseps_jax.data import prepare

  builder = prepare.ensure_prepared(data_config)
  if split not in builder.info.splits:
    raise ValueError(f"{builder.name} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}.")
  return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})


def tokenizer_from_config(config) -> tokenizer_lib.Tokenizer:
  """Tokenizer for a full config (`config.data.tokenizer_dir`, else `config.model.text_hf_dir`)."""
  text_dir = config.model.get("text_hf_dir", "") if "model" in config else ""
  return tokenizer_lib.load_tokenizer(tokenizer_lib.resolve_tokenizer_dir(config.data, text_dir))


def process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of this process; defaults from JAX."""
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  return process_index, process_count


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{process_count} processes.")
  return global_batch_size // process_count


# ---------------------------------------------------------------------------------------------
# Per-example functions (pure; randomness only from the generator passed in).


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def example_name(record: dict) -> str:
  return (f"example {int(record['index'])} (image id {_text(record['image_id'])}"
          + (f", file {_text(record['file_name'])}" if _text(record.get("file_name", "")) else "")
          + ")")


def decode_image(data: bytes, name: str):
  """JPEG/PNG bytes -> RGB PIL image; CorruptImageError naming the example otherwise."""
  from PIL import Image
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # PIL raises several types for bad data.
    raise CorruptImageError(f"Cannot decode the image of {name}: {e}.") from e
  return img if img.mode == "RGB" else img.convert("RGB")


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float],
                            ratio: tuple[float, float] = _RATIO) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop box (x0, y0, w, h): area fraction in `scale`, aspect ratio in
  `ratio` (log-uniform); after 10 failed tries, the largest centred crop within `ratio`."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      y0 = int(rng.integers(0, height - h + 1))
      x0 = int(rng.integers(0, width - w + 1))
      return x0, y0, w, h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
  """`[..., 3] uint8` -> float32 `(x / 255 - mean) / std`."""
  scale = np.asarray(1.0 / (255.0 * np.asarray(std)), np.float32)
  offset = np.asarray(-np.asarray(mean) / np.asarray(std), np.float32)
  return image.astype(np.float32) * scale + offset


# Words a horizontal flip turns into each other (lower case; a capitalised word keeps its case).
# "right" as in "correct" is swapped too: rare in captions, and harmless for the generated data.
LEFT_RIGHT = {"left": "right", "right": "left", "leftmost": "rightmost",
              "rightmost": "leftmost", "lefthand": "righthand", "righthand": "lefthand",
              "leftward": "rightward", "rightward": "leftward", "leftwards": "rightwards",
              "rightwards": "leftwards"}
_LEFT_RIGHT_RE = re.compile(r"\b(" + "|".join(LEFT_RIGHT) + r")\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
  """`text` as it reads for the mirrored image: left <-> right (and the words in LEFT_RIGHT),
  whole words only, keeping the case pattern ("Left" -> "Right", "LEFT" -> "RIGHT")."""
  def sub(m):
    word = m.group(0)
    out = LEFT_RIGHT[word.lower()]
    if word.isupper():
      return out.upper()
    return out.capitalize() if word[0].isupper() else out
  return _LEFT_RIGHT_RE.sub(sub, text)


def train_image_and_flip(data: bytes, rng: np.random.Generator, pp: Preprocess,
                         name: str) -> tuple[np.ndarray, bool]:
  """RandomResizedCrop (bicubic; `crop_scale` (1, 1) = a plain resize, no draws) + horizontal
  flip with probability `pp.hflip` + normalisation -> (`[S, S, 3] float32`, flipped).

  The flip draw is made whatever `hflip` is, so the stream the text augmentation reads after it
  does not depend on the flip probability."""
  from PIL import Image
  img = decode_image(data, name)
  if tuple(pp.crop_scale) == (1.0, 1.0):
    x0, y0, w, h = 0, 0, img.width, img.height
  else:
    x0, y0, w, h = random_resized_crop_box(rng, img.width, img.height, pp.crop_scale)
  out = img.resize((pp.image_size, pp.image_size), Image.BICUBIC, box=(x0, y0, x0 + w, y0 + h))
  arr = np.asarray(out)
  flipped = bool(rng.random() < pp.hflip)
  if flipped:
    arr = arr[:, ::-1]
  return normalize(arr, pp.mean, pp.std), flipped


def train_image(data: bytes, rng: np.random.Generator, pp: Preprocess, name: str) -> np.ndarray:
  """`train_image_and_flip` without the flag -> `[S, S, 3] float32`."""
  return train_image_and_flip(data, rng, pp, name)[0]


def eval_image(data: bytes, pp: Preprocess, name: str) -> np.ndarray:
  """Resize to `[S, S]` (bicubic, no crop) + normalisation -> `[S, S, 3] float32`."""
  from PIL import Image
  img = decode_image(data, name)
  return normalize(np.asarray(img.resize((pp.image_size, pp.image_size), Image.BICUBIC)),
                   pp.mean, pp.std)


def example_rng(seed: int, epoch: int, image_index: int) -> np.random.Generator:
  return np.random.default_rng([seed, _EXAMPLE_TAG, epoch, image_index])


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """`[N]` order of the split in an epoch."""
  return np.random.default_rng([seed, _PERM_TAG, epoch]).permutation(num_examples)


def train_example(record: dict, rng: np.random.Generator, pp: Preprocess,
                  tok: tokenizer_lib.Tokenizer, *, with_choice: bool = False) -> Batch:
  """One training example: a random one of the image's captions, augmented image and text (a
  flipped image's captions read left/right swapped). `with_choice` adds `caption_choice` (which
  caption) and `flipped`, what the cached text features are looked up by."""
  name = example_name(record)
  captions = record["captions"]
  choice = int(rng.integers(len(captions)))
  caption = _text(captions[choice])
  image, flipped = train_image_and_flip(record["image"], rng, pp, name)
  dense = _text(record["dense_caption"])
  if flipped:
    caption, dense = swap_left_right(caption), swap_left_right(dense)
  ids, mask = tok.encode(caption, pp.max_len, rng=rng, aug_prob=pp.text_aug_prob)
  dense_ids, dense_mask = tok.encode(dense, pp.dense_max_len)
  out = {"image": image, "input_ids": ids, "attention_mask": mask, "dense_ids": dense_ids,
         "dense_mask": dense_mask, "image_index": np.int32(record["index"])}
  if with_choice:
    out.update(caption_choice=np.int32(choice), flipped=np.bool_(flipped))
  return out


def read_records(source, indices) -> list[dict]:
  """Records `indices` of a random-access source (batched `__getitems__` when it has one)."""
  indices = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def _stack(examples: list[Batch]) -> Batch:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# ---------------------------------------------------------------------------------------------
# Batch makers: picklable callables step -> local batch (what worker processes run).


@dataclasses.dataclass(frozen=True)
class TrainBatches:
  """Local training batch of any step (a pure function of seed and step)."""
  source: Any
  tok: tokenizer_lib.Tokenizer
  pp: Preprocess
  global_batch_size: int
  seed: int
  process_index: int
  process_count: int
  text_cache: Any = None  # text_cache.TextCache of the split's captions (frozen text tower)
  dense_cache: Any = None  # ... of its dense captions (SEPS)

  @property
  def num_examples(self) -> int:
    return len(self.source)

  @property
  def local_batch_size(self) -> int:
    return _local_batch(self.global_batch_size, self.process_count)

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.global_batch_size

  def indices(self, step: int) -> tuple[int, np.ndarray]:
    """(epoch, `[B]` image indices this process reads at `step`)."""
    spe = self.steps_per_epoch
    if spe == 0:
      raise ValueError(f"global batch size {self.global_batch_size} exceeds the "
                       f"{self.num_examples} training images.")
    epoch, within = divmod(step, spe)
    perm = epoch_permutation(self.seed, epoch, self.num_examples)
    start = within * self.global_batch_size + self.process_index * self.local_batch_size
    return epoch, perm[start:start + self.local_batch_size]

  def __call__(self, step: int) -> Batch:
    epoch, idx = self.indices(step)
    records = read_records(self.source, idx)
    cached = self.text_cache is not None or self.dense_cache is not None
    batch = _stack([train_example(r, example_rng(self.seed, epoch, int(r["index"])), self.pp,
                                  self.tok, with_choice=cached) for r in records])
    if cached:
      choice, flipped = batch.pop("caption_choice"), batch.pop("flipped")
      if self.text_cache is not None:
        batch["text_hidden"] = self.text_cache.lookup(batch["image_index"], choice, flipped)
      if self.dense_cache is not None:
        batch["dense_hidden"] = self.dense_cache.lookup(batch["image_index"], 0 * choice,
                                                        flipped)
    return batch


@dataclasses.dataclass(frozen=True)
class EvalImageBatches:
  """Local eval image batch of step s: images [s*G, (s+1)*G) in dataset order, this process's
  slice, padded (`valid`)."""
  source: Any
  tok: tokenizer_lib.Tokenizer
  pp: Preprocess
  global_batch_size: int
  process_index: int
  process_count: int
  dense_cache: Any = None  # text_cache.TextCache of the split's dense captions

  @property
  def num_items(self) -> int:
    return len(self.source)

  def num_steps(self) -> int:
    return -(-self.num_items // self.global_batch_size)

  def positions(self, step: int) -> np.ndarray:
    lb = _local_batch(self.global_batch_size, self.process_count)
    start = step * self.global_batch_size + self.process_index * lb
    return np.arange(start, start + lb)

  def __call__(self, step: int) -> Batch:
    pos = self.positions(step)
    valid = pos < self.num_items
    records = read_records(self.source, pos[valid])
    s, n = self.pp.image_size, len(pos)
    images = np.zeros((n, s, s, 3), np.float32)
    for k, r in enumerate(records):
      images[k] = eval_image(r["image"], self.pp, example_name(r))
    dense_ids, dense_mask = self.tok.encode_batch(
        [_text(r["dense_caption"]) for r in records], self.pp.dense_max_len)
    out = {"image": images, "dense_ids": _pad(dense_ids, n), "dense_mask": _pad(dense_mask, n),
           "image_index": np.where(valid, pos, -1).astype(np.int32), "valid": valid}
    if self.dense_cache is not None:
      idx = pos[valid]
      out["dense_hidden"] = _pad(self.dense_cache.lookup(idx, 0 * idx, np.zeros(len(idx), bool)),
                                 n)
    return out


@dataclasses.dataclass(frozen=True)
class EvalCaptionBatches:
  """Local eval caption batch of step s: captions [s*G, (s+1)*G) in dataset order (caption j is
  caption j % 5 of image j // 5), this process's slice, padded (`valid`)."""
  source: Any
  tok: tokenizer_lib.Tokenizer
  pp: Preprocess
  global_batch_size: int
  process_index: int
  process_count: int
  captions_per_image: int = 5
  text_cache: Any = None  # text_cache.TextCache of the split's captions

  @property
  def num_items(self) -> int:
    return len(self.source) * self.captions_per_image

  num_steps = EvalImageBatches.num_steps
  positions = EvalImageBatches.positions

  def __call__(self, step: int) -> Batch:
    pos = self.positions(step)
    valid = pos < self.num_items
    image_idx = pos[valid] // self.captions_per_image
    uniq = np.unique(image_idx)
    by_image = dict(zip(uniq.tolist(), read_records(self.source, uniq)))
    texts = [_text(by_image[i]["captions"][j % self.captions_per_image])
             for i, j in zip(image_idx.tolist(), pos[valid].tolist())]
    ids, mask = self.tok.encode_batch(texts, self.pp.max_len)
    n = len(pos)
    out = {"input_ids": _pad(ids, n), "attention_mask": _pad(mask, n),
           "caption_index": np.where(valid, pos, -1).astype(np.int32),
           "image_index": np.where(valid, pos // self.captions_per_image, -1).astype(np.int32),
           "valid": valid}
    if self.text_cache is not None:
      out["text_hidden"] = _pad(self.text_cache.lookup(
          image_idx, pos[valid] % self.captions_per_image, np.zeros(len(image_idx), bool)), n)
    return out


def _pad(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) == n:
    return x
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


# ---------------------------------------------------------------------------------------------
# Running batch makers, in-process or in worker processes.

_WORKER_FN: Callable[[int], Batch] | None = None  # set once per *worker* process by its initializer


def _worker_init(fn: Callable[[int], Batch]) -> None:
  global _WORKER_FN
  _WORKER_FN = fn


def _worker_call(step: int) -> Batch:
  return _WORKER_FN(step)


class _OrderedMap:
  """Yields fn(s) for s = start, start+1, ... (up to `stop`), computed by `num_workers` spawned
  processes with at most `prefetch` batches in flight, in order; in-process when num_workers=0."""

  def __init__(self, fn: Callable[[int], Batch], start: int, stop: int | None, num_workers: int,
               prefetch: int):
    self._fn, self._next, self._stop = fn, start, stop
    self._pool = None
    self._pending: collections.deque = collections.deque()
    self._prefetch = max(prefetch, num_workers)
    if num_workers > 0:
      # spawn, not fork: the parent may already run JAX threads.
      # ProcessPoolExecutor, not Pool: a dead worker raises BrokenProcessPool instead of hanging.
      self._pool = concurrent.futures.ProcessPoolExecutor(
          num_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
          initargs=(fn,))

  def _submit(self) -> None:
    while len(self._pending) < self._prefetch and (self._stop is None or self._next < self._stop):
      self._pending.append(self._pool.submit(_worker_call, self._next))
      self._next += 1

  def __next__(self) -> Batch:
    if self._pool is None:
      if self._stop is not None and self._next >= self._stop:
        raise StopIteration
      self._next += 1
      return self._fn(self._next - 1)
    self._submit()
    if not self._pending:
      raise StopIteration
    return self._pending.popleft().result()

  def close(self) -> None:
    if self._pool is not None:
      for f in self._pending:
        f.cancel()
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None
    self._pending.clear()


# ---------------------------------------------------------------------------------------------
# Public iterators.


class TrainLoader:
  """Infinite iterator over this process's training batches; state = {"seed", "step"}.

  Example:
    loader = TrainLoader.from_config(config, global_batch_size=128, seed=0, start_step=step)
    batch = to_global(next(loader), sharding)
    ckpt_extra = loader.get_state()   # {"seed": 0, "step": step + 1}
  """

  def __init__(self, source, tok: tokenizer_lib.Tokenizer, pp: Preprocess, *,
               global_batch_size: int, seed: int, start_step: int = 0,
               process_index: int | None = None, process_count: int | None = None,
               num_workers: int = 0, prefetch: int = 2, text_cache=None, dense_cache=None):
    self._it = None
    p, n = process_shard(process_index, process_count)
    self.batches = TrainBatches(source=source, tok=tok, pp=pp,
                                global_batch_size=int(global_batch_size), seed=int(seed),
                                process_index=p, process_count=n, text_cache=text_cache,
                                dense_cache=dense_cache)
    self.batches.indices(0)  # validates sizes now, not in a worker
    self._num_workers, self._prefetch = int(num_workers), int(prefetch)
    self._step = int(start_step)

  @classmethod
  def from_config(cls, config, *, global_batch_size: int, seed: int, start_step: int = 0,
                  split: str = "train", process_index: int | None = None,
                  process_count: int | None = None, tok=None) -> "TrainLoader":
    """From a full config (`config.data`, `config.model.text_hf_dir` for the vocabulary).
    A frozen pretrained text tower's features come from the split's cache (data/text_cache.py,
    built here on first use)."""
    from gseps_jax.data import text_cache as cache_lib
    source = open_split(config.data, split)
    tok = tok or tokenizer_from_config(config)
    caches = {f"{kind}_cache": cache_lib.for_split(config, source, split, kind=name, train=True,
                                                   tok=tok)
              for kind, name in (("text", "captions"), ("dense", "dense"))}
    return cls(source, tok, Preprocess.from_config(config.data),
               global_batch_size=global_batch_size, seed=seed, start_step=start_step,
               process_index=process_index, process_count=process_count,
               num_workers=config.data.get("num_workers", 0), **caches)

  @property
  def steps_per_epoch(self) -> int:
    return self.batches.steps_per_epoch

  @property
  def step(self) -> int:
    """The step of the next batch."""
    return self._step

  def __iter__(self) -> "TrainLoader":
    return self

  def __next__(self) -> Batch:
    if self._it is None:
      self._it = _OrderedMap(self.batches, self._step, None, self._num_workers, self._prefetch)
    batch = next(self._it)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"seed": self.batches.seed, "step": self._step}

  def set_state(self, state: dict[str, int]) -> None:
    if int(state["seed"]) != self.batches.seed:
      raise ValueError(f"checkpointed data seed {state['seed']} differs from this loader's "
                       f"seed {self.batches.seed}.")
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None

  def __del__(self):
    self.close()


def _eval_iter(maker, num_workers: int) -> Iterator[Batch]:
  it = _OrderedMap(maker, 0, maker.num_steps(), num_workers, prefetch=2)
  try:
    while True:
      try:
        yield next(it)
      except StopIteration:
        return
  finally:
    it.close()


def eval_image_batches(source, tok, pp: Preprocess, *, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       num_workers: int = 0, dense_cache=None) -> Iterator[Batch]:
  """Eval images in dataset order: `image [B,H,W,3] float32`, `dense_ids`/`dense_mask [B,Ld]
  int32`, `image_index [B] int32` (-1 for padding), `valid [B] bool`; with `dense_cache` also
  `dense_hidden [B, Ld, D_text]`."""
  p, n = process_shard(process_index, process_count)
  return _eval_iter(EvalImageBatches(source, tok, pp, int(global_batch_size), p, n,
                                     dense_cache=dense_cache), num_workers)


def eval_caption_batches(source, tok, pp: Preprocess, *, global_batch_size: int,
                         process_index: int | None = None, process_count: int | None = None,
                         num_workers: int = 0, text_cache=None) -> Iterator[Batch]:
  """Eval captions in dataset order (5 per image): `input_ids`/`attention_mask [B, L] int32`,
  `caption_index`, `image_index [B] int32` (-1 for padding), `valid [B] bool`; with
  `text_cache` also `text_hidden [B, L, D_text]`."""
  p, n = process_shard(process_index, process_count)
  return _eval_iter(EvalCaptionBatches(source, tok, pp, int(global_batch_size), p, n,
                                       text_cache=text_cache), num_workers)


def to_global(batch: Batch, sharding) -> dict:
  """Process-local batch -> global `jax.Array`s laid out by `sharding` (e.g.
  `NamedSharding(mesh, P("data"))`, which splits the leading axis of every leaf)."""
  import jax
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
