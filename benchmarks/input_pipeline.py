"""The training input pipeline at 224 px, host path against device augmentation, in one run.

  python benchmarks/input_pipeline.py [--num_images=96 --batch=32 --steps=8 --canvas=512]

Paths (same records, same seed, same generator stream):
  today    the path before issue 21 (the baseline of its ratios): records through tfds's own
           data source (its generic feature parser), data.device_augment = False: PIL decode,
           RandomResizedCrop as a PIL bicubic box resize, flip, float32 normalise, caption
           tokenisation + text augmentation, dense caption tokenisation.
  host     data.device_augment = False as shipped now (records through `sources.LeanSource`,
           dense tokens from the split's token cache, data/token_cache.py).
  device   data.device_augment = True (the default): records through `LeanSource`, decode
           (simplejpeg) into a uint8 canvas + crop box + flip, the caption work, dense tokens
           from the token cache (built once per split before the timing; its one-time cost is
           printed); crop/resize/flip/normalise run later in the jitted step
           (data/device_augment.py), measured separately below.
  device, no dense   as `device`, no dense captions (GRM's batches).

Reported: host images per CPU-second in this process (process_time: the per-core rate,
independent of other load; the median of `--reps` repetitions, the paths interleaved within
each repetition), wall images/s with 0, 1, 2 grain workers, bytes per example shipped,
the per-stage host profile (ms per image), and the DEVICE augmentation's own cost: ms per batch
of the jitted function here (on this machine's CPU) and XLA's FLOPs / bytes for it (cost
analysis), from which its time on an accelerator can be estimated.

Stand-in data: Flickr30K-sized JPEGs (500x375, smooth content + noise, ~60-100 KB like photos) and
real Flickr30K captions/dense captions when ../shared/data/f30k exists, in the Karpathy folder
format, built with the real `flickr30k_karpathy` builder into a temporary tfds dir.
"""

import argparse
import dataclasses
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from gseps_jax.data import (canvas, device_augment, pipeline, prepare, token_cache, tokenizer,
                            transforms)

SHARED_F30K = Path(__file__).resolve().parents[2] / "shared/data/f30k"
SIZE = 224


