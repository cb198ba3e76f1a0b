"""Benchmark of the token-similarity kernel: tiled `token_similarity` vs the obvious jnp version vs
NumPy, on the GRM eval workload (1,000 images x 5,000 captions, 197 x 32 tokens, D = 512).

Run:  python benchmarks/similarity.py --scale 0.05          # CPU: 50 images x 250 captions
      python benchmarks/similarity.py                       # full size (accelerator)

* ours:  `token_similarity(..., chunk=C)` (jit; `lax.map` over C x C tiles of the pair grid).
* naive: one einsum to `[Ni, Nc, Lx, Ly]`, then the masked max / mean. Its memory grows with all
  pairs (126 GB fp32 at full size), so it runs on the largest image subset whose block fits
  `--naive_max_gb`, and its throughput is per pair on that subset.
Both jnp versions are also compiled (never run) at the full 1,000 x 5,000 size to report XLA's
memory for it: XLA compiles shapes that this machine could never run.
* numpy: per image, one BLAS matmul against all caption tokens, then the reductions (float32),
  on `--numpy_images` images.
All three are checked against each other on the common subset. Peak memory = XLA's compiled
`memory_analysis()` (temp + arguments + output).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from gseps_jax.models.similarity import l2_normalize, token_similarity


def naive_similarity(x, xm, y, ym):
  """The obvious implementation: all-pairs cosine block, then masked reductions. `[Ni, Nc]`."""
  s = jnp.einsum("ild,jmd->ijlm", l2_normalize(x), l2_normalize(y))  # [Ni, Nc, Lx, Ly]
  x2y = jnp.max(jnp.where(ym[None, :, None, :], s, -jnp.inf), axis=3)  # [Ni, Nc, Lx]
  x2y = jnp.sum(jnp.where(xm[:, None, :], x2y, 0), -1) / jnp.sum(xm, -1)[:, None]
  y2x = jnp.max(jnp.where(xm[:, None, :, None], s, -jnp.inf), axis=2)  # [Ni, Nc, Ly]
  y2x = jnp.sum(jnp.where(ym[None, :, :], y2x, 0), -1) / jnp.sum(ym, -1)[None, :]
  return 0.5 * (x2y + y2x)


def numpy_similarity(x, xm, y, ym):
  """float32 NumPy: per image one matmul against every caption token, then reductions."""
  xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
  yn = y / np.linalg.norm(y, axis=-1, keepdims=True)
  nc, ly, d = y.shape
  yflat = yn.reshape(nc * ly, d)
  out = np.empty((len(x), nc), np.float32)
  ycount = ym.sum(-1)
  for i in range(len(x)):
    s = (xn[i][xm[i]] @ yflat.T).reshape(-1, nc, ly)  # [lx_i, Nc, Ly]
    x2y = np.where(ym[None], s, -np.inf).max(-1).mean(0)  # [Nc]
    y2x = (s.max(0) * ym).sum(-1) / ycount
    out[i] = 0.5 * (x2y + y2x)
  return out


def timed(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  t = time.perf_counter()
  for _ in range(repeats):
    out = jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t) / repeats, out


def compiled_stats(fn, *args):
  c = jax.jit(fn).lower(*args).compile()
  m = c.memory_analysis()
  peak = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
  return {"peak_bytes": int(peak), "temp_bytes": int(m.temp_size_in_bytes)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--scale", type=float, default=1.0, help="multiplies 1,000 images / 5,000 caps")
  p.add_argument("--lx", type=int, default=197)
  p.add_argument("--ly", type=int, default=32)
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--chunk", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--naive_max_gb", type=float, default=1.0)
  p.add_argument("--numpy_images", type=int, default=8)
  p.add_argument("--repeats", type=int, default=2)
  a = p.parse_args()

  ni, nc = max(1, round(1000 * a.scale)), max(1, round(5000 * a.scale))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(ni, a.lx, a.dim)).astype(np.float32)
  y = rng.normal(size=(nc, a.ly, a.dim)).astype(np.float32)
  xm = np.ones((ni, a.lx), bool)
  ym = np.arange(a.ly)[None] < rng.integers(8, a.ly + 1, size=nc)[:, None]  # ragged captions
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"{ni} images x {nc} captions, tokens {a.lx} x {a.ly}, D={a.dim}, chunk={a.chunk}, "
        f"dtype={a.dtype} (scale {a.scale})")

  cdt = None if a.dtype == "float32" else jnp.bfloat16
  xd, yd = jnp.asarray(x, a.dtype), jnp.asarray(y, a.dtype)
  ours = jax.jit(lambda x, xm, y, ym: token_similarity(x, xm, y, ym, chunk=a.chunk,
                                                       compute_dtype=cdt))
  t_ours, s_ours = timed(ours, xd, xm, yd, ym, repeats=a.repeats)
  st_ours = compiled_stats(ours, xd, xm, yd, ym)
  res = {"pairs": ni * nc, "ours": {"seconds": t_ours, "pairs_per_s": ni * nc / t_ours,
                                    **st_ours}}

  # Memory of both at the FULL size (1,000 x 5,000), compiled from shapes only, never run.
  full = (jax.ShapeDtypeStruct((1000, a.lx, a.dim), xd.dtype), jax.ShapeDtypeStruct(
      (1000, a.lx), bool), jax.ShapeDtypeStruct((5000, a.ly, a.dim), xd.dtype),
          jax.ShapeDtypeStruct((5000, a.ly), bool))
  res["ours"]["peak_bytes_full_size"] = compiled_stats(ours, *full)["peak_bytes"]
  st_naive_full = compiled_stats(naive_similarity, *full)
  # Naive runs on a subset that fits.
  block = nc * a.lx * a.ly * 4  # bytes of the cosine block per image
  n_sub = int(max(1, min(ni, a.naive_max_gb * 2 ** 30 // block)))
  t_naive, s_naive = timed(jax.jit(naive_similarity), x[:n_sub], xm[:n_sub], y, ym,
                           repeats=a.repeats)
  res["naive"] = {"images_run": n_sub, "seconds": t_naive, "pairs_per_s": n_sub * nc / t_naive,
                  "peak_bytes_full_size": st_naive_full["peak_bytes"]}

  n_np = min(ni, a.numpy_images)
  t = time.perf_counter()
  s_np = numpy_similarity(x[:n_np], xm[:n_np], y, ym)
  t_np = time.perf_counter() - t
  res["numpy"] = {"images_run": n_np, "seconds": t_np, "pairs_per_s": n_np * nc / t_np}

  n_cmp = min(n_sub, n_np)
  res["max_abs_diff"] = {
      "ours_vs_numpy": float(np.abs(np.asarray(s_ours)[:n_cmp] - s_np[:n_cmp]).max()),
      "naive_vs_numpy": float(np.abs(np.asarray(s_naive)[:n_cmp] - s_np[:n_cmp]).max())}
  res["speedup"] = {"ours_vs_naive": res["ours"]["pairs_per_s"] / res["naive"]["pairs_per_s"],
                    "ours_vs_numpy": res["ours"]["pairs_per_s"] / res["numpy"]["pairs_per_s"]}
  # XLA's cost_analysis counts a while-loop body once, so the tiled kernel's FLOPs are analytic:
  # the matmul dominates, 2 * Ni * Nc * Lx * Ly * D. Floor on an H100 SXM at full size (dense
  # bf16 989 TFLOP/s; fp32 without TF32 ~67 TFLOP/s) -- compute-bound: the per-tile cosine block
  # is produced and reduced on chip only if XLA fuses them, otherwise HBM traffic adds to it.
  full_flops = 2.0 * 1000 * 5000 * a.lx * a.ly * a.dim
  res["analytic_flops"] = 2.0 * ni * nc * a.lx * a.ly * a.dim
  res["h100_floor_seconds_full_size"] = {"bf16": full_flops / 989e12, "fp32": full_flops / 67e12}
  print(json.dumps(res, indent=2))
  gb = lambda b: f"{b / 2 ** 30:.2f} GiB"
  print(f"\n| impl | pairs run | pairs/s | peak memory (run) | peak memory 1000x5000 "
        f"(compiled) |\n|---|---|---|---|---|\n"
        f"| ours (chunk {a.chunk}, {a.dtype}) | {ni * nc:,} | {res['ours']['pairs_per_s']:,.0f} | "
        f"{gb(st_ours['peak_bytes'])} | {gb(res['ours']['peak_bytes_full_size'])} |\n"
        f"| naive jnp | {n_sub * nc:,} | {res['naive']['pairs_per_s']:,.0f} | - | "
        f"{gb(st_naive_full['peak_bytes'])} |\n"
        f"| numpy | {n_np * nc:,} | {res['numpy']['pairs_per_s']:,.0f} | - | - |")


if __name__ == "__main__":
  main()
