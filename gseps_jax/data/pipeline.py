"""Input pipeline on grain over tfds array_record sources: no tf.data, no TensorFlow.

Each pipeline is a `grain.MapDataset` whose element s is this process's batch of step s, so a
batch is a pure function of (seed, s) and can be read at random (`dataset[s]`):

  positions -> per-example stages (`transforms.py`: read, decode, augment, tokenise)
            -> .batch(local batch B) -> [process_index::process_count] -> batch-level stages

Training (`train_dataset`, `TrainLoader`): position g of the endless stream is image
`epoch_permutation(seed, e)[w]` of epoch e = g // (S * G), w = g mod (S * G) (G = global batch,
S = steps per epoch; the remainder of an epoch is dropped). Global batch s is positions
[s*G, (s+1)*G): P consecutive local batches of B = G / P rows, and process p reads only the p-th
of them (`[p::P]` of the batched dataset; a lazy MapDataset computes nothing else). Each example's
randomness (which caption, crop, flip, text augmentation) comes from
`example_rng(seed, epoch, image index)`, so it does not depend on batch size, process count or
worker count.

  Batch (local): image [B, H, W, 3] float32 (normalised; with `device_augment` instead a uint8
  canvas [B, C, C, 3] + crop_box [B, 4], image_wh [B, 2] int32, flip [B] bool, made into it by
  data/device_augment.py in the jitted step), input_ids, attention_mask [B, L] int32, dense_ids,
  dense_mask [B, Ld] int32 (models that tokenise dense captions; in training read from the
  split's tokenised dense captions, data/token_cache.py, unless `data.cache_dense_tokens` is
  off; the captions' too without text augmentation, `data.cache_caption_tokens`),
  image_index [B] int32 (within the split); with cached frozen text features
  (data/text_cache.py) also text_hidden [B, L, D_text] float16 (and dense_hidden
  [B, Ld, D_text]).

Evaluation (`eval_image_batches`, `eval_caption_batches`): dataset order, no randomness. Global
batch s covers images (or captions; caption j belongs to image j // 5) [s*G, (s+1)*G); process p
gets its slice; positions past the end are padding rows with `valid = False` and index -1, so
every process runs the same number of steps and the global arrays are in dataset order.

Iteration (`iterate`): `num_workers > 0` runs the dataset in that many spawned grain worker
processes (`mp_prefetch`: worker w computes whole batches w, w + W, ..., interleaved back in
order; batches come back through shared memory); `num_workers = 0` runs in this process,
synchronously. Iterator state: the train loader's state is `{"seed", "step"}` (saved in every
checkpoint's metadata by the trainer); a loader built with `start_step=s` (or `set_state`) starts a
grain iterator at `dataset[s:]` and yields exactly the batches an uninterrupted one would, for any
worker count or process count (grain's own per-worker iterator state would tie a resume to the
worker count; this is the choice grain's ElasticIterator makes, with our batch layout).

`to_global(batch, sharding)` turns a process-local batch into global `jax.Array`s.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Iterator

import grain
import numpy as np

from gseps_jax.data import sources
from gseps_jax.data import text_cache as cache_lib
from gseps_jax.data import token_cache
from gseps_jax.data import tokenizer as tokenizer_lib
from gseps_jax.data import transforms
# The public names of the pipeline's parts, importable from here as before.
# pylint: disable=unused-import,g-importing-member
from gseps_jax.data.dense_length import (BERT_MAX_POSITIONS, DENSE_AUTO, DENSE_LENGTHS_FILE,
                                         longest_dense_pieces, recorded_dense_len,
                                         resolve_dense_max_len)
from gseps_jax.data.sources import (example_name, open_split, process_shard, read_records,
                                    tokenizer_from_config)
from gseps_jax.data.transforms import (LEFT_RIGHT, CorruptImageError, Preprocess, decode_image,
                                       epoch_permutation, eval_image, eval_image_example,
                                       example_rng, normalize, random_resized_crop_box,
                                       swap_left_right, train_example, train_image,
                                       train_image_and_flip, train_position)
# pylint: enable=unused-import,g-importing-member

_text = sources.as_text  # the old private name (tests)
Batch = dict[str, np.ndarray]
# Per-example stages run where the batch is built (this process, or one grain worker): no thread
# pool inside (grain's default would prefetch 500 elements on 16 threads).
_IN_PLACE = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


# ---------------------------------------------------------------------------------------------
# Stages (picklable: grain workers unpickle the whole dataset).


@dataclasses.dataclass(frozen=True)
class _Position:
  """Stream position -> (epoch, image index): `transforms.train_position`."""
  seed: int
  num_examples: int
  epoch_size: int

  def __call__(self, position: int) -> tuple[int, int]:
    return transforms.train_position(position, seed=self.seed, num_examples=self.num_examples,
                                     epoch_size=self.epoch_size)


@dataclasses.dataclass(frozen=True)
class _TrainRecord:
  """(epoch, image index) -> (epoch, record)."""
  source: Any

  def __call__(self, item: tuple[int, int]) -> tuple[int, dict]:
    epoch, index = item
    return epoch, self.source[index]


@dataclasses.dataclass(frozen=True)
class _TrainExample:
  """(epoch, record) -> `transforms.train_example` with the example's own generator."""
  pp: transforms.Preprocess
  tok: tokenizer_lib.Tokenizer
  seed: int
  with_choice: bool

  def __call__(self, item: tuple[int, dict]) -> transforms.Example:
    epoch, record = item
    rng = transforms.example_rng(self.seed, epoch, int(record["index"]))
    return transforms.train_example(record, rng, self.pp, self.tok, with_choice=self.with_choice)


