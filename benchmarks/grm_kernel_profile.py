"""Where the GRM kernel's time goes on one CPU thread: its cosine-block GEMMs alone vs the whole
kernel, and the PyTorch formula's einsum alone, on `vs_official.py --only grm`'s inputs
(128 x 640 pairs, key-level-like image masks keeping ~70% of 197 tokens, captions of 8-32).

  python benchmarks/grm_kernel_profile.py [BUCKETS]   (default 16, as vs_official.py)

The GEMMs are timed per bucket shape the kernel picks (tile (16, 64), BUCKETS per side), times the
number of tiles of that shape; the rest of the kernel's time is the masked max / mean
reductions, the packing and the loop. docs/performance.md, "Sixth pass", has the numbers.
"""
import os
import sys
import time

os.sched_setaffinity(0, [sorted(os.sched_getaffinity(0))[0]])
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gseps_jax.models import similarity  # pylint: disable=g-import-not-at-top,wrong-import-position
ni, nc, lx, ly, d = 128, 640, 197, 32, 512
cx, cy, B = 16, 64, int(sys.argv[1]) if len(sys.argv) > 1 else 16
rng = np.random.default_rng(1)
x = rng.standard_normal((ni, lx, d), np.float32); y = rng.standard_normal((nc, ly, d), np.float32)
xm = rng.random((ni, lx)) < 0.7; xm[:, 0] = True
ym = np.arange(ly)[None] < rng.integers(8, ly + 1, size=nc)[:, None]
def med(f, n=5):
  f(); ts = []
  for _ in range(n):
    t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
  return float(np.median(ts))
jx, jxm, jy, jym = map(jnp.asarray, (x, xm, y, ym))
kern = lambda: similarity.token_similarity(jx, jxm, jy, jym, chunk=(cx, cy), buckets=B).block_until_ready()
t_kernel = med(kern)
# the tiles' bucket shapes, as the kernel picks them
lxo, lyo = similarity._bucket_lengths(lx, B), similarity._bucket_lengths(ly, B)
xc = np.sort(xm.sum(1)); yc = np.sort(ym.sum(1))
shapes = {}
for i in range(0, ni, cx):
  bx = lxo[np.searchsorted(lxo, xc[i:i + cx].max())]
  for j in range(0, nc, cy):
    by = lyo[np.searchsorted(lyo, yc[j:j + cy].max())]
    shapes[(bx, by)] = shapes.get((bx, by), 0) + 1
gemm_t, gemm_f = 0.0, 0.0
for (bx, by), cnt in shapes.items():
  a = jnp.asarray(rng.standard_normal((cx, bx, d), np.float32)); b = jnp.asarray(rng.standard_normal((cy, by, d), np.float32))
  f = jax.jit(lambda a, b: jnp.einsum("ild,jmd->ijlm", a, b))
  gemm_t += cnt * med(lambda: f(a, b).block_until_ready(), 3)
  gemm_f += cnt * 2 * cx * bx * cy * by * d
tx, ty = torch.from_numpy(x), torch.from_numpy(y)
def teinsum():
  for i in range(0, ni, 16):
    torch.einsum("ild,jmd->ijlm", tx[i:i + 16], ty)
t_teinsum = med(teinsum, 3)
full_f = 2 * ni * nc * lx * ly * d
print(f"tiles by bucket shape: {sorted(shapes.items())}")
print(f"ours: whole kernel {t_kernel:.3f} s; its GEMMs alone {gemm_t:.3f} s "
      f"({gemm_f / 1e9:.0f} GFLOP executed = {gemm_f / full_f:.2f} of the unbucketed "
      f"{full_f / 1e9:.0f}; {gemm_f / gemm_t / 1e9:.1f} GFLOP/s) -> GEMM share {gemm_t / t_kernel:.2f}")
print(f"torch: the formula's einsum alone {t_teinsum:.3f} s ({full_f / t_teinsum / 1e9:.1f} GFLOP/s)")
