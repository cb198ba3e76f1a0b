"""Times jitted forward passes of ViT-B/16-224, Swin-B-224 and BERT-base (random weights).

  python benchmarks/encoder_forward.py                      # all three, default batch
  python benchmarks/encoder_forward.py --models vit --batch 32 --iters 5 --dtype bfloat16

The default batch is 32 on an accelerator and 8 on CPU (a 2-core CPU needs seconds per ViT-B
batch); the batch used is printed. Reports compile time, seconds per batch (median of `--iters`
timed runs after one warm-up), items/s, and XLA's FLOP count for the step (cost_analysis) with
the achieved FLOP/s.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from configs import common  # noqa: E402
from gseps_jax.models.encoders import encoder_from_config  # noqa: E402

MODELS = {"vit": ("ViT-B/16-224", common.VIT_B16), "swin": ("Swin-B-224", common.SWIN_B),
          "bert": ("BERT-base", common.BERT_BASE)}


def _inputs(name, batch, seq_len, rng):
  if name == "bert":
    ids = rng.integers(1000, 30000, size=(batch, seq_len)).astype(np.int32)
    return (jnp.asarray(ids), jnp.ones((batch, seq_len), jnp.int32))
  return (jnp.asarray(rng.normal(size=(batch, 224, 224, 3)).astype(np.float32)),)


def _random_params(module, inputs, rng):
  # Filled on the host: compiling the real initialisers costs more than the benchmark itself.
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
  return jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)),
                      shapes)


def bench(name, batch, iters, dtype, seq_len):
  """Returns a dict of timings for one encoder."""
  label, cfg = MODELS[name]
  rng = np.random.default_rng(0)
  module = encoder_from_config(cfg, dtype=dtype)
  inputs = _inputs(name, batch, seq_len, rng)
  params = _random_params(module, inputs, rng)
  fwd = jax.jit(lambda p, *x: module.apply({"params": p}, *x))
  t0 = time.perf_counter()
  compiled = fwd.lower(params, *inputs).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  jax.block_until_ready(compiled(params, *inputs))  # warm-up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, *inputs))
    times.append(time.perf_counter() - t0)
  sec = float(np.median(times))
  return dict(model=label, batch=batch, dtype=dtype, compile_s=compile_s, sec_per_batch=sec,
              items_per_s=batch / sec, gflop_per_batch=flops / 1e9, gflops=flops / sec / 1e9)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="vit,swin,bert")
  ap.add_argument("--batch", type=int, default=0, help="0 = 32 on GPU/TPU, 8 on CPU")
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--seq_len", type=int, default=32, help="BERT sequence length")
  args = ap.parse_args(argv)
  backend = jax.default_backend()
  batch = args.batch or (8 if backend == "cpu" else 32)
  dev = jax.devices()[0]
  print(f"backend={backend} device={dev.device_kind} x{jax.device_count()} "
        f"cpu_count={os.cpu_count()} batch={batch} iters={args.iters} dtype={args.dtype} "
        f"bert_seq_len={args.seq_len}")
  print("| model | batch | dtype | compile s | s/batch | items/s | GFLOP/batch | GFLOP/s |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    r = bench(name.strip(), batch, args.iters, args.dtype, args.seq_len)
    print(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['compile_s']:.1f} | "
          f"{r['sec_per_batch']:.3f} | {r['items_per_s']:.1f} | {r['gflop_per_batch']:.0f} | "
          f"{r['gflops']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
