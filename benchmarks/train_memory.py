"""Training memory at the paper's size (ViT-B/16-224 + BERT-base, GRM or SEPS) with and without
rematerialisation, contrastive gradient caching and bfloat16; and which batch fits on a GPU.

Run:  python benchmarks/train_memory.py                  # GRM, tracing only (~1 min)
      python benchmarks/train_memory.py --model=seps --json out.json
      python benchmarks/train_memory.py --compiled        # also XLA's CPU buffer assignment

Nothing is executed. The estimate of a train step's peak memory is

  fixed       parameters + gradients + AdamW state (mu, nu): from the abstract train state;
  residuals   the activations the forward pass keeps for the backward pass, as JAX's autodiff
              saves them (`saved_residuals` of the loss: every array that crosses from forward
              to backward, arguments excluded). This is where remat acts: `blocks` keeps only
              each block's input, `dots` also the matmul outputs without batch dimensions;
  batch       the input batch.

With `train.encoder_chunk = K` (gradient caching) the residuals are those of the head and loss
on the whole batch, plus ONE chunk's encoders (B / K rows; the chunks run one after another),
plus the batch's token sets and their gradient, which stay live through the step.

Peak ~ fixed + residuals + batch is a lower bound of what an allocator needs (the backward
pass's own temporaries come on top: ~1-2 GB at this size); the largest batch under 24 / 40 /
80 GB keeps 15% for them and for the CUDA context. Estimates at B = 32, 128 and 256 are fitted
with `a + b B + c B^2` (the in-batch scores grow as B^2).

Why not XLA's compiled `memory_analysis()`: on this CPU-only machine the CPU compiler schedules
recomputation without regard to memory, so remat shows no effect there (measured: 44.4 GB with
and without remat at B = 128); `--compiled` prints those numbers anyway for the variants it does
model (plain, gradient caching).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
# The list behind jax.ad_checkpoint.print_saved_residuals (which only prints it).
from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top

import roofline  # pylint: disable=g-import-not-at-top
from gseps_jax import state as state_lib  # pylint: disable=g-import-not-at-top
from gseps_jax import trainer  # pylint: disable=g-import-not-at-top

# name -> (model.remat, train.encoder_chunk, model.dtype)
VARIANTS = {
    "plain": ("none", 0, "float32"),
    "remat=dots": ("dots", 0, "float32"),
    "remat=blocks": ("blocks", 0, "float32"),
    "encoder_chunk=8": ("none", 8, "float32"),
    "encoder_chunk=8 + remat=blocks": ("blocks", 8, "float32"),
    "bf16": ("none", 0, "bfloat16"),
    "bf16 + remat=blocks": ("blocks", 0, "bfloat16"),
}
GPUS_GB = (24, 40, 80)
USABLE = 0.85
BATCHES = (32, 128, 256)
GB = 1e9


def _nbytes(a) -> int:
  if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):  # a threefry key: 2 x uint32
    return int(np.prod(a.shape)) * 8
  return int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize


def _bytes(tree) -> int:
  return sum(_nbytes(x) for x in jax.tree.leaves(tree))


def _residual_bytes(fn, *args) -> int:
  return sum(_nbytes(a) for a, where in saved_residuals(fn, *args)
             if not where.startswith("from the argument"))


def _config(model_name, batch, remat, chunk, dtype, encoders=None):
  vision, text = encoders or roofline.full_encoders()
  c = roofline.train_config(model_name, vision, text, batch=batch)
  c.model.remat = remat
  c.model.dtype = dtype
  c.train.encoder_chunk = chunk
  return c


def step_memory(model_name: str, batch: int, remat: str, chunk: int, dtype: str,
                encoders=None) -> dict:
  """{'fixed', 'residuals', 'batch', 'peak'} bytes of one train step (traced, not compiled);
  `encoders`: (vision, text) HF config dicts, default ViT-B/16-224 + BERT-base."""
  c = _config(model_name, batch, remat, chunk, dtype, encoders)
  model, _, _, init = roofline.build_train_step(c)
  state = jax.eval_shape(init)
  data = roofline._model_batch(  # pylint: disable=protected-access
      roofline.random_batch(c, np.random.default_rng(0), batch))
  rng, step = jax.random.key(0), jnp.int32(0)
  if chunk > 1:
    rows = {k: v[:batch // chunk] for k, v in data.items()}
    rngs = state_lib.train_rngs(rng)  # the training forward's streams
    towers = lambda p, b: model.apply({"params": p}, b, train=True, method="towers", rngs=rngs)
    reps = jax.eval_shape(towers, state.params, data)

    def head_loss(p, r):
      sims, aux = model.apply({"params": p}, r, data, train=True, method="head", rngs=rngs)
      return trainer._total_loss(sims, aux, data, step, p, c, 10)[0]  # pylint: disable=protected-access

    residuals = (_residual_bytes(head_loss, state.params, reps)
                 + _residual_bytes(lambda p: towers(p, rows), state.params)
                 + 2 * _bytes(reps))
  else:
    residuals = _residual_bytes(lambda p: trainer.loss_fn(
        p, data, rng, step, model=model, config=c, steps_per_epoch=10)[0], state.params)
  fixed = _bytes(state.params) * 2 + _bytes(state.opt_state)  # params, grads, optimiser
  out = {"fixed": fixed, "residuals": residuals, "batch": _bytes(data)}
  out["peak"] = sum(out.values())
  return out


def compiled_peak(model_name: str, batch: int, remat: str, chunk: int, dtype: str) -> int:
  """XLA's CPU buffer assignment: arguments + outputs - donated + temporaries (bytes)."""
  c = _config(model_name, batch, remat, chunk, dtype)
  _, _, step, init = roofline.build_train_step(c)
  data = roofline._model_batch(  # pylint: disable=protected-access
      roofline.random_batch(c, np.random.default_rng(0), 2))
  abstract = {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype) for k, v in data.items()}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  m = jax.jit(step, donate_argnums=(0,)).lower(jax.eval_shape(init), abstract,
                                               rng).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def max_batch(points: dict, gb: float, step: int = 8) -> int:
  """Largest multiple of `step` whose fitted peak a + bB + cB^2 stays under USABLE x gb."""
  bs = np.array(sorted(points), float)
  coef = np.polyfit(bs, np.array([points[b] for b in sorted(points)], float), 2)
  budget, b = USABLE * gb * GB, 0
  while np.polyval(coef, b + step) <= budget and b < 1 << 16:
    b += step
  return b


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="grm", choices=("grm", "seps"))
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help=f"comma-separated subset of: {', '.join(VARIANTS)}")
  p.add_argument("--compiled", action="store_true",
                 help="also compile (CPU) plain and encoder_chunk=8 at B=128 (~1 min each)")
  p.add_argument("--json", default="", help="also write the numbers to this file")
  args = p.parse_args(argv)
  names = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown:
    p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
  print(f"{args.model}: ViT-B/16-224 + BERT-base, captions {roofline.CAP_LEN} tokens"
        + (f", dense captions {roofline.DENSE_LEN}" if args.model == "seps" else "")
        + "; GB = 1e9 bytes; peak ~ fixed + saved activations + batch", flush=True)
  print(f"{'variant':32s} {'fixed':>6s} {'act/ex@128':>10s} {'peak@128':>9s} "
        + " ".join(f"{'max B ' + str(g) + 'GB':>11s}" for g in GPUS_GB), flush=True)
  rows = {}
  for name in names:
    remat, chunk, dtype = VARIANTS[name]
    t0 = time.perf_counter()
    points = {b: step_memory(args.model, b, remat, chunk, dtype) for b in BATCHES}
    fits = {g: max_batch({b: v["peak"] for b, v in points.items()}, g) for g in GPUS_GB}
    at = points[128]
    rows[name] = {"points": points, "max_batch": fits}
    print(f"{name:32s} {at['fixed'] / GB:5.1f}G {at['residuals'] / 128 / 1e6:8.0f}MB "
          f"{at['peak'] / GB:8.1f}G " + " ".join(f"{fits[g]:>11d}" for g in GPUS_GB)
          + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
  print(f"max B: largest multiple of 8 with the fitted peak <= {USABLE:.0%} of the GPU")
  if args.compiled:
    for name in ("plain", "encoder_chunk=8"):
      remat, chunk, dtype = VARIANTS[name]
      peak = compiled_peak(args.model, 128, remat, chunk, dtype)
      rows.setdefault(name, {})["compiled_cpu_peak_128"] = peak
      print(f"XLA CPU compiled peak at B=128, {name}: {peak / GB:.1f} GB", flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as fh:
      json.dump({"model": args.model, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
  main()
