"""Dense caption length: full length, as the official code (which pads each batch to its longest
dense caption and never truncates).

`config.data.dense_max_len = 0` (auto) means "the longest dense caption of the dataset": [CLS] +
word pieces + [SEP], over every split, at most BERT's 512 positions. The longest is measured once
per dataset and vocabulary and recorded next to the prepared data
(`<builder data_dir>/dense_lengths.json`); `resolve_dense_max_len` writes the concrete number into
the config before training, so checkpoints, evaluation and exports all use the length the model
was trained with.
"""

from __future__ import annotations

import functools
import os

from gseps_jax.data import sources
from gseps_jax.data import tokenizer as tokenizer_lib

DENSE_AUTO = 0
BERT_MAX_POSITIONS = 512
DENSE_LENGTHS_FILE = "dense_lengths.json"


def longest_dense_pieces(source, tok: tokenizer_lib.Tokenizer, *, batch: int = 512) -> int:
  """Longest dense caption of a split in word pieces ([CLS]/[SEP] not counted); 0 if none."""
  longest = 0
  for start in range(0, len(source), batch):
    records = sources.read_records(source, range(start, min(start + batch, len(source))))
    texts = [sources.as_text(r["dense_caption"]) for r in records]
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

