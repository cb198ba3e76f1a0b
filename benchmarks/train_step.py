"""Train-step throughput of GRM and SEPS: steps/s, images/s, peak memory, fp32 vs bf16.

Run:  python benchmarks/train_step.py                     # CPU: reduced size (see --size)
      python benchmarks/train_step.py --size=full --batch=128   # GPU/TPU: ViT-B/16-224 + BERT-base

Sizes: `tiny` (2 layers, width 64, 64 px), `reduced` (4 layers, width 256, 112 px: the size of
benchmarks/vs_official.py), `full` (ViT-B/16-224 + BERT-base). The step is the project's own
`trainer.train_step` (forward, backward, AdamW update, donated state), timed as the median of
`--reps` steps after one warm-up (compile) step, blocking on the result. Peak memory is XLA's
`memory_analysis()` of the compiled step (arguments + outputs + temporaries), which is what a
device would have to hold; bf16 is `model.dtype=bfloat16` (fp32 parameters, bf16 compute).
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import roofline  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def encoders(size):
  if size == "full":
    return roofline.full_encoders()
  if size == "reduced":
    return roofline.reduced_encoders()
  return (dict(common.VIT_TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
          dict(common.BERT_TINY))


def measure(name, size, batch, dtype, reps):
  vision, text = encoders(size)
  config = roofline.train_config(name, vision, text, batch=batch)
  config.model.dtype = dtype
  _, _, step, init = roofline.build_train_step(config)
  jstep = jax.jit(step, donate_argnums=(0,))
  state = jax.jit(init)()
  batch_np = roofline._model_batch(roofline.random_batch(config, np.random.default_rng(0), batch))  # pylint: disable=protected-access
  batch_dev = jax.device_put(batch_np)
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = jstep.lower(state, batch_dev, rng).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
  state, m = compiled(state, batch_dev, rng)
  jax.block_until_ready(m)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    state, m = compiled(state, batch_dev, rng)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  med = float(np.median(times))
  return {"model": name, "size": size, "batch": batch, "dtype": dtype, "compile_s": compile_s,
          "step_s": med, "steps_per_s": 1 / med, "images_per_s": batch / med,
          "peak_mem_gib": None if peak is None else peak / 2**30,
          "loss": float(m["loss"])}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", choices=("tiny", "reduced", "full"), default="tiny")
  p.add_argument("--batch", type=int, default=None, help="default: 16 tiny, 32 reduced, 128 full")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--models", default="grm,seps")
  p.add_argument("--dtypes", default="float32,bfloat16")
  a = p.parse_args()
  batch = a.batch or {"tiny": 16, "reduced": 32, "full": 128}[a.size]
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
  rows = []
  for name in a.models.split(","):
    for dtype in a.dtypes.split(","):
      r = measure(name, a.size, batch, dtype, a.reps)
      rows.append(r)
      mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
      print(f"{name:5s} {a.size:8s} b={batch:<4d} {dtype:9s} compile {r['compile_s']:6.1f}s  "
            f"step {r['step_s'] * 1e3:8.1f} ms  {r['steps_per_s']:7.2f} steps/s  "
            f"{r['images_per_s']:8.1f} img/s  peak {mem} GiB", flush=True)
  base = {(r["model"], r["dtype"]): r["step_s"] for r in rows}
  for dtype in a.dtypes.split(","):
    if ("grm", dtype) in base and ("seps", dtype) in base:
      print(f"GRM step / SEPS step ({dtype}): {base[('grm', dtype)] / base[('seps', dtype)]:.2f}")


if __name__ == "__main__":
  main()
