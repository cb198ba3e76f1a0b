"""Compiler-derived roofline: FLOPs and bytes from XLA's cost analysis, and time floors.

Run:  python benchmarks/roofline.py                 # full sizes (lowering only) + report
      python benchmarks/roofline.py --json out.json  # also write the numbers

Everything here is LOWERED AND COMPILED, never executed, at full size: `jax.jit(f).lower(*abstract)
.compile().cost_analysis()` works for shapes far larger than this machine could run (inputs are
`jax.ShapeDtypeStruct`s; `jax.eval_shape` builds the abstract train state without allocating it).

Measured:
  (a) one training step (forward, backward, AdamW update) of GRM and SEPS at the paper's size:
      ViT-B/16-224 + BERT-base, batch 128, captions 32 tokens, dense captions 90 tokens (SEPS).
  (b) COCO-5K all-pairs scoring (5,000 images x 25,000 captions, 197 image tokens, 32-token
      captions, D=512; SEPS parity mode also has a 90-token dense caption per caption).

Caveat that shapes the method: XLA's cost analysis counts the body of a `while` loop ONCE, not
times its trip count, and both scorers tile the pair grid with `lax.map` (a while loop). So the
scoring cost is measured as (per-item preparation over all items, lowered once) + (one pair tile,
lowered without tiling) x (number of tiles). The GRM train step has no loops; the SEPS in-batch
head loops over the images (`sdtps.pair_scores`), so its step count adds (B - 1) x one image's
head forward + backward, lowered with one image (`train_step_cost`, `head_loop_flops`). Both use
the all-patch SEPS head (`gather_kept="off"`), the accelerator path.

Time floor on a chip = max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), i.e. a perfect overlap of
compute and memory at the chip's peak; the real time is above it. Peaks assumed (dense, no
sparsity): H100 SXM 989 TFLOP/s bf16, 3.35 TB/s; TPU v5p 459 TFLOP/s bf16, 2.76 TB/s. Our heads
compute in float32; on those chips fp32 matmuls run at lower rates (H100: 67 TFLOP/s fp32 FMA,
495 TFLOP/s TF32; TPU: bf16 passes), so the bf16 floor assumes the matmuls are fed bf16
(`compute_dtype=bfloat16` in the kernel, `dtype=bfloat16` in the encoders) — both are config
options; the fp32 floor is printed too.

The official SEPS evaluation loop's FLOPs are counted from its shapes (`official_seps_pair_flops`).
"""

import argparse
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from configs import common  # pylint: disable=g-import-not-at-top
from gseps_jax import models
from gseps_jax import optim
from gseps_jax import state as state_lib
from gseps_jax import trainer
from gseps_jax.models import sdtps
from gseps_jax.models import seps as seps_lib
from gseps_jax.models import similarity

CHIPS = {
    # name: (peak bf16 dense FLOP/s, peak fp32 FLOP/s used for fp32 matmuls, HBM bytes/s)
    "H100-SXM": (989e12, 67e12, 3.35e12),
    "TPU-v5p": (459e12, 459e12 / 3, 2.76e12),  # fp32 matmul = 3 bf16 passes (HIGH) on the MXU
}

# Full-size token geometry of the paper's ViT-224 setting.
IMG_TOKENS = 197
CAP_LEN = 32
DENSE_LEN = 90
EMBED = 512
COCO5K_IMAGES = 5000
COCO5K_CAPTIONS = 25000


# ----------------------------------------------------------------------------------------------
# Cost analysis.
# ----------------------------------------------------------------------------------------------
def cost_of(fn: Callable, *args, static: Optional[Mapping[str, Any]] = None) -> dict:
  """FLOPs and bytes accessed of `jax.jit(fn)(*args)` from XLA's compiled cost analysis.

  Args:
    fn: the function; `args` may be arrays or `jax.ShapeDtypeStruct`s (nothing is executed).
  Returns:
    {'flops': float, 'bytes': float, 'compile_s': float}.
  """
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older JAX returned one dict per computation
    ca = ca[0]
  return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0)),
          "compile_s": time.perf_counter() - t0}


def floors(flops: float, nbytes: float) -> dict:
  """Time floors (seconds) per chip: bf16-matmul and fp32-matmul compute floors vs memory."""
  out = {}
  for chip, (bf16, fp32, bw) in CHIPS.items():
    out[chip] = {"compute_bf16_s": flops / bf16, "compute_fp32_s": flops / fp32,
                 "memory_s": nbytes / bw,
                 "floor_bf16_s": max(flops / bf16, nbytes / bw),
                 "floor_fp32_s": max(flops / fp32, nbytes / bw)}
  return out


