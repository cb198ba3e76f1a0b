"""tfds builders for the Karpathy splits of Flickr30K and COCO, read from SEPS's caption folder.

Caption folder (`--manual_dir`, e.g. SEPS's `data/f30k/`), all UTF-8 text:
  `{split}_caps.txt`   one caption per line; image k of the split owns lines 5k..5k+4.
  `{split}_ids.txt`    ONE image id PER CAPTION LINE (each id repeated on 5 consecutive lines).
  `id_mapping.json`    {"<id>": "<image file name>"}; COCO names point into train2014/val2014.
  `f30k_{train,test}.jsonl` / `coco_{train,testall}.jsonl`   dense captions: one JSON object
                       `{"text": ...}` per IMAGE, in split order (optional; there is none for dev).
Images come from `--image_dir` (the builder's `image_dir` argument), looked up as
`image_dir/<name>`, then `image_dir/{train2014,val2014}/<name>`, then by file name anywhere below.

Each example (one per image, split order = file order, so index k is image k of the split):
  image        JPEG bytes (read lazily: use `decoders={"image": tfds.decode.SkipDecoding()}`)
  index        int32, position of the image in the split
  image_id     the id string from `{split}_ids.txt`
  file_name    the file name from `id_mapping.json`
  captions     5 strings, in file order
  dense_caption  str ("" if the split has no dense file), has_dense bool
Splits: train / dev / test; for COCO, test is the 5K `testall` split (COCO 1K = its 5 consecutive
1,000-image folds, see `coco_1k_folds`).

Every malformed input fails before anything is written, with one sentence naming file and line.
No TensorFlow: build with `file_format="array_record"`, read with `builder.as_data_source()`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

# Caption and image folders may be local or `gs://`: every path is an etils.epath.Path.
Path = epath.Path

CAPTIONS_PER_IMAGE = 5
_COCO_SUBDIRS = ("train2014", "val2014")


class DataFormatError(ValueError):
  """Input files do not match the documented caption-folder / image-folder format."""


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """File names of one split inside the caption folder."""
  caps: str
  ids: str
  dense: str | None  # None: this split never has dense captions


FLICKR30K_FILES = {
    "train": SplitFiles("train_caps.txt", "train_ids.txt", "f30k_train.jsonl"),
    "dev": SplitFiles("dev_caps.txt", "dev_ids.txt", "f30k_dev.jsonl"),
    "test": SplitFiles("test_caps.txt", "test_ids.txt", "f30k_test.jsonl"),
}
COCO_FILES = {
    "train": SplitFiles("train_caps.txt", "train_ids.txt", "coco_train.jsonl"),
    "dev": SplitFiles("dev_caps.txt", "dev_ids.txt", "coco_dev.jsonl"),
    "test": SplitFiles("testall_caps.txt", "testall_ids.txt", "coco_testall.jsonl"),
}
ID_MAPPING = "id_mapping.json"


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image of a split, as read from the caption folder (image bytes not yet read)."""
  index: int
  image_id: str
  file_name: str
  path: Path
  captions: tuple[str, ...]
  dense_caption: str
  has_dense: bool
  ids_line: int  # 1-based line in {split}_ids.txt of the image's first caption (for messages)


def _read_lines(path: Path) -> list[str]:
  # Same reading as the official loader: universal newlines, each line stripped.
  return [line.strip() for line in io.StringIO(_read_text(path), newline=None)]


def _read_text(path: Path) -> str:
  """The file's text; bytes that are not UTF-8 are a DataFormatError naming file and line."""
  from gseps_jax import fileio  # pylint: disable=g-import-not-at-top
  return fileio.read_utf8(path, DataFormatError)


def _require_file(path: Path, what: str) -> None:
  if not path.is_file():
    raise DataFormatError(f"Missing {what} {path}: the caption folder (--manual_dir) must contain "
                          "it, exactly as the SEPS repository ships it.")


def load_id_mapping(manual_dir: Path) -> dict[str, str]:
  path = manual_dir / ID_MAPPING
  _require_file(path, "id mapping")
  try:
    mapping = json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise DataFormatError(f"{path} line {e.lineno}: not valid JSON ({e.msg}).") from e
  if not isinstance(mapping, dict):
    raise DataFormatError(f"{path} line 1: expected a JSON object {{\"<id>\": \"<file name>\"}}.")
  return {str(k): str(v) for k, v in mapping.items()}


