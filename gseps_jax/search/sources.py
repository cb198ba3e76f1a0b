"""Images to index, in a fixed order: a folder of image files or a split of the checkpoint's
dataset (`open_images("DIR" | "dataset:SPLIT", config)`), with their dense captions if any."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Callable, Sequence

from gseps_jax import fileio

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DATASET_PREFIX = "dataset:"


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """Images in a fixed order.

  Attributes:
    description: what was asked for (a folder path or `dataset:SPLIT`).
    names: display name per image (file name relative to the folder, or the dataset image id).
    paths: file path per image ("" for dataset records).
    read: `indices -> list of records` with 'image' (encoded bytes), 'captions' (list[str] or
      None) and 'dense' (str or None).
    dense_available: every image has a dense caption.
  """
  description: str
  names: list[str]
  paths: list[str]
  read: Callable[[Sequence[int]], list[dict]]
  dense_available: bool
  is_dataset: bool

  def __len__(self) -> int:
    return len(self.names)


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _read_dense_file(path, names: list[str]) -> dict[str, str]:
  """`{"image": name, "dense_caption": text}` lines -> name -> text (every image, no extras)."""
  out = {}
  with io.StringIO(fileio.read_utf8(path), newline=None) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        out[str(row["image"])] = str(row["dense_caption"])
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{lineno}: expected a JSON object with 'image' and "
                         f"'dense_caption', got {line.strip()[:80]!r} ({e}).") from e
  missing = [n for n in names if n not in out]
  unknown = sorted(set(out) - set(names))
  if missing or unknown:
    raise ValueError(
        f"--dense={path} must give one dense caption per image of the folder (keys = file names "
        f"relative to the folder): {len(missing)} images have none (e.g. {missing[:3]}), "
        f"{len(unknown)} entries name no image (e.g. {unknown[:3]}).")
  return out


def folder_source(folder, dense_file=None) -> ImageSource:
  """Every image file under `folder` (recursive, sorted by relative path)."""
  folder = Path(folder)  # local-path-ok: image folders the user passes are local
  if not folder.is_dir():
    raise FileNotFoundError(f"--images={folder} is neither a directory nor "
                            f"'{DATASET_PREFIX}SPLIT'.")
  files = sorted(p for p in folder.rglob("*")
                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
  if not files:
    raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}.")
  names = [p.relative_to(folder).as_posix() for p in files]
  dense = _read_dense_file(dense_file, names) if dense_file else None

  def read(indices):
    return [{"image": files[i].read_bytes(), "captions": None,
             "dense": dense[names[i]] if dense else None} for i in indices]

  return ImageSource(str(folder), names, [str(p.resolve()) for p in files], read,
                     dense_available=dense is not None, is_dataset=False)


def dataset_source(config, split: str) -> ImageSource:
  """The checkpoint config's dataset split, in dataset order (as `evaluate.py` sees it)."""
  from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  source = pipeline.open_split(config.data, split)
  n = len(source)
  if n == 0:
    raise ValueError(f"Split {split!r} of {config.data.name} is empty.")
  # One metadata pass (ids, dense flags); image bytes are read again batch by batch when encoding.
  names, has_dense = [], True
  for start in range(0, n, 256):
    batch = range(start, min(n, start + 256))
    for r in pipeline.read_records(source, batch):
      names.append(_text(r["image_id"]))
      has_dense &= bool(r.get("has_dense", True)) and bool(_text(r.get("dense_caption", "")))

  def read(indices):
    return [{"image": r["image"], "captions": [_text(c) for c in r["captions"]],
             "dense": _text(r["dense_caption"])}
            for r in pipeline.read_records(source, indices)]

  return ImageSource(f"{DATASET_PREFIX}{split}", names, [""] * n, read,
                     dense_available=has_dense, is_dataset=True)


def open_images(spec: str, config, dense_file=None) -> ImageSource:
  """`DIR` or `dataset:SPLIT` -> ImageSource."""
  if spec.startswith(DATASET_PREFIX):
    if dense_file:
      raise ValueError("--dense is for image folders; a dataset index uses the split's own dense "
                       "captions.")
    return dataset_source(config, spec[len(DATASET_PREFIX):])
  return folder_source(spec, dense_file)
