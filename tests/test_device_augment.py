"""Augmentation on the device (data/canvas.py + data/device_augment.py) against the host path:
PIL's bicubic box resize, canvas padding, flips that follow the caption swap, RandomResizedCrop
statistics, images reduced to fit the canvas, whole batches with the switch on and off, resume,
and dense captions tokenised only for models that read them."""

import io

import numpy as np
import pytest
from PIL import Image

import tiny
from gseps_jax import models
from gseps_jax.data import canvas, device_augment, pipeline

ONE_LEVEL = 1.0 / (255.0 * min(pipeline.Preprocess.std))  # one uint8 level after normalising


# Fixtures `tok` and `data` (a small synthetic_regions split): tests/conftest.py.


def _photo(w=500, h=375, seed=0) -> np.ndarray:
  """Smooth content + sensor-like noise (the stand-in of benchmarks/input_pipeline.py)."""
  rng = np.random.default_rng(seed)
  base = rng.uniform(0, 255, (h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
  img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.int16)
  return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def _jpeg(arr, quality=90) -> bytes:
  out = io.BytesIO()
  Image.fromarray(arr).save(out, format="JPEG", quality=quality)
  return out.getvalue()


def _levels(canvas_arr, boxes, wh, flip, size):
  """Device output in uint8 levels (mean 0, std 1/255)."""
  out = device_augment.augment(np.asarray(canvas_arr), np.asarray(boxes, np.int32),
                               np.asarray(wh, np.int32), np.asarray(flip, bool),
                               image_size=size, mean=(0, 0, 0), std=(1 / 255,) * 3)
  return np.asarray(out)


def test_device_resize_matches_pil_and_padding_never_leaks():
  img = _photo()
  h, w = img.shape[:2]
  cv = np.full((512, 512, 3), 255, np.uint8)  # padding that would show if it leaked
  cv[:h, :w] = img
  # Interior, touching the right/bottom image edge (next to the padding), the whole image, thin
  # boxes (upscaling on one axis), the top-left corner.
  boxes = [(10, 20, 300, 200), (w - 150, h - 100, 150, 100), (0, 0, w, h), (100, 50, 120, 325),
           (3, 4, 100, 100), (w - 60, 0, 60, h)]
  for size in (224, 64):
    got = _levels([cv] * len(boxes), boxes, [(w, h)] * len(boxes), [False] * len(boxes), size)
    for b, g in zip(boxes, got):
      x0, y0, bw, bh = b
      ref = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC,
                                                   box=(x0, y0, x0 + bw, y0 + bh)), np.float32)
      d = np.abs(g - ref)
      # Measured: at most 1 level (PIL's fixed-point coefficients), on < 0.1% of the pixels.
      assert d.max() <= 1.0 and d.mean() < 0.01, (b, size, d.max(), d.mean())
  # Leak check that can fail: the same edge box with the image extent set to the canvas (the
  # padding counted as image) differs from PIL.
  b = boxes[1]
  leaked = _levels([cv], [b], [(512, 512)], [False], 224)[0]
  ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC,
                                               box=(b[0], b[1], b[0] + b[2], b[1] + b[3])))
  assert np.abs(leaked - ref).max() > 5


def test_device_flip_mirrors():
  img = _photo(120, 90, seed=2)
  cv = np.zeros((128, 128, 3), np.uint8)
  cv[:90, :120] = img
  box = [(7, 5, 80, 60)] * 2
  plain, flipped = _levels([cv, cv], box, [(120, 90)] * 2, [False, True], 32)
  np.testing.assert_array_equal(flipped, plain[:, ::-1])


def _record(index=3):
  img = np.zeros((24, 40, 3), np.uint8)
  img[:, 20:] = 255
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return {"image": buf.getvalue(), "index": index, "image_id": "x", "file_name": "",
          "captions": ["white on the right , dark on the left"] * 5,
          "dense_caption": "the white half is on the right"}


