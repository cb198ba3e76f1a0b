"""Random-access sources of the prepared splits, record reading, and this process's shard.

A split is a tfds array_record data source (`open_split`): `source[i]` is the record of image i
(`image` JPEG/PNG bytes, `captions`, `dense_caption`, `index`, `image_id`, `file_name`, ...),
with the image left undecoded. Nothing here decodes or augments (that is `transforms.py`).
"""

from __future__ import annotations

from typing import Sequence

from gseps_jax.data import tokenizer as tokenizer_lib


def as_text(x) -> str:
  """A record's text field (bytes or str) as str."""
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def example_name(record: dict) -> str:
  """How errors name a record: "example 4 (image id 77, file 77.jpg)"."""
  return (f"example {int(record['index'])} (image id {as_text(record['image_id'])}"
          + (f", file {as_text(record['file_name'])}"
             if as_text(record.get("file_name", "")) else "")
          + ")")


def open_split(data_config, split: str):
  """Random-access source of a split (builds synthetic_regions if absent). Image stays JPEG bytes.

  Raises:
    ValueError: the prepared dataset has no split `split` (the message lists those it has).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from gseps_jax.data import prepare  # pylint: disable=g-import-not-at-top

  builder = prepare.ensure_prepared(data_config)
  if split not in builder.info.splits:
    raise ValueError(f"{builder.name} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}.")
  return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})


def read_records(source, indices: Sequence[int]) -> list[dict]:
  """Records `indices` of a random-access source (batched `__getitems__` when it has one)."""
  indices = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def tokenizer_from_config(config) -> tokenizer_lib.Tokenizer:
  """Tokenizer for a full config (`config.data.tokenizer_dir`, else `config.model.text_hf_dir`)."""
  text_dir = config.model.get("text_hf_dir", "") if "model" in config else ""
  return tokenizer_lib.load_tokenizer(tokenizer_lib.resolve_tokenizer_dir(config.data, text_dir))


def process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of this process among the readers; defaults from JAX."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  return process_index, process_count


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Rows of a global batch that each process reads."""
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{process_count} processes.")
  return global_batch_size // process_count