@dataclasses.dataclass(frozen=True)
class _CachedFeatures:
  """Training batch: `caption_choice`/`flipped` -> `text_hidden`/`dense_hidden` from the feature
  caches, `dense_ids`/`dense_mask` from the dense token cache and `input_ids`/`attention_mask`
  from the caption token cache."""
  text_cache: Any
  dense_cache: Any
  dense_tokens: Any = None
  caption_tokens: Any = None

  def __call__(self, batch: Batch) -> Batch:
    batch = dict(batch)
    choice, flipped = batch.pop("caption_choice"), batch.pop("flipped")
    if self.caption_tokens is not None:
      batch["input_ids"], batch["attention_mask"] = self.caption_tokens.lookup(
          batch["image_index"], flipped, choice)
    if self.text_cache is not None:
      batch["text_hidden"] = self.text_cache.lookup(batch["image_index"], choice, flipped)
    if self.dense_cache is not None:
      batch["dense_hidden"] = self.dense_cache.lookup(batch["image_index"], 0 * choice, flipped)
    if self.dense_tokens is not None:
      batch["dense_ids"], batch["dense_mask"] = self.dense_tokens.lookup(batch["image_index"],
                                                                         flipped)
    return batch


@dataclasses.dataclass(frozen=True)
class _EvalImage:
  """Position -> `transforms.eval_image_example` (the padding row past the end)."""
  source: Any
  pp: transforms.Preprocess
  tok: tokenizer_lib.Tokenizer

  def __call__(self, position: int) -> transforms.Example:
    record = self.source[int(position)] if position < len(self.source) else None
    return transforms.eval_image_example(record, self.pp, self.tok)


@dataclasses.dataclass(frozen=True)
class _EvalDense:
  """Eval image batch -> + `dense_hidden` of its valid rows (zeros for padding)."""
  dense_cache: Any

  def __call__(self, batch: Batch) -> Batch:
    idx = batch["image_index"][batch["valid"]]
    feats = self.dense_cache.lookup(idx, 0 * idx, np.zeros(len(idx), bool))
    return dict(batch, dense_hidden=_pad(feats, len(batch["valid"])))