def test_flip_on_device_exactly_when_caption_swapped(tok):
  pp = pipeline.Preprocess(image_size=8, crop_scale=(0.6, 1.0), hflip=0.5, max_len=12,
                           dense_max_len=12, text_aug_prob=0.0, device_augment=True,
                           canvas_size=48)
  cap = _record()["captions"][0]
  flips = []
  for seed in range(30):
    ex = pipeline.train_example(_record(), np.random.default_rng(seed), pp, tok)
    img = _levels(ex["image"][None], ex["crop_box"][None], ex["image_wh"][None],
                  ex["flip"][None], 8)[0]
    swapped = ex["input_ids"].tolist() != tok.encode(cap, 12)[0].tolist()
    assert bool(ex["flip"]) == swapped
    if ex["crop_box"][0] < 20 < ex["crop_box"][0] + ex["crop_box"][2]:  # both halves in view
      assert (img[:, -1].mean() > img[:, 0].mean()) == (not swapped)
    flips.append(swapped)
  assert 5 < sum(flips) < 25


def test_crop_boxes_follow_random_resized_crop(tok):
  """Area fraction within crop_scale and aspect within (3/4, 4/3) up to rounding; and the box
  is the one the host path draws (same generator calls: the next draw agrees too)."""
  data = _jpeg(_photo())
  pp = pipeline.Preprocess(crop_scale=(0.3, 0.9), device_augment=True)
  areas = []
  for seed in range(200):
    rng = np.random.default_rng(seed)
    fields, _ = pipeline.transforms.train_image_fields(data, rng, pp, "x")
    x0, y0, w, h = fields["crop_box"].tolist()
    assert 0 <= x0 and x0 + w <= 500 and 0 <= y0 and y0 + h <= 375
    assert tuple(fields["image_wh"]) == (500, 375)
    frac = w * h / (500 * 375)
    areas.append(frac)
    assert 0.3 - 0.01 <= frac <= 0.9 + 0.01
    assert 0.75 - 0.02 <= w / h <= 4 / 3 + 0.02
    ref = np.random.default_rng(seed)
    assert pipeline.random_resized_crop_box(ref, 500, 375, (0.3, 0.9)) == (x0, y0, w, h)
    flip = ref.random() < pp.hflip
    assert bool(fields["flip"]) == flip and rng.random() == ref.random()
  # The whole range is drawn (large areas with extreme aspects are redrawn: mean below 0.6).
  assert min(areas) < 0.35 and max(areas) > 0.85 and 0.5 < np.mean(areas) < 0.62


