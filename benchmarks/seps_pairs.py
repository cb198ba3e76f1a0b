"""All-pairs SEPS scoring throughput: our tiled JAX scorer vs the official shard loop.

Default sizes are the Flickr30K test set at ViT-B/16-224: 1,000 images x 5,000 captions, 197
image tokens, 32-token captions, 90-token dense captions, D = 512, N_c = 39, parity mode (the
official pairing). `--scale s` shrinks both counts by s (this CPU has 2 shared cores).

The baseline re-implements the official evaluation in PyTorch (float32, CPU, no_grad): a Python
loop over 256 x 256 shards; in each shard a Python loop over captions, each running sort-based
selection, gather, fused token, aggregation and HRPA for all images of the shard at once (the
structure of `shard_attn_scores` + `CrossSparseAggrNet_v2.forward`). Both are run once after a
warm-up on a small slice; the two score matrices are compared.

  python benchmarks/seps_pairs.py --scale 0.05
"""

import argparse
import math
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F

from gseps_jax.interop import official_seps
from gseps_jax.models import sdtps
from gseps_jax.models import seps


def torch_aggr_params(aggr_net) -> dict:
  """Our `AggregationNet` params -> the official `TokenAggregation` state dict as torch tensors."""
  return {k: torch.tensor(v) for k, v in official_seps.aggr_net_to_official(aggr_net).items()}


def official_loop(img, cap, cap_len, den, den_len, p, rho, shard=256):
  """Official-structured scorer. img [Ni, L, D], cap/den caption-aligned; p = the official
  `TokenAggregation` state dict (`torch_aggr_params`)."""
  def aggr(x):
    h = F.layer_norm(x, x.shape[-1:], p["weight.0.weight"], p["weight.0.bias"], 1e-5)
    return F.linear(F.gelu(F.linear(h, p["weight.1.weight"], p["weight.1.bias"])),
                    p["weight.3.weight"], p["weight.3.bias"])

  def branch(im, txt, n_word):
    x = im[:, 1:]
    xn = F.normalize(x, dim=-1)
    self_attn = (F.normalize(x.mean(1, keepdim=True), dim=-1) * xn).sum(-1)
    t = txt[:n_word]
    score = self_attn + (F.normalize(t.mean(0, keepdim=True)[None], dim=-1) * xn).sum(-1)
    k = math.ceil(x.shape[1] * rho)
    s_sort, idx = torch.sort(score, dim=1, descending=True)
    d = x.shape[-1]
    keep = torch.gather(x, 1, idx[:, :k, None].expand(-1, -1, d))
    drop = torch.gather(x, 1, idx[:, k:, None].expand(-1, -1, d))
    fused = (drop * F.softmax(s_sort[:, k:], 1)[..., None]).sum(1, keepdim=True)
    w = F.softmax(aggr(keep).transpose(2, 1) * p["scale"], dim=2)
    tok = F.normalize(torch.cat([im[:, :1], torch.bmm(w, keep), fused], 1), dim=-1)
    a = F.leaky_relu(torch.bmm(F.normalize(t, dim=-1)[None].expand(len(im), -1, -1),
                               tok.transpose(1, 2)), 0.1)
    return a.max(2)[0].mean(1) + a.max(1)[0].mean(1)

  out = torch.zeros(len(img), len(cap))
  with torch.no_grad():
    for i0 in range(0, len(img), shard):
      for j0 in range(0, len(cap), shard):
        im = img[i0:i0 + shard]
        for j in range(j0, min(j0 + shard, len(cap))):
          out[i0:i0 + shard, j] = (branch(im, cap[j], int(cap_len[j]))
                                   + branch(im, den[j], int(den_len[j])))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--scale", type=float, default=1.0)
  ap.add_argument("--chunk", type=int, nargs=2, default=(16, 64), help="our pair tile")
  ap.add_argument("--skip_baseline", action="store_true")
  a = ap.parse_args()
  ni, nc = max(1, round(1000 * a.scale)), max(1, round(5000 * a.scale))
  lv, lt, ld, d, rho, alpha = 197, 32, 90, 512, 0.5, 0.4
  n_c = sdtps.num_aggregated(196, alpha, rho)
  print(f"sizes: {ni} images x {nc} captions = {ni * nc:,} pairs; tokens image {lv}, caption "
        f"{lt}, dense {ld}; D {d}; N_c {n_c}; our tile {tuple(a.chunk)}; "
        f"device {jax.devices()[0].platform}")
  rng = np.random.default_rng(0)
  img = rng.normal(size=(ni, lv, d)).astype(np.float32)
  cap = rng.normal(size=(nc, lt, d)).astype(np.float32)
  den = rng.normal(size=(nc, ld, d)).astype(np.float32)
  cl = rng.integers(8, lt + 1, size=nc)
  dl = rng.integers(40, ld + 1, size=nc)
  head = seps.SEPSHead(num_aggregated=n_c, rho=rho, dense_mode="parity")
  cm, dm = np.arange(lt) < cl[:, None], np.arange(ld) < dl[:, None]
  params = head.init(jax.random.key(0), img[:2], cap[:2], cm[:2], den[:2], dm[:2])
  fn = jax.jit(lambda *x: head.apply(params, *x, chunk=tuple(a.chunk)))
  fn(img, cap, cm, den, dm).block_until_ready()  # compile
  t = time.perf_counter()
  ours = np.asarray(fn(img, cap, cm, den, dm).block_until_ready())
  t_ours = time.perf_counter() - t
  print(f"ours (jit, lax.map tiles): {t_ours:.2f} s, {ni * nc / t_ours:,.0f} pairs/s")
  if a.skip_baseline:
    return
  tp = torch_aggr_params(params["params"]["aggr_net"])
  args = [torch.tensor(img), torch.tensor(cap), cl, torch.tensor(den), dl]
  official_loop(args[0][:2], args[1][:2], cl[:2], args[3][:2], dl[:2], tp, rho)  # warm-up
  t = time.perf_counter()
  base = official_loop(*args, tp, rho).numpy()
  t_base = time.perf_counter() - t
  print(f"official shard loop (torch): {t_base:.2f} s, {ni * nc / t_base:,.0f} pairs/s")
  print(f"speed-up {t_base / t_ours:.1f}x; max |ours - official| = "
        f"{np.abs(ours - base).max():.2e}")


if __name__ == "__main__":
  main()