@dataclasses.dataclass(frozen=True)
class _EvalCaptions:
  """`[B]` caption positions -> caption batch. Batch-level, not per caption: each image's record
  (JPEG included) is read once for its captions, and the batch is tokenised in one call."""
  source: Any
  tok: tokenizer_lib.Tokenizer
  pp: transforms.Preprocess
  captions_per_image: int
  text_cache: Any = None

  def __call__(self, pos: np.ndarray) -> Batch:
    cpi = self.captions_per_image
    valid = pos < len(self.source) * cpi
    image_idx = pos[valid] // cpi
    uniq = np.unique(image_idx)
    by_image = dict(zip(uniq.tolist(), sources.read_records(self.source, uniq)))
    texts = [sources.as_text(by_image[i]["captions"][j % cpi])
             for i, j in zip(image_idx.tolist(), pos[valid].tolist())]
    ids, mask = self.tok.encode_batch(texts, self.pp.max_len)
    n = len(pos)
    out = {"input_ids": _pad(ids, n), "attention_mask": _pad(mask, n),
           "caption_index": np.where(valid, pos, -1).astype(np.int32),
           "image_index": np.where(valid, pos // cpi, -1).astype(np.int32), "valid": valid}
    if self.text_cache is not None:
      out["text_hidden"] = _pad(self.text_cache.lookup(
          image_idx, pos[valid] % cpi, np.zeros(len(image_idx), bool)), n)
    return out


def _pad(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) == n:
    return x
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


# ---------------------------------------------------------------------------------------------
# Datasets: element s = this process's batch of step s.


def _shard(ds: grain.MapDataset, global_batch_size: int, process_index: int,
           process_count: int) -> grain.MapDataset:
  """Per-example dataset over global positions -> this process's slice of each global batch."""
  local = sources.local_batch_size(global_batch_size, process_count)
  return ds.batch(local, drop_remainder=True)[process_index::process_count]


def train_dataset(source, tok: tokenizer_lib.Tokenizer, pp: transforms.Preprocess, *,
                  global_batch_size: int, seed: int, process_index: int, process_count: int,
                  text_cache=None, dense_cache=None, dense_tokens=None,
                  caption_tokens=None) -> grain.MapDataset:
  """Endless training batches of this process (element s = step s; see the module docstring).

  Args:
    source: random-access source of the split (`open_split`).
    tok: tokenizer; pp: the per-example settings.
    global_batch_size: rows of a step over all processes.
    seed: data seed (order and augmentation).
    process_index, process_count: this process's shard.
    text_cache, dense_cache: `text_cache.TextCache` of the split's captions / dense captions
      (frozen text tower), or None.
    dense_tokens: `token_cache.TokenCache` of the split's dense captions (with swapped rows when
      `pp.hflip > 0`), or None to tokenise them per example (when `pp.dense`).
    caption_tokens: `token_cache.TokenCache` of the split's captions (swapped rows when
      `pp.hflip > 0`; only with `pp.text_aug_prob = 0`), or None to tokenise them per example.

  Returns:
    A `grain.MapDataset` of local batches.

  Raises:
    ValueError: the global batch exceeds the split or is not divisible by `process_count`, or
      a token cache is given for texts the pipeline augments or does not tokenise.
  """
  n = len(source)
  steps_per_epoch = n // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"global batch size {global_batch_size} exceeds the {n} training images.")
  sources.local_batch_size(global_batch_size, process_count)  # divisible: checked here
  if dense_tokens is not None:
    if not pp.dense:
      raise ValueError("dense_tokens given for a pipeline that does not tokenise dense captions "
                       "(Preprocess.dense is False).")
    pp = dataclasses.replace(pp, dense=False)  # the batch stage adds them
  if caption_tokens is not None:
    if pp.text_aug_prob > 0:
      raise ValueError(f"caption_tokens given for a pipeline that augments captions "
                       f"(text_aug_prob = {pp.text_aug_prob}): cached tokens would drop the "
                       "augmentation; set data.text_aug_prob = 0 or pass no caption cache.")
    pp = dataclasses.replace(pp, captions=False)  # the batch stage adds them
  cached = any(c is not None for c in (text_cache, dense_cache, dense_tokens, caption_tokens))
  ds = (grain.MapDataset.range(sys.maxsize)
        .map(_Position(seed, n, steps_per_epoch * global_batch_size))
        .map(_TrainRecord(source))
        .map(_TrainExample(pp, tok, int(seed), cached)))
  ds = _shard(ds, global_batch_size, process_index, process_count)
  return (ds.map(_CachedFeatures(text_cache, dense_cache, dense_tokens, caption_tokens))
          if cached else ds)


def _eval_steps(num_items: int, global_batch_size: int) -> int:
  return -(-num_items // global_batch_size)


def eval_image_dataset(source, tok, pp: transforms.Preprocess, *, global_batch_size: int,
                       process_index: int, process_count: int,
                       dense_cache=None) -> grain.MapDataset:
  """This process's eval image batches (dataset order, padded; see `eval_image_batches`)."""
  total = _eval_steps(len(source), global_batch_size) * global_batch_size
  ds = grain.MapDataset.range(total).map(_EvalImage(source, pp, tok))
  ds = _shard(ds, global_batch_size, process_index, process_count)
  return ds.map(_EvalDense(dense_cache)) if dense_cache is not None else ds


def eval_caption_dataset(source, tok, pp: transforms.Preprocess, *, global_batch_size: int,
                         process_index: int, process_count: int, captions_per_image: int = 5,
                         text_cache=None) -> grain.MapDataset:
  """This process's eval caption batches (dataset order, padded; see `eval_caption_batches`)."""
  num = len(source) * captions_per_image
  total = _eval_steps(num, global_batch_size) * global_batch_size
  ds = _shard(grain.MapDataset.range(total), global_batch_size, process_index, process_count)
  return ds.map(_EvalCaptions(source, tok, pp, captions_per_image, text_cache))


def iterate(ds: grain.MapDataset, *, start: int = 0, num_workers: int = 0,
            prefetch: int = 2) -> grain.DatasetIterator:
  """A grain iterator over `ds[start:]`, in order.

  Args:
    ds: a dataset of batches (`train_dataset`, `eval_*_dataset`).
    start: the first element.
    num_workers: 0 = build each batch in this process when asked; W > 0 = W spawned worker
      processes, worker w building elements w, w + W, ... ahead of time.
    prefetch: batches buffered ahead, over all workers (at least one per worker).

  Returns:
    The iterator; `close()` it to stop its workers.
  """
  it_ds = ds[start:].to_iter_dataset(_IN_PLACE)
  if num_workers > 0:
    _mark_flags_parsed()
    per_worker = max(1, -(-prefetch // num_workers))
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                           per_worker_buffer_size=per_worker))
  return iter(it_ds)


def _mark_flags_parsed() -> None:
  """grain 0.2.18's `mp_prefetch` reads an absl flag of its own (worker profiling, once JAX is
  imported) without falling back to its default, which fails in a program that never parsed absl
  flags (pytest, scripts). Marks them parsed, every flag keeping its default; an absl app has
  parsed them already (and `app.run` parses again anyway)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ---------------------------------------------------------------------------------------------
# Public iterators.


class TrainLoader:
  """Endless iterator over this process's training batches; state = {"seed", "step"}.

  Example:
    loader = TrainLoader.from_config(config, global_batch_size=128, seed=0, start_step=step)
    batch = to_global(next(loader), sharding)
    ckpt_extra = loader.get_state()   # {"seed": 0, "step": step + 1}

  Attributes:
    dataset: the `grain.MapDataset` of this process's batches (`dataset[s]` = step s).
    text_cache, dense_cache: the cached frozen text features the batches carry, or None.
    dense_tokens: the split's tokenised dense captions the batches carry, or None.
    caption_tokens: the split's tokenised captions the batches carry, or None.
  """

  def __init__(self, source, tok: tokenizer_lib.Tokenizer, pp: transforms.Preprocess, *,
               global_batch_size: int, seed: int, start_step: int = 0,
               process_index: int | None = None, process_count: int | None = None,
               num_workers: int = 0, prefetch: int = 2, text_cache=None, dense_cache=None,
               dense_tokens=None, caption_tokens=None):
    self._it = None
    p, n = process_shard(process_index, process_count)
    self.seed = int(seed)
    self.text_cache, self.dense_cache = text_cache, dense_cache
    self.dense_tokens, self.caption_tokens = dense_tokens, caption_tokens
    self.dataset = train_dataset(source, tok, pp, global_batch_size=int(global_batch_size),
                                 seed=self.seed, process_index=p, process_count=n,
                                 text_cache=text_cache, dense_cache=dense_cache,
                                 dense_tokens=dense_tokens, caption_tokens=caption_tokens)
    self.steps_per_epoch = len(source) // int(global_batch_size)
    self._num_workers, self._prefetch = int(num_workers), int(prefetch)
    self._step = int(start_step)

  @classmethod
  def from_config(cls, config, *, global_batch_size: int, seed: int, start_step: int = 0,
                  split: str = "train", process_index: int | None = None,
                  process_count: int | None = None, tok=None, tokenizes_dense: bool = True,
                  uses_dense: bool = True) -> "TrainLoader":
    """From a full config (`config.data`, `config.model.text_hf_dir` for the vocabulary).
    A frozen pretrained text tower's features come from the split's cache (data/text_cache.py,
    built here on first use). `tokenizes_dense` / `uses_dense`: the model's answers (its
    attributes of the same names): whether batches carry tokenised dense captions, and whether
    the model reads them (only then are their frozen features cached). Dense captions are
    tokenised once per split (data/token_cache.py) unless `data.cache_dense_tokens` is off;
    captions too when training applies no text augmentation (`data.text_aug_prob = 0`) unless
    `data.cache_caption_tokens` is off."""
    source = open_split(config.data, split)
    tok = tok or tokenizer_from_config(config)
    pp = Preprocess.from_config(config.data, dense=tokenizes_dense)
    caches = {"text_cache": cache_lib.for_split(config, source, split, kind="captions",
                                                train=True, tok=tok),
              "dense_cache": (cache_lib.for_split(config, source, split, kind="dense",
                                                  train=True, tok=tok) if uses_dense else None),
              "dense_tokens": (token_cache.for_split(config.data, source, split, tok=tok,
                                                     max_len=pp.dense_max_len,
                                                     flips=pp.hflip > 0)
                               if token_cache.enabled(config.data,
                                                      tokenizes_dense=tokenizes_dense)
                               else None),
              "caption_tokens": (token_cache.for_split(config.data, source, split, tok=tok,
                                                       max_len=pp.max_len, flips=pp.hflip > 0,
                                                       kind="captions")
                                 if token_cache.captions_enabled(config.data) else None)}
    return cls(source, tok, pp,
               global_batch_size=global_batch_size, seed=seed, start_step=start_step,
               process_index=process_index, process_count=process_count,
               num_workers=config.data.get("num_workers", 0), **caches)

  @property
  def step(self) -> int:
    """The step of the next batch."""
    return self._step

  def __iter__(self) -> "TrainLoader":
    return self

  def __next__(self) -> Batch:
    if self._it is None:
      self._it = iterate(self.dataset, start=self._step, num_workers=self._num_workers,
                         prefetch=self._prefetch)
    batch = next(self._it)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    """What a checkpoint saves: `{"seed", "step"}` (the step of the next batch)."""
    return {"seed": self.seed, "step": self._step}

  def set_state(self, state: dict[str, int]) -> None:
    """Continues at `state["step"]`; the seed must be this loader's."""
    if int(state["seed"]) != self.seed:
      raise ValueError(f"checkpointed data seed {state['seed']} differs from this loader's "
                       f"seed {self.seed}.")
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops the worker processes (a later `next` starts new ones at the current step)."""
    if self._it is not None:
      self._it.close()
      self._it = None

  def __del__(self):
    self.close()


def _drain(ds: grain.MapDataset, num_workers: int) -> Iterator[Batch]:
  it = iterate(ds, num_workers=num_workers)
  try:
    yield from it
  finally:
    it.close()


def eval_image_batches(source, tok, pp: Preprocess, *, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       num_workers: int = 0, dense_cache=None) -> Iterator[Batch]:
  """Eval images in dataset order: `image [B,H,W,3] float32` (or the canvas fields, module doc;
  box = the whole image, no flip), `dense_ids`/`dense_mask [B,Ld] int32` (if `pp.dense`),
  `image_index [B] int32` (-1 for padding), `valid [B] bool`; with `dense_cache` also
  `dense_hidden [B, Ld, D_text]`."""
  p, n = process_shard(process_index, process_count)
  return _drain(eval_image_dataset(source, tok, pp, global_batch_size=int(global_batch_size),
                                   process_index=p, process_count=n, dense_cache=dense_cache),
                num_workers)


def eval_caption_batches(source, tok, pp: Preprocess, *, global_batch_size: int,
                         process_index: int | None = None, process_count: int | None = None,
                         num_workers: int = 0, text_cache=None) -> Iterator[Batch]:
  """Eval captions in dataset order (5 per image): `input_ids`/`attention_mask [B, L] int32`,
  `caption_index`, `image_index [B] int32` (-1 for padding), `valid [B] bool`; with
  `text_cache` also `text_hidden [B, L, D_text]`."""
  p, n = process_shard(process_index, process_count)
  return _drain(eval_caption_dataset(source, tok, pp, global_batch_size=int(global_batch_size),
                                     process_index=p, process_count=n, text_cache=text_cache),
                num_workers)


def to_global(batch: Batch, sharding) -> dict:
  """Process-local batch -> global `jax.Array`s laid out by `sharding` (e.g.
  `NamedSharding(mesh, P("data"))`, which splits the leading axis of every leaf)."""
  import jax  # pylint: disable=g-import-not-at-top
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