@pytest.mark.parametrize("size", [(640, 480), (1100, 800)])
def test_images_larger_than_the_canvas(size):
  """COCO-sized (one bicubic fit) and >= 2x the canvas (DCT draft first): the canvas holds the
  image with its longer side = C, the box is scaled, and the output stays close to PIL's crop
  of the full-resolution image (resampled twice: a small blur, measured ~1-2 levels mean)."""
  w, h = size
  img = _photo(w, h, seed=3)
  data = _jpeg(img, quality=95)
  c = 512
  box = (w // 5, h // 6, w // 2, h // 2)
  fields = canvas.canvas_fields(data, "x", c, lambda *_: box, lambda: False)
  cw, ch = fields["image_wh"].tolist()
  assert max(cw, ch) == c and abs(cw / ch - w / h) < 0.01
  assert not fields["image"][ch:].any() and not fields["image"][:, cw:].any()
  x0, y0, bw, bh = fields["crop_box"].tolist()
  s = c / w
  assert abs(x0 - box[0] * s) <= 0.5 and abs(x0 + bw - (box[0] + box[2]) * s) <= 0.5
  got = _levels(fields["image"][None], fields["crop_box"][None], fields["image_wh"][None],
                [False], 224)[0]
  full = canvas.decode_image(data, "x")
  ref = np.asarray(full.resize((224, 224), Image.BICUBIC,
                               box=(box[0], box[1], box[0] + box[2], box[1] + box[3])), np.float32)
  d = np.abs(got - ref)
  assert d.mean() < 4.0, d.mean()


def _loader(data, tok, pp, **kw):
  args = dict(global_batch_size=8, seed=5, process_index=0, process_count=1)
  args.update(kw)
  return pipeline.TrainLoader(pipeline.open_split(data, "train"), tok, pp, **args)


@pytest.mark.parametrize("crop_scale,hflip", [((0.6, 1.0), 0.5), ((1.0, 1.0), 0.0)])
def test_train_and_eval_batches_on_vs_off(data, tok, crop_scale, hflip):
  kw = dict(image_size=16, max_len=12, dense_max_len=40, crop_scale=crop_scale, hflip=hflip)
  host = pipeline.Preprocess(**kw)
  dev = pipeline.Preprocess(**kw, device_augment=True, canvas_size=32)
  a, b = _loader(data, tok, host), _loader(data, tok, dev)
  opts = dict(image_size=16, mean=host.mean, std=host.std)
  for _ in range(3):
    want, got = next(a), next(b)
    assert got["image"].dtype == np.uint8 and got["image"].shape == (8, 32, 32, 3)
    image = np.asarray(device_augment.images_from_batch(got, opts)["image"])
    assert np.abs(image - want["image"]).max() <= ONE_LEVEL + 1e-5
    assert np.abs(image - want["image"]).mean() < 0.01 * ONE_LEVEL
    for k in want:  # the same generator stream: captions, order, text augmentation
      if k != "image":
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  src = pipeline.open_split(data, "test")
  ev = dict(global_batch_size=4, process_index=0, process_count=1)
  for want, got in zip(pipeline.eval_image_batches(src, tok, host, **ev),
                       pipeline.eval_image_batches(src, tok, dev, **ev)):
    image = np.asarray(device_augment.images_from_batch(got, opts)["image"])
    assert np.isfinite(image).all()  # padding rows included (dropped by the evaluator)
    valid = want["valid"]
    assert np.abs(image[valid] - want["image"][valid]).max() <= ONE_LEVEL + 1e-5
    np.testing.assert_array_equal(got["image_index"], want["image_index"])


def test_resume_with_device_augment(data, tok):
  pp = pipeline.Preprocess(image_size=16, max_len=12, dense_max_len=40, device_augment=True,
                           canvas_size=32)
  ref = _loader(data, tok, pp)
  batches = [next(ref) for _ in range(4)]
  resumed = _loader(data, tok, pp, start_step=2, num_workers=1)
  try:
    for want in batches[2:]:
      got = next(resumed)
      assert sorted(got) == sorted(want)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  finally:
    resumed.close()


def test_dense_captions_only_for_models_that_read_them(data, tok):
  grm, seps = (models.build_model(tiny.tiny_config(n).model) for n in ("grm", "seps"))
  assert not grm.tokenizes_dense and not grm.uses_dense
  assert seps.tokenizes_dense and seps.uses_dense
  assert seps.sparse_only().tokenizes_dense and not seps.sparse_only().uses_dense  # LAPS-like
  pp = pipeline.Preprocess(image_size=16, max_len=12, dense_max_len=40, dense=False)
  b = next(_loader(data, tok, pp))
  assert "dense_ids" not in b and "dense_mask" not in b
  full = next(_loader(data, tok, pipeline.Preprocess(image_size=16, max_len=12,
                                                     dense_max_len=40)))
  for k in b:  # skipping the dense tokenisation leaves the random stream as it was
    np.testing.assert_array_equal(b[k], full[k])


def test_demo_setting_is_the_identity(data, tok):
  """The demo's setting (crop_scale (1, 1), hflip 0, canvas = image size = generated size): the
  device images equal the host path's to float rounding, so its numbers do not change."""
  kw = dict(image_size=32, max_len=12, dense_max_len=40, crop_scale=(1.0, 1.0), hflip=0.0)
  host = pipeline.Preprocess(**kw)
  dev = pipeline.Preprocess(**kw, device_augment=True, canvas_size=32)
  want, got = next(_loader(data, tok, host)), next(_loader(data, tok, dev))
  image = device_augment.images_from_batch(got, dict(image_size=32, mean=host.mean,
                                                     std=host.std))["image"]
  np.testing.assert_allclose(np.asarray(image), want["image"], atol=1e-5, rtol=0)
