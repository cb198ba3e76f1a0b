"""COCO-5K-sized all-pairs scoring for GRM and SEPS: measured at a reduced size against a
straightforward implementation in the same run, and floored at full size from XLA's own cost
analysis.

Run:  python benchmarks/eval_coco5k.py                      # 200 images x 1,000 captions here
      python benchmarks/eval_coco5k.py --images=5000 --captions=25000   # on an accelerator

Shapes are ViT-B/16-224 token counts: 197 image tokens, 32-token captions, 90-token dense
captions (SEPS, parity: one per caption), D = 512, random features.
- GRM: the eval score 0.4 s_ori + 0.4 s_key + 0.2 s_unc (5 region tokens) computed as
  `GRM.level_scores` does (ori and key share one cosine block, `token_similarity_multi`; 8
  token-length buckets, `--buckets`) vs the obvious jnp implementation (full [Ni, Nc, Lx, Ly]
  cosine block, then reductions; run on tiles of 50 images so it fits in memory).
- SEPS: our tiled scorer vs the official evaluation's structure (256 x 256 shards, one caption at
  a time against a shard of images; PyTorch, `benchmarks/seps_pairs.official_loop`).
The full-size floor (5,000 x 25,000) is FLOPs / peak and bytes / bandwidth from
`benchmarks/roofline.py` (H100: 989 TFLOP/s bf16, 3.35 TB/s; TPU v5p: 459 TFLOP/s, 2.76 TB/s).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import roofline  # pylint: disable=g-import-not-at-top,wrong-import-position
import seps_pairs  # pylint: disable=g-import-not-at-top,wrong-import-position
import similarity as sim_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from gseps_jax.models import sdtps  # pylint: disable=g-import-not-at-top,wrong-import-position
from gseps_jax.models import seps  # pylint: disable=g-import-not-at-top,wrong-import-position
from gseps_jax.models.similarity import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    token_similarity, token_similarity_multi)

LV, LT, LD, D, K = 197, 32, 90, 512, 5


def _time(fn, *args, reps=1):
  jax.block_until_ready(fn(*args))  # compile / warm up
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts)), np.asarray(out)


def grm(ni, nc, rng, chunk, buckets=16):
  v = jnp.asarray(rng.normal(size=(ni, LV, D)), jnp.float32)
  vm = jnp.ones((ni, LV), bool)
  km = jnp.asarray(rng.random((ni, LV)) < 0.6).at[:, 0].set(True)
  u = jnp.asarray(rng.normal(size=(ni, K, D)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(nc, LT, D)), jnp.float32)
  lens = rng.integers(8, LT + 1, size=nc)
  tm = jnp.asarray(np.arange(LT) < lens[:, None])
  tk = tm & jnp.asarray(rng.random((nc, LT)) < 0.6).at[:, 0].set(True)
  um = jnp.ones((ni, K), bool)

  @jax.jit
  def ours(v, vm, km, u, t, tm, tk):
    kw = dict(chunk=chunk, buckets=(1, buckets))  # as GRM: captions only (the image side is full)
    ori, key = token_similarity_multi(v, (vm, km), t, (tm, tk), **kw)
    return 0.4 * ori + 0.4 * key + 0.2 * token_similarity(u, um, t, tk, **kw)

  @jax.jit
  def naive(v, vm, km, u, t, tm, tk):
    rows = []
    for i in range(0, ni, 50):  # whole [50, Nc, 197, 32] blocks: what fits in memory
      s = slice(i, i + 50)
      rows.append(0.4 * sim_bench.naive_similarity(v[s], vm[s], t, tm)
                  + 0.4 * sim_bench.naive_similarity(v[s], km[s], t, tk)
                  + 0.2 * sim_bench.naive_similarity(u[s], um[s], t, tk))
    return jnp.concatenate(rows)

  args = (v, vm, km, u, t, tm, tk)
  t_ours, a = _time(ours, *args)
  t_naive, b = _time(naive, *args)
  return t_ours, t_naive, float(np.abs(a - b).max())


def seps_scores(ni, nc, rng, chunk):
  img = rng.normal(size=(ni, LV, D)).astype(np.float32)
  cap = rng.normal(size=(nc, LT, D)).astype(np.float32)
  den = rng.normal(size=(nc, LD, D)).astype(np.float32)
  cl, dl = rng.integers(8, LT + 1, size=nc), rng.integers(40, LD + 1, size=nc)
  cm, dm = np.arange(LT) < cl[:, None], np.arange(LD) < dl[:, None]
  head = seps.SEPSHead(num_aggregated=sdtps.num_aggregated(196, 0.4, 0.5), rho=0.5,
                       dense_mode="parity")
  params = head.init(jax.random.key(0), img[:2], cap[:2], cm[:2], den[:2], dm[:2])
  fn = jax.jit(lambda *x: head.apply(params, *x, chunk=chunk))
  t_ours, ours = _time(fn, img, cap, cm, den, dm)
  tp = seps_pairs.torch_aggr_params(params["params"]["aggr_net"])
  t = time.perf_counter()
  base = seps_pairs.official_loop(torch.tensor(img), torch.tensor(cap), cl, torch.tensor(den), dl,
                                  tp, 0.5).numpy()
  t_base = time.perf_counter() - t
  return t_ours, t_base, float(np.abs(ours - base).max())


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=200)
  p.add_argument("--captions", type=int, default=1000)
  p.add_argument("--seps_images", type=int, default=40, help="SEPS is ~20x heavier per pair")
  p.add_argument("--seps_captions", type=int, default=200)
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
  p.add_argument("--buckets", type=int, default=16, help="GRM kernel caption token-length "
                 "buckets (config model.grm.eval_buckets); 1 = off")
  a = p.parse_args()
  if a.threads:
    torch.set_num_threads(a.threads)
  rng = np.random.default_rng(0)
  print(f"device {jax.devices()[0].device_kind}; torch threads {torch.get_num_threads()}")
  t_o, t_n, err = grm(a.images, a.captions, rng, chunk=(50, 250), buckets=a.buckets)
  pairs = a.images * a.captions
  print(f"GRM  {a.images} x {a.captions} (buckets {a.buckets}): ours {t_o:.2f} s "
        f"({pairs / t_o:,.0f} pairs/s), naive jnp {t_n:.2f} s ({pairs / t_n:,.0f} pairs/s); ratio {t_n / t_o:.2f}x; "
        f"max diff {err:.1e}")
  t_o, t_b, err = seps_scores(a.seps_images, a.seps_captions, rng, chunk=(20, 100))
  pairs = a.seps_images * a.seps_captions
  print(f"SEPS {a.seps_images} x {a.seps_captions}: ours {t_o:.2f} s ({pairs / t_o:,.0f} pairs/s)"
        f", official shard loop {t_b:.2f} s ({pairs / t_b:,.0f} pairs/s); ratio {t_b / t_o:.2f}x;"
        f" max diff {err:.1e}")
  print("\nFull COCO-5K (5,000 x 25,000), lowered only (XLA cost analysis):")
  for name, c in (("GRM", roofline.grm_scoring_cost(5000, 25000)),
                  ("SEPS", roofline.seps_scoring_cost(5000, 25000))):
    f = roofline.floors(c["flops"], c["bytes"])
    print(f"{name:5s} {c['flops'] / 1e15:.2f} PFLOP, {c['bytes'] / 1e12:.1f} TB -> "
          + "; ".join(f"{chip}: compute(bf16) {v['compute_bf16_s']:.2f} s, memory "
                      f"{v['memory_s']:.2f} s, floor {v['floor_bf16_s']:.2f} s"
                      for chip, v in f.items()))


if __name__ == "__main__":
  main()