class ImageResolver:
  """Finds an image file under `image_dir` (direct, COCO sub-folder, or anywhere below)."""

  def __init__(self, image_dir: Path):
    self.image_dir = image_dir
    self._by_name: dict[str, Path] | None = None

  def find(self, name: str) -> Path | None:
    direct = self.image_dir / name
    if direct.is_file():
      return direct
    for sub in _COCO_SUBDIRS:
      if sub in name:
        cand = self.image_dir / sub / _base_name(name)
        if cand.is_file():
          return cand
    if self._by_name is None:  # One walk of the tree, only if direct lookups fail.
      self._by_name = {}
      for root, _, files in self.image_dir.walk():
        for f in files:
          self._by_name.setdefault(f, root / f)
    return self._by_name.get(_base_name(name))


def _base_name(name: str) -> str:
  """The file name of an id_mapping entry ('val2014/x.jpg' -> 'x.jpg')."""
  return name.rsplit("/", 1)[-1]


def read_dense(path: Path, num_images: int, caps_path: Path) -> list[str]:
  """Dense captions of a split: `[num_images]` texts from a jsonl with one object per image."""
  texts = []
  with io.StringIO(_read_text(path), newline=None) as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataFormatError(f"{path} line {lineno}: not valid JSON ({e.msg}).") from e
      if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataFormatError(f"{path} line {lineno}: expected an object with a \"text\" string.")
      texts.append(obj["text"].strip())
  if len(texts) < num_images:
    raise DataFormatError(
        f"{path} line {len(texts) + 1}: missing the dense caption of image {len(texts)} of the "
        f"split ({caps_path.name} lists {num_images} images but the file has {len(texts)} "
        "objects; it needs one per image, in split order).")
  if len(texts) > num_images:
    raise DataFormatError(
        f"{path} line {num_images + 1}: extra dense caption ({caps_path.name} lists only "
        f"{num_images} images, one JSON object per image expected).")
  return texts


def read_split(manual_dir: str | os.PathLike, files: SplitFiles, image_dir: str | os.PathLike,
               *, id_mapping: dict[str, str] | None = None,
               resolver: ImageResolver | None = None) -> list[ImageRecord]:
  """Reads and validates one split's text files; returns its images in split order."""
  manual_dir, image_dir = Path(manual_dir), Path(image_dir)
  caps_path, ids_path = manual_dir / files.caps, manual_dir / files.ids
  _require_file(caps_path, "caption file")
  _require_file(ids_path, "id file")
  caps, ids = _read_lines(caps_path), _read_lines(ids_path)
  if len(caps) != len(ids):
    raise DataFormatError(
        f"{ids_path} line {min(len(caps), len(ids)) + 1}: {ids_path.name} has {len(ids)} lines but "
        f"{caps_path.name} has {len(caps)}; there must be one id per caption line.")
  mapping = load_id_mapping(manual_dir) if id_mapping is None else id_mapping
  resolver = resolver or ImageResolver(image_dir)

  # Group consecutive equal ids: each image must own exactly 5 consecutive lines.
  records = []
  start = 0
  while start < len(ids):
    image_id = ids[start]
    end = start
    while end < len(ids) and ids[end] == image_id:
      end += 1
    if end - start != CAPTIONS_PER_IMAGE:
      raise DataFormatError(
          f"{ids_path} line {start + 1}: image id {image_id} has {end - start} consecutive caption "
          f"lines (lines {start + 1}-{end}) but each image must own exactly "
          f"{CAPTIONS_PER_IMAGE}.")
    if image_id not in mapping:
      raise DataFormatError(
          f"{ids_path} line {start + 1}: image id {image_id} has no entry in "
          f"{manual_dir / ID_MAPPING}.")
    name = mapping[image_id]
    path = resolver.find(name)
    if path is None:
      raise DataFormatError(
          f"{ids_path} line {start + 1}: image id {image_id} maps to {name}, which is not under "
          f"the image folder {image_dir} (looked for {name} directly, in train2014/ and val2014/, "
          "and by file name in every sub-folder).")
    records.append(ImageRecord(index=len(records), image_id=image_id, file_name=name, path=path,
                               captions=tuple(caps[start:end]), dense_caption="",
                               has_dense=False, ids_line=start + 1))
    start = end

  if files.dense is not None and (manual_dir / files.dense).is_file():
    dense = read_dense(manual_dir / files.dense, len(records), caps_path)
    records = [dataclasses.replace(r, dense_caption=d, has_dense=True)
               for r, d in zip(records, dense)]
  return records


