"""Images/s of the training input pipeline at 224 px (decode, RandomResizedCrop + flip, normalise,
tokenise + text augmentation, dense caption), in-process and with 1 and 2 worker processes.

  python benchmarks/input_pipeline.py [--num_images=96 --batch=32 --steps=8]

Stand-in data: Flickr30K-sized JPEGs (500x375, smooth content + noise, ~60-100 KB like photos) and
real Flickr30K captions/dense captions when ../shared/data/f30k exists, in the Karpathy folder
format, built with the real `flickr30k_karpathy` builder into a temporary tfds dir.
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from gseps_jax.data import pipeline, prepare, tokenizer

SHARED_F30K = Path(__file__).resolve().parents[2] / "shared/data/f30k"


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


def measure(cfg, tok, *, workers: int, batch: int, steps: int) -> tuple[float, float]:
  """(wall-clock images/s, images per CPU-second of this process; the latter only in-process,
  where it is the per-core rate independent of other load on the machine)."""
  pp = pipeline.Preprocess(image_size=224)
  loader = pipeline.TrainLoader(pipeline.open_split(cfg, "train"), tok, pp,
                                global_batch_size=batch, seed=0, process_index=0,
                                process_count=1, num_workers=workers, prefetch=2 * workers)
  try:
    next(loader)  # worker start-up and first batch are not throughput
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
      b = next(loader)
    dt, dc = time.perf_counter() - t, time.process_time() - c
  finally:
    loader.close()
  assert b["image"].shape == (batch, 224, 224, 3)
  return steps * batch / dt, (steps * batch / dc if workers == 0 else float("nan"))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--num_images", type=int, default=96)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=8)
  a = p.parse_args()
  tok = tokenizer.load_tokenizer(tokenizer.installed_minilm_dir())
  with tempfile.TemporaryDirectory() as d:
    cfg = make_dataset(Path(d), a.num_images)
    print("| workers | images/s (wall) | images per CPU-second |")
    print("|---|---|---|")
    for workers in (0, 1, 2):
      ips, per_cpu = measure(cfg, tok, workers=workers, batch=a.batch, steps=a.steps)
      print(f"| {workers if workers else '0 (in-process)'} | {ips:.0f} | {per_cpu:.0f} |",
            flush=True)


if __name__ == "__main__":
  main()