def _photo_like(rng, w=500, h=375) -> bytes:
  base = rng.uniform(0, 255, (h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
  img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.int16)
  img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(img).save(out, format="JPEG", quality=90)
  return out.getvalue()


def make_dataset(root: Path, n: int) -> dict:
  manual, images = root / "caps", root / "images"
  manual.mkdir()
  images.mkdir()
  rng = np.random.default_rng(0)
  if (SHARED_F30K / "test_caps.txt").is_file():
    caps = (SHARED_F30K / "test_caps.txt").read_text().splitlines()[:5 * n]
    dense = (SHARED_F30K / "f30k_test.jsonl").read_text().splitlines()[:n]
  else:
    caps = [f"a person number {i} is walking a dog in the park ." for i in range(5 * n)]
    dense = [json.dumps({"text": "a long description " * 20})] * n
  ids = [str(i // 5) for i in range(5 * n)]
  for i in range(n):
    (images / f"{i}.jpg").write_bytes(_photo_like(rng))
  for split in ("train", "dev", "test"):
    (manual / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    (manual / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")
  (manual / "f30k_train.jsonl").write_text("\n".join(dense) + "\n")
  (manual / "id_mapping.json").write_text(json.dumps({str(i): f"{i}.jpg" for i in range(n)}))
  cfg = {"name": "flickr30k_karpathy", "data_dir": str(root / "tfds"), "manual_dir": str(manual),
         "image_dir": str(images)}
  prepare.prepare(cfg, verbose=False)
  return cfg


def measure(cfg, tok, pp, *, workers: int, batch: int, steps: int, lean: bool = True,
            dense_tokens=None) -> dict:
  """Wall images/s, images per CPU-second of this process (in-process only, where it is the
  per-core rate independent of other load) and bytes per example of the batches. `lean=False`
  reads the records through tfds's own data source (today's path)."""
  source = pipeline.open_split(cfg, "train")
  if not lean:
    source = source.tfds_source
  loader = pipeline.TrainLoader(source, tok, pp,
                                global_batch_size=batch, seed=0, process_index=0,
                                process_count=1, num_workers=workers, prefetch=2 * workers,
                                dense_tokens=dense_tokens if pp.dense else None)
  try:
    next(loader)  # worker start-up and first batch are not throughput
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
      b = next(loader)
    dt, dc = time.perf_counter() - t, time.process_time() - c
  finally:
    loader.close()
  want = (pp.canvas_size,) * 2 if pp.device_augment else (pp.image_size,) * 2
  assert b["image"].shape == (batch,) + want + (3,)
  return {"wall": steps * batch / dt,
          "per_cpu": steps * batch / dc if workers == 0 else float("nan"),
          "bytes": sum(v.nbytes for v in b.values()) / batch}


def _ms(fn, items) -> float:
  """process_time ms per item of `fn(item)`."""
  c = time.process_time()
  for x in items:
    fn(x)
  return 1e3 * (time.process_time() - c) / len(items)


def stage_profile(cfg, tok, pp, n: int, tokens) -> dict:
  """ms per image of each host stage, on the first `n` training records."""
  src = pipeline.open_split(cfg, "train")
  idx = list(range(min(n, len(src))))
  recs = [src[i] for i in idx]
  jpegs = [r["image"] for r in recs]
  imgs = [canvas.decode_image(d, "x") for d in jpegs]
  boxes = [transforms.random_resized_crop_box(np.random.default_rng(i), im.width, im.height,
                                              pp.crop_scale) for i, im in enumerate(imgs)]
  resized = [np.asarray(im.resize((SIZE, SIZE), Image.BICUBIC, box=(x, y, x + w, y + h)))
             for im, (x, y, w, h) in zip(imgs, boxes)]

  def draft_half(d):
    im = Image.open(io.BytesIO(d))
    im.draft("RGB", (im.width // 2, im.height // 2))
    im.load()

  def paste(im):
    cv = np.zeros((pp.canvas_size, pp.canvas_size, 3), np.uint8)
    cv[:im.height, :im.width] = np.asarray(im)

  caps = [pipeline.sources.as_text(r["captions"][0]) for r in recs]
  dense = [pipeline.sources.as_text(r["dense_caption"]) for r in recs]
  rng = np.random.default_rng(0)
  return {
      "record read + parse, tfds data source (today)": _ms(
          lambda i: src.tfds_source[i], idx),
      "record read + parse, LeanSource": _ms(lambda i: src[i], idx),
      "decode (full resolution, PIL; today, host path)": _ms(
          lambda d: canvas.decode_image(d, "x"), jpegs),
      "decode into the canvas (simplejpeg; device path)": _ms(
          lambda d: canvas.decode_to_canvas(d, "x", pp.canvas_size), jpegs),
      "decode with draft 1/2 (reference)": _ms(draft_half, jpegs),
      "crop + bicubic resize (PIL, host path)": _ms(
          lambda a: a[0].resize((SIZE, SIZE), Image.BICUBIC,
                                box=(a[1][0], a[1][1], a[1][0] + a[1][2], a[1][1] + a[1][3])),
          list(zip(imgs, boxes))),
      "flip + float32 normalise (host path)": _ms(
          lambda a: transforms.normalize(a[:, ::-1], pp.mean, pp.std), resized),
      "zeroed canvas + paste (part of the line above)": _ms(paste, imgs),
      "caption tokenise + text augmentation": _ms(
          lambda t: tok.encode(t, pp.max_len, rng=rng, aug_prob=pp.text_aug_prob), caps),
      "dense caption tokenise (today)": _ms(lambda t: tok.encode(t, pp.dense_max_len), dense),
      "dense tokens from the token cache (per image, batches of 32)": _ms(
          lambda i: tokens.lookup(np.arange(i, i + 32) % len(idx), np.zeros(32, bool)),
          idx[::32]) / 32,
  }


def device_cost(batch: int, canvas_size: int) -> dict:
  """The jitted device augmentation on this machine's default backend: ms per batch, and XLA's
  cost analysis (FLOPs, bytes accessed) of one batch."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  args = (rng.integers(0, 256, (batch, canvas_size, canvas_size, 3), dtype=np.uint8),
          np.tile(np.asarray([[50, 40, 300, 250]], np.int32), (batch, 1)),
          np.tile(np.asarray([[500, 375]], np.int32), (batch, 1)), rng.random(batch) < 0.5)
  opts = dict(image_size=SIZE, mean=pipeline.Preprocess.mean, std=pipeline.Preprocess.std)
  fn = jax.jit(lambda *a: device_augment.augment(*a, **opts))
  compiled = fn.lower(*args).compile()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  fn(*args).block_until_ready()
  reps = 3
  t = time.perf_counter()
  for _ in range(reps):
    fn(*args).block_until_ready()
  return {"ms_per_batch": 1e3 * (time.perf_counter() - t) / reps,
          "flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0)),
          "backend": jax.default_backend()}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--num_images", type=int, default=96)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=24)
  p.add_argument("--canvas", type=int, default=512)
  p.add_argument("--workers", type=str, default="0,1,2")
  p.add_argument("--reps", type=int, default=5, help="in-process repetitions (median)")
  a = p.parse_args()
  tok = tokenizer.load_tokenizer(tokenizer.installed_minilm_dir())
  host = pipeline.Preprocess(image_size=SIZE)
  device = dataclasses.replace(host, device_augment=True, canvas_size=a.canvas)
  paths = {"today (tfds records, host augmentation)": (host, False),
           "host (device_augment off)": (host, True),
           "device": (device, True),
           "device, no dense (GRM)": (dataclasses.replace(device, dense=False), True)}
  workers = [int(w) for w in a.workers.split(",")]
  with tempfile.TemporaryDirectory() as d:
    cfg = make_dataset(Path(d), a.num_images)
    c = time.process_time()
    tokens = token_cache.for_split(ConfigDict(dict(cfg, text_cache_dir=str(Path(d) / "tok"))),
                                   pipeline.open_split(cfg, "train"), "train", tok=tok,
                                   max_len=host.dense_max_len, flips=host.hflip > 0)
    print(f"dense token cache (once per split, not in the rates below): "
          f"{1e3 * (time.process_time() - c) / a.num_images:.2f} CPU-ms per image")
    print("| path | workers | images/s (wall) | host images per CPU-second | bytes/example |")
    print("|---|---|---|---|---|")
    per_cpu = {name: [] for name in paths}
    if 0 in workers:
      for _ in range(a.reps):  # interleaved: each repetition runs every path once
        for name, (pp, lean) in paths.items():
          m = measure(cfg, tok, pp, workers=0, batch=a.batch, steps=a.steps, lean=lean,
                      dense_tokens=tokens if lean else None)
          per_cpu[name].append(m)
      for name, ms in per_cpu.items():
        rate = float(np.median([m["per_cpu"] for m in ms]))
        wall = float(np.median([m["wall"] for m in ms]))
        each = ", ".join(f"{m['per_cpu']:.0f}" for m in ms)
        print(f"| {name} | 0 (in-process) | {wall:.0f} | {rate:.0f} ({each}) | "
              f"{ms[0]['bytes']:,.0f} |", flush=True)
    for name, (pp, lean) in paths.items():
      for w in (w for w in workers if w > 0):
        m = measure(cfg, tok, pp, workers=w, batch=a.batch, steps=a.steps, lean=lean,
                    dense_tokens=tokens if lean else None)
        print(f"| {name} | {w} | {m['wall']:.0f} | - | {m['bytes']:,.0f} |", flush=True)
    if 0 in workers:
      rates = {n: float(np.median([m["per_cpu"] for m in ms])) for n, ms in per_cpu.items()}
      old = rates["today (tfds records, host augmentation)"]
      for name in list(paths)[1:]:
        print(f"ratio new/today of host images per CPU-second, {name}: {rates[name] / old:.2f}x")
    print("\nHost stages, ms per image (process_time):")
    for stage, ms in stage_profile(cfg, tok, device, a.num_images, tokens).items():
      print(f"  {stage:60s} {ms:6.2f}")
  dc = device_cost(a.batch, a.canvas)
  print(f"\nDevice augmentation (jitted, on this machine's {dc['backend']}, NOT host work): "
        f"{dc['ms_per_batch']:.1f} ms per batch of {a.batch} "
        f"({dc['ms_per_batch'] / a.batch:.2f} ms/image); XLA cost analysis per batch: "
        f"{dc['flops'] / 1e9:.2f} GFLOP, {dc['bytes'] / 1e6:.0f} MB accessed")


if __name__ == "__main__":
  main()