def read_image_bytes(record: ImageRecord, split: str) -> bytes:
  """The image as RGB JPEG bytes; original bytes when they already are. Corrupt files fail here."""
  from PIL import Image  # tfds also imports pillow lazily.

  data = record.path.read_bytes()
  try:
    with Image.open(io.BytesIO(data)) as img:
      fmt, mode = img.format, img.mode
      img.load()  # Full decode: catches truncated / corrupt files at build time, not in training.
      if fmt == "JPEG" and mode == "RGB":
        return data
      out = io.BytesIO()
      img.convert("RGB").save(out, format="JPEG", quality=95)
      return out.getvalue()
  except Exception as e:  # PIL raises several types for bad data.
    raise DataFormatError(
        f"Corrupt image {record.path} (split {split}, example {record.index}, image id "
        f"{record.image_id}): {e}.") from e


def coco_1k_folds(num_images: int = 5000, fold_size: int = 1000) -> list[range]:
  """Image index ranges of the COCO 1K protocol: consecutive folds of the 5K test split."""
  return [range(s, s + fold_size) for s in range(0, num_images, fold_size)]


def example_features(**extra) -> dict:
  """The per-image example every builder writes (the pipeline reads only these), plus `extra`."""
  return {
      "image": tfds.features.Image(encoding_format="jpeg"),
      "index": np.int32,
      "image_id": tfds.features.Text(),
      "file_name": tfds.features.Text(),
      "captions": tfds.features.Sequence(tfds.features.Text(), length=CAPTIONS_PER_IMAGE),
      "dense_caption": tfds.features.Text(),
      "has_dense": np.bool_,
      **extra,
  }


class _KarpathyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic; subclasses set SPLIT_FILES and the description."""

  # tfds finds the module's files through importlib resources of the top-level package, which
  # fails for a namespace/editable install; name them explicitly.
  pkg_dir_path = epath.Path(__file__).parent
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Karpathy splits read from the SEPS caption folder."}
  SPLIT_FILES: dict[str, SplitFiles] = {}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the SEPS caption folder as --manual_dir ({split}_caps.txt, {split}_ids.txt, "
      "id_mapping.json, dense *.jsonl) and the image folder as --image_dir.")
  # Threads that read and verify image files (PIL releases the GIL while decoding).
  NUM_READ_THREADS = 4

  def __init__(self, *, image_dir: str | os.PathLike | None = None, **kwargs):
    self._image_dir = None if image_dir is None else Path(image_dir)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(example_features()),
        # Split order = file order: evaluation pairs caption 5k+j with image k.
        disable_shuffling=True,
        homepage="https://github.com/Sweet4tars/seps",
    )

  def _split_generators(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    if manual_dir is None or not Path(manual_dir).is_dir():
      raise DataFormatError(
          f"Missing caption folder {manual_dir}: pass --manual_dir=DIR pointing at the SEPS "
          f"caption folder (with {', '.join(f.caps for f in self.SPLIT_FILES.values())}, ...).")
    if self._image_dir is None or not self._image_dir.is_dir():
      raise DataFormatError(
          f"Missing image folder {self._image_dir}: pass --image_dir=DIR pointing at the "
          f"{self.name} images.")
    manual_dir = Path(manual_dir)
    mapping = load_id_mapping(manual_dir)
    resolver = ImageResolver(self._image_dir)
    # Validate every split before writing anything.
    records = {split: read_split(manual_dir, files, self._image_dir, id_mapping=mapping,
                                 resolver=resolver)
               for split, files in self.SPLIT_FILES.items()}
    return {split: self._generate_examples(split, recs) for split, recs in records.items()}

  def _generate_examples(self, split: str, records: Sequence[ImageRecord]) -> Iterator:
    with concurrent.futures.ThreadPoolExecutor(self.NUM_READ_THREADS) as pool:
      images = pool.map(lambda r: read_image_bytes(r, split), records)
      for record, image in zip(records, images):
        yield record.index, {
            "image": image,
            "index": record.index,
            "image_id": record.image_id,
            "file_name": record.file_name,
            "captions": list(record.captions),
            "dense_caption": record.dense_caption,
            "has_dense": record.has_dense,
        }


class Flickr30kKarpathy(_KarpathyBuilder):
  """Flickr30K, Karpathy splits (29,000 / 1,014 / 1,000 images), with SEPS dense captions."""
  SPLIT_FILES = FLICKR30K_FILES


class CocoKarpathy(_KarpathyBuilder):
  """COCO, Karpathy splits (113,287 / 5,000 / 5,000 images; test = testall), SEPS dense captions."""
  SPLIT_FILES = COCO_FILES
