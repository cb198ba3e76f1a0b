"""Canvas decoding: the simplejpeg fast path gives PIL's pixels, and everything else falls back."""

import io

import numpy as np
import pytest
from PIL import Image

from gseps_jax.data import canvas


def _encode(arr: np.ndarray, mode: str, fmt: str = "JPEG", **kw) -> bytes:
  out = io.BytesIO()
  Image.fromarray(arr).convert(mode).save(out, format=fmt, **kw)
  return out.getvalue()


def _image(w: int, h: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3),
                                                   dtype=np.uint8)).resize((w, h)))
  return np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)


def _pil_rgb(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


CASES = {
    "ycbcr 4:2:0": ("RGB", {}),
    "ycbcr 4:4:4": ("RGB", {"subsampling": 0}),
    "ycbcr 4:2:2": ("RGB", {"subsampling": 1}),
    "progressive": ("RGB", {"progressive": True}),
    "grayscale": ("L", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("size", [(53, 37), (500, 375), (375, 500)])
def test_fast_path_equals_pil(case, size):
  mode, kw = CASES[case]
  data = _encode(_image(*size), mode, quality=90, **kw)
  assert canvas._fast_jpeg(data, 512) is not None  # the fast path decodes it
  image, (w, h), original = canvas.decode_to_canvas(data, "x", 512)
  assert (w, h) == original == size
  np.testing.assert_array_equal(image[:h, :w], _pil_rgb(data))
  assert not image[h:].any() and not image[:, w:].any()


@pytest.mark.parametrize("kind", ["cmyk", "png", "larger than the canvas"])
def test_other_images_take_the_pil_path(kind):
  arr = _image(80, 60)
  data = {"cmyk": lambda: _encode(arr, "CMYK", quality=90),
          "png": lambda: _encode(arr, "RGB", fmt="PNG"),
          "larger than the canvas": lambda: _encode(arr, "RGB", quality=90)}[kind]()
  side = 64 if kind == "larger than the canvas" else 128
  assert canvas._fast_jpeg(data, side) is None
  image, (w, h), original = canvas.decode_to_canvas(data, "x", side)
  assert original == (80, 60)
  if kind == "larger than the canvas":
    assert (w, h) == (64, 48)
  else:
    np.testing.assert_array_equal(image[:h, :w], _pil_rgb(data))


def test_canvas_margin_is_zeroed_when_memory_is_dirty(monkeypatch):
  """The canvas is allocated uninitialised; the margin must still come out zero."""
  data = _encode(_image(50, 30), "RGB", quality=90)
  want = _pil_rgb(data)
  monkeypatch.setattr(canvas.np, "empty",
                      lambda shape, dtype: np.full(shape, 255, dtype))
  image, (w, h), _ = canvas.decode_to_canvas(data, "x", 64)
  assert (w, h) == (50, 30)
  assert not image[h:].any() and not image[:, w:].any()
  np.testing.assert_array_equal(image[:h, :w], want)


def test_truncated_jpeg_is_a_corrupt_image_error():
  data = _encode(_image(120, 90), "RGB", quality=90)
  with pytest.raises(canvas.CorruptImageError, match="Cannot decode the image of example 7"):
    canvas.decode_to_canvas(data[:len(data) // 2], "example 7", 128)
