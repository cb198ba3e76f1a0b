"""Decoding on the host: image bytes -> RGB PIL image, or -> a fixed uint8 canvas for the device.

With `data.device_augment` (the default) the host does not resize: it decodes each image to
uint8 and writes it into the top-left corner of a zeroed `[C, C, 3] uint8` canvas
(`C = data.canvas_size`, default 512, which holds any Flickr30K image, <= 500 px). The crop box
(x0, y0, w, h) and the flip are drawn on the host exactly as the host path draws them, the box in
the pixels of the original image; `data/device_augment.py` crops, resizes, flips and normalises
inside the jitted step. An image larger than the canvas (COCO's 640 px with C = 512) is reduced
on the host to fit, its longer side becoming C: first by PIL's `draft` (DCT-domain downscaling
by 1/2, 1/4 or 1/8 while decoding a JPEG, where the image is at least twice the fitted size),
then a bicubic resize for the rest; its crop box is scaled to canvas pixels and rounded to whole
pixels. Such images are resampled twice (fit, then crop) and their box is exact only to half a
canvas pixel; raise `canvas_size` to the largest image side to avoid both.

Canvas decoding of a baseline/progressive RGB or grayscale JPEG that fits the canvas goes through
simplejpeg (libjpeg-turbo called straight into a NumPy array: no PIL image object, no `tobytes`
copy). It runs the same libjpeg-turbo build settings PIL uses (accurate integer IDCT, fancy
upsampling), and the pixels are the same as PIL's (`tests/test_canvas_decode.py`); it takes
~1.1 ms instead of ~2 ms for a 500x375 Flickr-sized JPEG on this project's CPU. Anything else
(PNG, CMYK, an image to be fitted, a JPEG simplejpeg rejects) takes the PIL path, whose errors
name the example.

`canvas_fields` returns `image [C, C, 3] uint8`, `crop_box [4] int32` (x0, y0, w, h in canvas
pixels), `image_wh [2] int32` (the image's extent in the canvas: pixels outside it are padding
and never contribute to the output) and `flip` (bool).
"""

from __future__ import annotations

import io

import numpy as np


class CorruptImageError(ValueError):
  """An example's image bytes cannot be decoded."""


def _open(data: bytes, name: str, fit_side: int | None = None):
  """(decoded RGB PIL image, (original width, original height)). With `fit_side`, a JPEG whose
  longer side exceeds it is decoded at the coarsest DCT scale (1/2, 1/4, 1/8) that still covers
  the fitted size."""
  from PIL import Image
  try:
    img = Image.open(io.BytesIO(data))
    size = img.size
    if fit_side is not None and max(size) > fit_side:
      img.draft("RGB", _fit(size, fit_side))
    img.load()
  except Exception as e:  # PIL raises several types for bad data.
    raise CorruptImageError(f"Cannot decode the image of {name}: {e}.") from e
  return (img if img.mode == "RGB" else img.convert("RGB")), size


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
  """`size` scaled so that its longer side is `side` (each side at least 1)."""
  s = side / max(size)
  return max(1, round(size[0] * s)), max(1, round(size[1] * s))


def decode_image(data: bytes, name: str):
  """JPEG/PNG bytes -> RGB PIL image; CorruptImageError naming the example otherwise."""
  return _open(data, name)[0]


def _fast_jpeg(data: bytes, max_side: int) -> np.ndarray | None:
  """`[H, W, 3] uint8` of a JPEG no larger than `max_side` decoded by simplejpeg, or None where
  the PIL path must decode it (not a JPEG, too large, CMYK, rejected, simplejpeg missing)."""
  if data[:2] != b"\xff\xd8":
    return None
  try:
    import simplejpeg  # pylint: disable=g-import-not-at-top
    h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if max(h, w) > max_side or colorspace not in ("YCbCr", "Gray", "RGB"):
      return None
    return simplejpeg.decode_jpeg(data, colorspace="RGB")
  except (ImportError, ValueError, RuntimeError, OSError):  # bad data: ValueError
    return None


def decode_to_canvas(data: bytes, name: str, canvas_size: int):
  """-> (`[C, C, 3] uint8` canvas, (w, h) of the image in it, (w, h) of the original image)."""
  pixels = _fast_jpeg(data, canvas_size)
  if pixels is None:
    from PIL import Image
    img, size = _open(data, name, canvas_size)
    if max(img.size) > canvas_size:
      img = img.resize(_fit(size, canvas_size), Image.BICUBIC)
    pixels = np.asarray(img)
  else:
    size = pixels.shape[1], pixels.shape[0]
  h, w = pixels.shape[:2]
  canvas = np.empty((canvas_size, canvas_size, 3), np.uint8)
  canvas[:h, :w] = pixels
  canvas[:h, w:] = 0
  canvas[h:] = 0
  return canvas, (w, h), size


def canvas_fields(data: bytes, name: str, canvas_size: int, box_fn, flip_fn) -> dict:
  """The device-augmentation fields of one image (module doc). `box_fn(width, height)` draws
  the crop box in original pixels, then `flip_fn()` the flip: the order of the host path."""
  canvas, (cw, ch), (w, h) = decode_to_canvas(data, name, canvas_size)
  x0, y0, bw, bh = box_fn(w, h)
  flip = bool(flip_fn())
  if (cw, ch) != (w, h):  # reduced to fit: the box in canvas pixels
    sx, sy = cw / w, ch / h
    x1, y1 = min(cw, round((x0 + bw) * sx)), min(ch, round((y0 + bh) * sy))
    x0, y0 = min(round(x0 * sx), x1 - 1), min(round(y0 * sy), y1 - 1)
    bw, bh = x1 - x0, y1 - y0
  return {"image": canvas, "crop_box": np.asarray([x0, y0, bw, bh], np.int32),
          "image_wh": np.asarray([cw, ch], np.int32), "flip": np.bool_(flip)}


def padding_fields(canvas_size: int) -> dict:
  """The fields of an eval padding row: a zero canvas whose 1-pixel image is zero."""
  return {"image": np.zeros((canvas_size, canvas_size, 3), np.uint8),
          "crop_box": np.asarray([0, 0, 1, 1], np.int32),
          "image_wh": np.asarray([1, 1], np.int32), "flip": np.bool_(False)}
