"""Random-access sources of the prepared splits, record reading, and this process's shard.

A split is a tfds array_record data source (`open_split`): `source[i]` is the record of image i
(`image` JPEG/PNG bytes, `captions`, `dense_caption`, `index`, `image_id`, `file_name`, ...),
with the image left undecoded. Nothing here decodes or augments (that is `transforms.py`).

`open_split` reads the records through `LeanSource`: the same array_record files and the same
record dicts as tfds's data source, parsed straight from the `tf.train.Example` protos for the
flat schemas our builders write (scalar bytes/int/bool/float fields and fixed-length lists of
bytes). tfds's generic NumPy parser (flatten, ragged checks, per-feature `np.array`, nest)
costs ~0.4 ms per record, a fifth of what the whole GRM input path costs per image after the
decode (docs/performance.md, "Input pipeline"); this costs ~0.05 ms. A schema with any other
feature keeps the tfds source.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from typing import Any, Sequence

import numpy as np

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
  return lean_source(builder.as_data_source(split,
                                            decoders={"image": tfds.decode.SkipDecoding()}))


def _field_kinds(tfds_source) -> dict[str, str] | None:
  """Field -> "bytes" | "bytes_list" | "int" | "bool" | "float" for a flat schema, else None."""
  kinds = {}
  for key, info in tfds_source.dataset_info.features.get_serialized_info().items():
    dtype, shape = np.dtype(info.np_dtype), tuple(info.shape)
    if dtype == object and len(shape) <= 1 and None not in shape:
      kinds[key] = "bytes" if not shape else "bytes_list"
    elif shape:
      return None
    elif dtype == np.bool_:
      kinds[key] = "bool"
    elif np.issubdtype(dtype, np.integer):
      kinds[key] = "int"
    elif np.issubdtype(dtype, np.floating):
      kinds[key] = "float"
    else:
      return None
  return kinds


def lean_source(tfds_source):
  """`LeanSource` over a tfds array_record data source whose schema is flat; else the source."""
  if not hasattr(tfds_source, "data_source") or not hasattr(tfds_source, "dataset_info"):
    return tfds_source
  kinds = _field_kinds(tfds_source)
  return tfds_source if kinds is None else LeanSource(tfds_source, kinds)


class LeanSource(SequenceABC):
  """A tfds data source's records, parsed from the serialized Examples directly (module doc).

  `source[i]`, `source.__getitems__(indices)` and `len(source)` return what the tfds source
  returns (`tests/test_lean_source.py` compares every record of both builders); the tfds
  source is `source.tfds_source`.
  """

  def __init__(self, tfds_source, kinds: dict[str, str]):
    self.tfds_source = tfds_source
    self._kinds = dict(kinds)

  def __len__(self) -> int:
    return len(self.tfds_source)

  def __getitem__(self, index) -> dict[str, Any]:
    if not isinstance(index, (int, np.integer)):
      raise TypeError(f"LeanSource indices are integers, not {type(index).__name__}.")
    return self._parse(self.tfds_source.data_source[int(index)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    indices = [int(i) for i in indices]
    raw = self.tfds_source.data_source.__getitems__(indices) if indices else []
    if len(raw) != len(indices):
      raise IndexError(f"asked for {len(indices)} records, read {len(raw)}.")
    return [self._parse(r) for r in raw]

  def _parse(self, serialized: bytes) -> dict[str, Any]:
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
    feature = tf_example_pb2.Example.FromString(serialized).features.feature
    out = {}
    for key, kind in self._kinds.items():
      if key not in feature:
        raise KeyError(f"record has no field {key!r} (its fields: {sorted(feature)}); "
                       f"the prepared dataset does not match its builder's schema.")
      f = feature[key]
      if kind == "bytes":
        out[key] = f.bytes_list.value[0]
      elif kind == "bytes_list":
        out[key] = list(f.bytes_list.value)
      elif kind == "int":
        out[key] = int(f.int64_list.value[0])
      elif kind == "bool":
        out[key] = bool(f.int64_list.value[0])
      else:
        out[key] = float(np.float32(f.float_list.value[0]))
    return out

  def __repr__(self) -> str:
    return f"LeanSource({self.tfds_source!r})"


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
