"""Per-example functions of the input pipeline: pure, randomness only from the generator passed in.

Decoding, augmentation and tokenisation of one record are functions of (record, generator) or of
the record alone, so the grain pipeline (`pipeline.py`) may run them in any process, any order
and any worker count and get the same example. The generator of a training example is
`example_rng(seed, epoch, image index)`; the image order of an epoch is
`epoch_permutation(seed, epoch, N)`, and `train_position` maps a position of the endless
training stream to (epoch, image index).

Augmentation (config `data.*`): RandomResizedCrop with area fraction `crop_scale` ((1, 1) = no
crop, a plain resize) and a horizontal flip with probability `hflip` (0 = never); a flipped
image's caption (and dense caption) has "left" and "right" (and their variants) swapped, so the
words still describe the pixels. One of the image's captions is drawn per example, then text
augmentation (`text_aug_prob`) of it.

With `Preprocess.device_augment` the image fields are a uint8 canvas + crop box + flip
(`canvas.py`, the same draws), resized and normalised later by `device_augment.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import numpy as np

from gseps_jax.data import canvas as canvas_lib
from gseps_jax.data import dense_length
from gseps_jax.data import sources
from gseps_jax.data import tokenizer as tokenizer_lib

Example = dict[str, np.ndarray]
# SeedSequence stream tags: keep the permutation and per-example streams disjoint.
_PERM_TAG, _EXAMPLE_TAG = 1, 2
_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop aspect-ratio range (torchvision default)


CorruptImageError = canvas_lib.CorruptImageError
decode_image = canvas_lib.decode_image


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
  # True: images leave the host as uint8 canvases + crop box + flip (`canvas.py`), augmented by
  # the jitted consumer (`device_augment.py`); False: normalised float32 `[S, S, 3]` (host path).
  # The config's default is True; the dataclass keeps the plain-numpy host path for direct use.
  device_augment: bool = False
  canvas_size: int = 512
  dense: bool = True  # tokenise dense captions (False for models that read none, e.g. GRM)
  # Tokenise the caption per example (False: the batch stage looks its tokens up in the split's
  # caption token cache, data/token_cache.py; only without text augmentation).
  captions: bool = True

  @classmethod
  def from_config(cls, data_config, *, dense: bool = True) -> "Preprocess":
    """From `config.data`; `dense_max_len = 0` (auto) becomes `recorded_dense_len(data_config)`
    (normally `resolve_dense_max_len` has already written the concrete length into the config).
    `dense`: whether batches carry tokenised dense captions (the caller asks the model:
    `model.tokenizes_dense`; the data layer does not import models)."""
    get = data_config.get
    dense_len = int(get("dense_max_len", 90))
    if dense_len == dense_length.DENSE_AUTO:
      dense_len = dense_length.recorded_dense_len(data_config)
    return cls(image_size=int(get("image_size", 224)),
               mean=tuple(float(x) for x in get("mean", cls.mean)),
               std=tuple(float(x) for x in get("std", cls.std)),
               crop_scale=tuple(float(x) for x in get("crop_scale", cls.crop_scale)),
               hflip=float(get("hflip", cls.hflip)),
               max_len=int(get("max_len", 32)), dense_max_len=dense_len,
               text_aug_prob=float(get("text_aug_prob", 0.2)),
               device_augment=bool(get("device_augment", True)),
               canvas_size=int(get("canvas_size", cls.canvas_size)), dense=bool(dense))


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


def normalize_coefficients(mean, std) -> tuple[np.ndarray, np.ndarray]:
  """float32 `(scale, offset)` with `x * scale + offset == (x / 255 - mean) / std`; shared by the
  host path (`normalize`) and the device path (`device_augment.augment`)."""
  scale = np.asarray(1.0 / (255.0 * np.asarray(std)), np.float32)
  offset = np.asarray(-np.asarray(mean) / np.asarray(std), np.float32)
  return scale, offset


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
  """`[..., 3] uint8` -> float32 `(x / 255 - mean) / std`."""
  scale, offset = normalize_coefficients(mean, std)
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


def train_image_fields(data: bytes, rng: np.random.Generator, pp: Preprocess,
                       name: str) -> tuple[Example, bool]:
  """The image fields of a training example and whether it is flipped: `{"image": [S, S, 3]
  float32}` (host path), or with `pp.device_augment` the canvas fields of `canvas.py` (`image`
  uint8 canvas, `crop_box`, `image_wh`, `flip`). Both make the same draws in the same order (crop
  box, then flip), so the generator's later draws (text augmentation) are the same."""
  if not pp.device_augment:
    image, flipped = train_image_and_flip(data, rng, pp, name)
    return {"image": image}, flipped

  def box(width, height):
    if tuple(pp.crop_scale) == (1.0, 1.0):
      return 0, 0, width, height
    return random_resized_crop_box(rng, width, height, pp.crop_scale)
  fields = canvas_lib.canvas_fields(data, name, pp.canvas_size, box,
                                    lambda: rng.random() < pp.hflip)
  return fields, bool(fields["flip"])