# ----------------------------------------------------------------------------------------------
# Configs and train steps (shared with vs_official.py).
# ----------------------------------------------------------------------------------------------
def reduced_encoders(width: int = 256, layers: int = 4, image_size: int = 112,
                     heads: int = 4) -> tuple[dict, dict]:
  """(vision, text) HF config dicts of the reduced benchmark encoders.

  Dropout as the real checkpoints' configs: ViT-in21k 0.0, bert-base 0.1 (hidden and attention);
  written explicitly so that ours and HF's (torch) models are configured identically.
  """
  vision = dict(common.VIT_B16, hidden_size=width, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=4 * width, image_size=image_size,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  text = dict(common.BERT_BASE, hidden_size=width, num_hidden_layers=layers,
              num_attention_heads=heads, intermediate_size=4 * width,
              hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  return vision, text


def full_encoders() -> tuple[dict, dict]:
  """ViT-B/16-224 and BERT-base, with the checkpoints' dropout settings."""
  return (dict(common.VIT_B16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
          dict(common.BERT_BASE, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))


def train_config(name: str, vision: dict, text: dict, *, batch: int, cap_len: int = CAP_LEN,
                 dense_len: int = DENSE_LEN):
  """The run config of `name` ('grm' | 'seps') with the given encoders, in the hardest-negative
  phase of the recipe (as the official loss with max_violation=True)."""
  if name == "grm":
    from configs import grm_vit as cfg_mod  # pylint: disable=g-import-not-at-top
  elif name == "seps":
    from configs import seps_vit as cfg_mod  # pylint: disable=g-import-not-at-top
  else:
    raise ValueError(f"name must be 'grm' or 'seps', got {name!r}")
  c = cfg_mod.get_config()
  c.model.vision = type(c.model.vision)(vision)
  c.model.text = type(c.model.text)(text)
  c.data.image_size = vision["image_size"]
  c.data.max_len = cap_len
  c.data.dense_max_len = dense_len
  c.train.batch_size = batch
  c.loss.warmup_epochs = 0  # hardest negatives (official epochs >= 1)
  return c


def random_batch(config, rng: np.random.Generator, batch: int) -> dict:
  """A random training batch: NHWC images, ids with [CLS]...[SEP] and 0 padding, 5 captions per
  image id (so the shared-image mask of the loss has something to do)."""
  d = config.data
  vocab = config.model.text["vocab_size"]

  def text(length, lo):
    lens = rng.integers(lo, length + 1, size=batch)
    ids = rng.integers(min(1000, vocab // 2), vocab, size=(batch, length)).astype(np.int32)
    ids[:, 0] = 101
    pos = np.arange(length)[None]
    ids[pos == (lens[:, None] - 1)] = 102
    ids[pos >= lens[:, None]] = 0
    return ids, (pos < lens[:, None]).astype(np.int32), lens

  ids, mask, lens = text(d.max_len, max(3, d.max_len // 4))
  dids, dmask, dlens = text(d.dense_max_len, max(3, d.dense_max_len // 2))
  return {"image": rng.standard_normal((batch, d.image_size, d.image_size, 3), np.float32),
          "input_ids": ids, "attention_mask": mask, "dense_ids": dids, "dense_mask": dmask,
          "image_index": (np.arange(batch) // 5).astype(np.int32),
          "_lens": lens, "_dense_lens": dlens}


def _model_batch(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if not k.startswith("_")}


def build_train_step(config, steps_per_epoch: int = 1000):
  """(model, tx, jitted step fn(state, batch, rng), init fn() -> state).

  The step is the project's `trainer.train_step` with the state donated, as in training.
  """
  model = models.build_model(config.model)
  sample = state_lib.sample_batch(config, batch_size=2)
  key = jax.random.key(config.seed)
  abstract_params = state_lib.abstract_params(model, sample)
  tx, _, _ = optim.make_optimizer(config.optim, steps_per_epoch, abstract_params)

  def init():
    params = state_lib.init_params(model, sample, key)
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params))

  step = functools.partial(trainer.train_step, model=model, tx=tx, config=config,
                           steps_per_epoch=steps_per_epoch)
  return model, tx, step, init


def _seps_head_image_cost(config, b: int) -> float:
  """FLOPs of one image's pass through the SEPS in-batch head (forward + backward against the
  batch's b captions and dense captions; all-patch path), lowered with one image so that no
  loop hides work."""
  sc = config.model.seps
  n = sc.num_patches if sc.num_patches > 0 else seps_lib.backbone_num_patches(config.model.vision)
  cls = int(config.model.vision["model_type"] == "vit")  # ViT: a CLS before the patch grid
  head = seps_lib.SEPSHead(num_aggregated=sdtps.num_aggregated(n, sc.alpha, sc.rho),
                           rho=sc.rho, dense_mode=sc.dense_mode, gather_kept="off")
  d, lc, ld = config.model.embed_dim, config.data.max_len, config.data.dense_max_len
  nd = b if sc.dense_mode == "parity" else 1
  shapes = (_sds(1, n + cls, d), _sds(b, lc, d), _sds(b, lc, dtype=bool), _sds(nd, ld, d),
            _sds(nd, ld, dtype=bool))
  params = jax.eval_shape(lambda: head.init(
      jax.random.key(0), *(jnp.zeros(x.shape, x.dtype) for x in shapes)))["params"]

  def loss(p, img, cap, cm, den, dm):
    return jnp.sum(head.apply({"params": p}, img, cap, cm, den, dm))

  return cost_of(jax.grad(loss, argnums=(0, 1, 2, 4)), params, *shapes)["flops"]


def train_step_cost(config) -> dict:
  """Cost analysis of one train step at `config`'s size (lowered on abstract values only).

  SEPS: the step is counted with the all-patch head (`gather_kept="off"`, the accelerator path).
  Its in-batch head loops over the images (`sdtps.pair_scores`) and XLA counts a loop body once,
  so (B - 1) times one image's forward + backward (`_seps_head_image_cost`) is added
  (`head_loop_flops`).
  """
  extra = 0.0
  if config.model.name == "seps":
    config = config.copy_and_resolve_references()
    config.model.seps.gather_kept = "off"
    b = config.train.batch_size
    extra = (b - 1) * _seps_head_image_cost(config, b)
  _, _, step, init = build_train_step(config)
  abstract_state = jax.eval_shape(init)
  b = config.train.batch_size
  batch = _model_batch(random_batch(config, np.random.default_rng(0), 2))
  abstract_batch = {k: jax.ShapeDtypeStruct((b,) + v.shape[1:], v.dtype) for k, v in batch.items()}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  out = cost_of(step, abstract_state, abstract_batch, rng)
  out["counted_flops"], out["head_loop_flops"] = out["flops"], extra
  out["flops"] += extra
  out["params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_state.params)))
  return out


# ----------------------------------------------------------------------------------------------
# All-pairs scoring costs.
# ----------------------------------------------------------------------------------------------
def _sds(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def grm_scoring_cost(n_img: int, n_cap: int, *, tile: tuple[int, int] = (250, 1250),
                     num_regions: int = 5, compute_dtype=None) -> dict:
  """GRM eval = 0.4 s_ori + 0.4 s_key + 0.2 s_unc: three kernel calls per pair.

  One tile of (tile[0] images x tile[1] captions) lowered untiled, times the number of tiles. The
  normalisation inside the kernel is per item, so it is counted once per tile (a slight
  overcount, < 1%).
  """
  ti, tc = min(tile[0], n_img), min(tile[1], n_cap)
  n_tiles = math.ceil(n_img / ti) * math.ceil(n_cap / tc)
  kern = functools.partial(similarity.token_similarity, chunk=None, compute_dtype=compute_dtype)

  def f(v, vm, km, u, t, tm, tk):
    return (0.4 * kern(v, vm, t, tm) + 0.4 * kern(v, km, t, tk)
            + 0.2 * kern(u, jnp.ones(u.shape[:2], bool), t, tk))

  args = (_sds(ti, IMG_TOKENS, EMBED), _sds(ti, IMG_TOKENS, dtype=bool),
          _sds(ti, IMG_TOKENS, dtype=bool), _sds(ti, num_regions, EMBED),
          _sds(tc, CAP_LEN, EMBED), _sds(tc, CAP_LEN, dtype=bool), _sds(tc, CAP_LEN, dtype=bool))
  c = cost_of(f, *args)
  return {"tile": [ti, tc], "n_tiles": n_tiles, "tile_flops": c["flops"],
          "tile_bytes": c["bytes"], "flops": c["flops"] * n_tiles, "bytes": c["bytes"] * n_tiles,
          "pairs": n_img * n_cap}


def _seps_head(num_patches: int = IMG_TOKENS - 1):
  return seps_lib.SEPSHead(num_aggregated=sdtps.num_aggregated(num_patches, 0.4, 0.5),
                           rho=0.5, dense_mode="parity")


def seps_scoring_cost(n_img: int, n_cap: int, *, tile: tuple[int, int] = (1, 250),
                      dense_mode: str = "parity", gather_kept: str = "off") -> dict:
  """SEPS all-pairs cost = per-image/per-text preparation (once) + one pair tile x tiles.

  Parity mode: every caption has its own (caption-aligned) 90-token dense caption.
  `gather_kept`: "off" is the accelerator path (gather_kept "auto" is off on GPU/TPU). The CPU's
  kept-patch gather ("on") loops over the tile's captions and XLA's cost analysis counts a loop
  body once, so its count is exact only for a tile of one caption.
  """
  head = _seps_head()
  params = jax.eval_shape(lambda: head.init(
      jax.random.key(0), jnp.zeros((1, IMG_TOKENS, EMBED)), jnp.zeros((1, CAP_LEN, EMBED)),
      jnp.ones((1, CAP_LEN), bool), jnp.zeros((1, DENSE_LEN, EMBED)),
      jnp.ones((1, DENSE_LEN), bool)))["params"]
  n_dense = n_cap if dense_mode == "parity" else n_img

  def prep_img(p, x):
    return head.apply({"params": p}, x, method=seps_lib.SEPSHead.prepare_images)

  def prep_txt(x, m):
    return sdtps.prepare_texts(x, m)

  c_img = cost_of(prep_img, params, _sds(n_img, IMG_TOKENS, EMBED))
  c_cap = cost_of(prep_txt, _sds(n_cap, CAP_LEN, EMBED), _sds(n_cap, CAP_LEN, dtype=bool))
  c_den = cost_of(prep_txt, _sds(n_dense, DENSE_LEN, EMBED), _sds(n_dense, DENSE_LEN, dtype=bool))

  ti, tc = min(tile[0], n_img), min(tile[1], n_cap)
  n_tiles = math.ceil(n_img / ti) * math.ceil(n_cap / tc)
  img_t = jax.eval_shape(prep_img, params, _sds(ti, IMG_TOKENS, EMBED))
  cap_t = jax.eval_shape(prep_txt, _sds(tc, CAP_LEN, EMBED), _sds(tc, CAP_LEN, dtype=bool))
  nd_t = tc if dense_mode == "parity" else ti
  den_t = jax.eval_shape(prep_txt, _sds(nd_t, DENSE_LEN, EMBED),
                         _sds(nd_t, DENSE_LEN, dtype=bool))
  k = sdtps.num_kept(IMG_TOKENS - 1, 0.5)
  pair = functools.partial(sdtps.pair_scores, k=k, dense_mode=dense_mode, chunk=None,
                           gather_kept=gather_kept)
  c_tile = cost_of(pair, img_t, cap_t, den_t)
  prep_flops = c_img["flops"] + c_cap["flops"] + c_den["flops"]
  prep_bytes = c_img["bytes"] + c_cap["bytes"] + c_den["bytes"]
  return {"tile": [ti, tc], "n_tiles": n_tiles, "tile_flops": c_tile["flops"],
          "tile_bytes": c_tile["bytes"], "prep_flops": prep_flops, "prep_bytes": prep_bytes,
          "flops": prep_flops + c_tile["flops"] * n_tiles,
          "bytes": prep_bytes + c_tile["bytes"] * n_tiles, "pairs": n_img * n_cap}


def official_seps_pair_flops(n: int = IMG_TOKENS - 1, d: int = EMBED, cap_len: int = CAP_LEN,
                             dense_len: int = DENSE_LEN, rho: float = 0.5, alpha: float = 0.4,
                             dim_ratio: float = 0.2, cls: int = 1) -> dict:
  """Matmul FLOPs per (image, caption) pair of the official `CrossSparseAggrNet_v2.forward`.

  Per pair and branch (the loop body runs for every caption against every image of the shard):
    text-guided attention  2 N D            (cap mean . every patch)
    aggregation MLP        2 K D H + 2 K H N_c   (re-run on the K kept patches of EVERY pair)
    aggregation bmm        2 N_c K D
    fused token            2 (N - K) D
    HRPA bmm               2 L T D,  T = cls + N_c + 1 tokens, L = text length
  with K = ceil(N rho), N_c = int(N alpha rho), H = int(D dim_ratio). Elementwise work (LayerNorm,
  GELU, softmax, normalize, sort) is left out: it is small next to these and not what XLA's
  'flops' mostly counts either. The per-image self-attention is O(N D) per image, not per pair.
  """
  k = math.ceil(n * rho)
  nc = int(n * alpha * rho)
  h = int(d * dim_ratio)
  t = cls + nc + 1

  def branch(length):
    return 2 * n * d + 2 * k * d * h + 2 * k * h * nc + 2 * nc * k * d + 2 * (n - k) * d + \
        2 * length * t * d

  return {"K": k, "N_c": nc, "H": h, "T": t, "sparse": branch(cap_len),
          "dense": branch(dense_len), "pair": branch(cap_len) + branch(dense_len)}


# ----------------------------------------------------------------------------------------------
# CPU reference rate.
# ----------------------------------------------------------------------------------------------
def cpu_matmul_rate(n: int = 1024, reps: int = 5) -> float:
  """Achieved fp32 GEMM FLOP/s of this machine through XLA (a practical CPU 'peak')."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / float(np.median(times))


def _fmt_s(s: float) -> str:
  return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _print_floors(floors: dict, middle: str) -> None:
  """One line per chip: the bf16 / fp32 floors, `middle` (may name {compute}), the memory time."""
  for chip, fl in floors.items():
    mid = middle.format(compute=_fmt_s(fl.get("compute_bf16_s", 0.0)))
    print(f"    {chip}: floor {_fmt_s(fl['floor_bf16_s'])} (bf16) / "
          f"{_fmt_s(fl['floor_fp32_s'])} {mid}memory {_fmt_s(fl['memory_s'])}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--json", default="", help="write the numbers to this file")
  p.add_argument("--skip_train", action="store_true", help="skip the full-size train steps")
  p.add_argument("--batch", type=int, default=128)
  args = p.parse_args(argv)

  report = {"jax": jax.__version__, "backend": jax.default_backend(), "chips": CHIPS}
  print(f"jax {jax.__version__} on {jax.default_backend()}; lowering/compiling only (no "
        "full-size execution)")

  if not args.skip_train:
    vision, text = full_encoders()
    for name in ("grm", "seps"):
      c = train_step_cost(train_config(name, vision, text, batch=args.batch))
      c["floors"] = floors(c["flops"], c["bytes"])
      report[f"train_{name}"] = c
      print(f"[train {name}] ViT-B/16-224 + BERT-base, batch {args.batch}: "
            f"{c['flops'] / 1e12:.2f} TFLOP, {c['bytes'] / 1e9:.1f} GB accessed, "
            f"{c['params'] / 1e6:.1f} M params (compile {c['compile_s']:.0f} s)")
      _print_floors(c["floors"], "(fp32 matmuls); ")

  for name, fn in (("grm", grm_scoring_cost), ("seps", seps_scoring_cost)):
    c = fn(COCO5K_IMAGES, COCO5K_CAPTIONS)
    c["floors"] = floors(c["flops"], c["bytes"])
    c["flops_per_pair"] = c["flops"] / c["pairs"]
    report[f"coco5k_{name}"] = c
    print(f"[COCO-5K {name}] {c['pairs']:.3g} pairs = {c['n_tiles']} tiles of {c['tile']}: "
          f"{c['flops'] / 1e15:.3f} PFLOP ({c['flops_per_pair'] / 1e6:.2f} MFLOP/pair), "
          f"{c['bytes'] / 1e12:.2f} TB accessed")
    _print_floors(c["floors"], "(fp32); compute {compute}, ")

  off = official_seps_pair_flops()
  total = off["pair"] * COCO5K_IMAGES * COCO5K_CAPTIONS
  report["coco5k_seps_official_count"] = dict(off, total=total, floors=floors(total, 0.0))
  print(f"[COCO-5K official SEPS loop, counted from shapes] K={off['K']} N_c={off['N_c']} "
        f"H={off['H']}: {off['pair'] / 1e6:.2f} MFLOP/pair -> {total / 1e15:.3f} PFLOP; "
        f"H100 compute floor {_fmt_s(total / CHIPS['H100-SXM'][0])} (bf16) / "
        f"{_fmt_s(total / CHIPS['H100-SXM'][1])} (fp32, as it runs)")

  rate = cpu_matmul_rate()
  report["cpu_gemm_flops"] = rate
  print(f"[CPU] fp32 1024^3 GEMM through XLA: {rate / 1e9:.1f} GFLOP/s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1, default=float)
  return report


if __name__ == "__main__":
  main()
