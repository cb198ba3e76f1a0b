"""The image augmentation of the input pipeline as a pure jitted function (on the accelerator).

With `data.device_augment` the host ships each image as a uint8 canvas with its crop box, its
extent in the canvas and its flip (`canvas.py`); `augment` turns them into the normalised
`[B, S, S, 3] float32` images the models read, inside the jitted train step and the evaluator's
image encoding (`images_from_batch`). It is what the host path (`transforms.train_image_and_flip`)
does with PIL, computed the same way:

- crop + resize: PIL's `Image.resize(BICUBIC, box=...)`. Separable, horizontal pass then
  vertical; output pixel i of a box (x0, w) resized to S samples the source around
  `center = x0 + (i + 0.5) * w / S` with Keys' cubic (a = -0.5) stretched by
  `max(w / S, 1)` when downscaling (antialiasing); taps outside the image (not the box: pixels
  next to the box contribute, as in PIL) get weight 0 and the rest are renormalised, so the
  canvas padding never contributes. Each pass rounds and clips to [0, 255] as PIL's uint8 passes
  do, so most pixels equal PIL's exactly and the rest differ by one level (tests/
  test_device_augment.py). This is `jax.image.scale_and_translate(method="bicubic",
  antialias=True)`'s kernel, but with the image's own extent as the edge, which
  scale_and_translate (edge = array edge) cannot take per example.
- flip: the horizontal pass's weight rows reversed (free);
- normalise: `(x / 255 - mean) / std`.

The passes are dense matmuls with per-example `[S, C]` weight matrices, about
`2 * B * 3 * S * C * (C + S)` FLOPs (C = canvas side): small next to a ViT forward, and batch
sharded like the rest of the step. `precision=HIGHEST` keeps TPUs from rounding the pixels to
bf16. No model imports here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gseps_jax.data import transforms

AUGMENT_KEYS = ("crop_box", "image_wh", "flip")
_A = -0.5  # PIL's bicubic


def _cubic(x):
  x = jnp.abs(x)
  near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1.0
  far = ((_A * x - 5.0 * _A) * x + 8.0 * _A) * x - 4.0 * _A
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resize_weights(start, length, extent, out_size: int, in_size: int):
  """`[out_size, in_size]` weights of one axis: box [start, start + length) of an image with
  `extent` valid pixels (of `in_size`) resized to `out_size` (PIL's `precompute_coeffs`)."""
  start, length, extent = (jnp.asarray(v, jnp.float32) for v in (start, length, extent))
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)
  center = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pos = jnp.arange(in_size, dtype=jnp.float32)
  w = _cubic((pos[None, :] + 0.5 - center[:, None]) / support)
  w = jnp.where(pos[None, :] < extent, w, 0.0)
  return w / jnp.sum(w, axis=1, keepdims=True)


def _round(x):
  return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def augment(canvas, crop_box, image_wh, flip, *, image_size: int, mean, std):
  """`canvas [B, C, C, 3] uint8`, `crop_box [B, 4]` (x0, y0, w, h), `image_wh [B, 2]`,
  `flip [B] bool` -> normalised `[B, S, S, 3] float32` (module doc)."""
  c = canvas.shape[1]
  s = int(image_size)
  box = crop_box.astype(jnp.float32)
  wh = image_wh.astype(jnp.float32)
  wx = jax.vmap(lambda b, e: resize_weights(b[0], b[2], e, s, c))(box, wh[:, 0])  # [B, S, C]
  wy = jax.vmap(lambda b, e: resize_weights(b[1], b[3], e, s, c))(box, wh[:, 1])
  wx = jnp.where(flip[:, None, None], wx[:, ::-1], wx)
  hi = jax.lax.Precision.HIGHEST
  x = _round(jnp.einsum("bsw,bhwc->bhsc", wx, canvas.astype(jnp.float32), precision=hi))
  x = _round(jnp.einsum("bth,bhsc->btsc", wy, x, precision=hi))
  scale, offset = transforms.normalize_coefficients(mean, std)
  return x * scale + offset


def images_from_batch(batch: dict, data_config) -> dict:
  """`batch` with its canvas fields (`image` uint8 + AUGMENT_KEYS) replaced by the normalised
  float32 `image`; a batch without them (host path, `data.device_augment = False`) as it is.
  Traceable: call it inside the jitted step."""
  if "crop_box" not in batch:
    return batch
  batch = dict(batch)
  aug = [batch.pop(k) for k in AUGMENT_KEYS]
  batch["image"] = augment(batch["image"], *aug, **image_options(data_config))
  return batch


def image_options(data_config) -> dict:
  """The static keyword arguments of `augment` from `config.data` (defaults: `Preprocess`'s)."""
  get, pp = data_config.get, transforms.Preprocess
  return {"image_size": int(get("image_size", pp.image_size)),
          "mean": tuple(float(v) for v in get("mean", pp.mean)),
          "std": tuple(float(v) for v in get("std", pp.std))}