def eval_image_fields(data: bytes | None, pp: Preprocess, name: str = "") -> Example:
  """The image fields of an eval image (`data=None`: the zero padding row): `eval_image`, or
  with `pp.device_augment` the canvas fields with the whole image as the box and no flip."""
  if not pp.device_augment:
    s = pp.image_size
    return {"image": (np.zeros((s, s, 3), np.float32) if data is None
                      else eval_image(data, pp, name))}
  if data is None:
    return canvas_lib.padding_fields(pp.canvas_size)
  return canvas_lib.canvas_fields(data, name, pp.canvas_size, lambda w, h: (0, 0, w, h),
                                  lambda: False)


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
  """The generator of a training example (caption choice, crop, flip, text augmentation): keyed
  by (seed, epoch, image index), so it does not depend on batch size, process or worker count."""
  return np.random.default_rng([seed, _EXAMPLE_TAG, epoch, image_index])


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """`[N]` order of the split in an epoch."""
  return np.random.default_rng([seed, _PERM_TAG, epoch]).permutation(num_examples)


@functools.lru_cache(maxsize=4)
def _cached_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  perm = epoch_permutation(seed, epoch, num_examples)
  perm.flags.writeable = False
  return perm


def train_position(position: int, *, seed: int, num_examples: int,
                   epoch_size: int) -> tuple[int, int]:
  """(epoch, image index) at `position` of the endless training stream: epoch e covers positions
  [e * epoch_size, (e + 1) * epoch_size) in the order `epoch_permutation(seed, e, N)` (its first
  `epoch_size` images: the remainder that does not fill a global batch is dropped)."""
  epoch, within = divmod(int(position), epoch_size)
  return epoch, int(_cached_permutation(seed, epoch, num_examples)[within])


def train_example(record: dict, rng: np.random.Generator, pp: Preprocess,
                  tok: tokenizer_lib.Tokenizer, *, with_choice: bool = False) -> Example:
  """One training example: a random one of the image's captions, augmented image and text (a
  flipped image's captions read left/right swapped). `with_choice` adds `caption_choice` (which
  caption) and `flipped`, what the cached text features and tokens are looked up by. Without
  `pp.captions` the example has no `input_ids`/`attention_mask` (the batch stage adds them)."""
  name = sources.example_name(record)
  captions = record["captions"]
  choice = int(rng.integers(len(captions)))
  caption = sources.as_text(captions[choice])
  out, flipped = train_image_fields(record["image"], rng, pp, name)
  if pp.captions:  # the last draws (text augmentation): skipping them changes no other draw
    if flipped:
      caption = swap_left_right(caption)
    out["input_ids"], out["attention_mask"] = tok.encode(caption, pp.max_len, rng=rng,
                                                         aug_prob=pp.text_aug_prob)
  out["image_index"] = np.int32(record["index"])
  if pp.dense:  # no draws: skipping it leaves the stream as it is
    dense = sources.as_text(record["dense_caption"])
    out["dense_ids"], out["dense_mask"] = tok.encode(swap_left_right(dense) if flipped else dense,
                                                     pp.dense_max_len)
  if with_choice:
    out.update(caption_choice=np.int32(choice), flipped=np.bool_(flipped))
  return out


def eval_image_example(record: dict | None, pp: Preprocess,
                       tok: tokenizer_lib.Tokenizer) -> Example:
  """One evaluation image (resize, no randomness) and its dense caption; `record=None` gives the
  zero padding row (`valid = False`, `image_index = -1`). Image fields: `eval_image_fields`;
  no dense caption fields without `pp.dense`."""
  if record is None:
    out = eval_image_fields(None, pp)
    out.update(image_index=np.int32(-1), valid=np.bool_(False))
    if pp.dense:
      out["dense_ids"] = out["dense_mask"] = np.zeros(pp.dense_max_len, np.int32)
    return out
  out = eval_image_fields(record["image"], pp, sources.example_name(record))
  out.update(image_index=np.int32(record["index"]), valid=np.bool_(True))
  if pp.dense:
    out["dense_ids"], out["dense_mask"] = tok.encode(sources.as_text(record["dense_caption"]),
                                                     pp.dense_max_len)
  return out
