"""Side-by-side speed (and parity) of gseps_jax against the SEPS authors' PyTorch code.

Run:  python benchmarks/vs_official.py                       # everything, default sizes
      python benchmarks/vs_official.py --images 32 --captions 160 --reps 3 --only score
      python benchmarks/vs_official.py --official_dir /path/to/seps --json out.json

Needs the official code (github.com/Sweet4tars/seps, or the fork maxingan2412/seps, at commit
7f4dfa6) in benchmarks/_official/ or at --official_dir; see benchmarks/_official.py for how to get
it and for the one shim used (hub loads -> random HF models from our configs; no torchvision).

One process, one machine, both sides pinned to the same CPU set (`os.sched_setaffinity`, which
bounds XLA's and torch's thread pools alike) and the same thread count (torch.set_num_threads,
OMP/MKL env), printed at start. Repetitions are INTERLEAVED (official, ours, official, ours, ...)
so that both sides see the same background load; medians are reported. Runs unchanged on a GPU
(torch on cuda if available, JAX on its default backend).

Sections:
  score  SEPS all-pairs scoring, official `VSEModel.forward_sim` -> `CrossSparseAggrNet_v2`
         (eval, no_grad) vs our `SEPSHead` (parity mode), ViT-224 token counts (197 image tokens,
         32-token captions, 90-token dense captions, D=512), same random features, aggregation-net
         weights copied across; prints the max abs difference of the two score matrices. One
         dense caption per image, fed to the official code repeated per caption as its data
         loader does, and to ours once per image (`dense_index`; --repeat_dense: repeated too).
  train  one full training step (forward, backward, grad clip, AdamW) of the official VSEModel vs
         our SEPS `trainer.train_step`, identical reduced configs (ViT and BERT 4 layers, width 256,
         112 px, batch 32), random weights; and our GRM step against our SEPS step.
  grm    GRM all-pairs kernel (`similarity.token_similarity`, with token-length buckets) vs a
         straightforward PyTorch version of the same formula (full einsum, then masked max/mean)
         on the same inputs (key-level-like image masks keeping ~70% of 197 tokens, caption
         lengths uniform in 8..32). The XLA FLOP count printed is of the unbucketed kernel.
"""

import argparse
import functools
import json
import os
import sys
import time

TARGETS = {"score": 10.0, "train": 1.5, "grm": 3.0}


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--official_dir", default=None, help="official SEPS checkout (default "
                 "benchmarks/_official)")
  p.add_argument("--only", default="score,train,grm", help="comma list of sections (score, "
                 "train, grm; trainprof: the train step of both sides cut into phases)")
  p.add_argument("--threads", type=int, default=0, help="CPU threads for both sides (0 = all "
                 "CPUs this process may use)")
  p.add_argument("--reps", type=int, default=3, help="timed repetitions per side (interleaved)")
  p.add_argument("--cpu_devices", type=int, default=1, help="score, grm: XLA CPU devices for "
                 "ours (> 1: XLA_FLAGS --xla_force_host_platform_device_count, image rows scored "
                 "per device under shard_map as the evaluator does; the official side is "
                 "unchanged). Use with --only score,grm: train runs on one device")
  p.add_argument("--images", type=int, default=128, help="score: images")
  p.add_argument("--captions", type=int, default=640, help="score: captions (each with a dense "
                 "caption, parity mode)")
  p.add_argument("--chunk", default="32,128", help="score: our pair tile 'images,captions'")
  p.add_argument("--repeat_dense", action="store_true", help="score: give ours the official "
                 "caption-aligned dense layout too (each image's dense caption repeated for its "
                 "captions) instead of each distinct dense caption once")
  p.add_argument("--grm_images", type=int, default=128)
  p.add_argument("--grm_captions", type=int, default=640)
  p.add_argument("--grm_chunk", default="16,64", help="grm: our pair tile")
  p.add_argument("--grm_buckets", default="16", help="grm: token-length buckets of our kernel "
                 "(similarity.token_similarity(buckets=...)): b for both sides or bx,by; 1 = off. "
                 "bx * by tile variants are compiled (the compile time is printed)")
  p.add_argument("--torch_block", type=int, default=16, help="grm: images per torch einsum "
                 "block (bounds its [block, Nc, 197, 32] intermediate)")
  p.add_argument("--batch", type=int, default=32, help="train: batch size")
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--image_size", type=int, default=112)
  p.add_argument("--json", default="", help="write results here")
  return p.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
  # Before importing jax/torch: same CPUs and thread counts for both frameworks.
  _cpus = sorted(os.sched_getaffinity(0))
  if ARGS.threads > 0:
    _cpus = _cpus[:ARGS.threads]
    os.sched_setaffinity(0, _cpus)
  for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = str(len(_cpus))
  if ARGS.cpu_devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={ARGS.cpu_devices}").strip()

import numpy as np  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE)):
  if _p not in sys.path:
    sys.path.insert(0, _p)

import _official  # pylint: disable=g-import-not-at-top
import roofline
from gseps_jax import state as state_lib
from gseps_jax import trainer
from gseps_jax.interop import official_seps
from gseps_jax.models import sdtps
from gseps_jax.models import seps as seps_lib
from gseps_jax.models import similarity

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _sync_torch():
  if DEV == "cuda":
    torch.cuda.synchronize()


def _time(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def interleaved(off_fn, ours_fn, reps):
  """Warm both, then alternate official/ours `reps` times. Returns (off_times, our_times)."""
  off_fn()
  ours_fn()
  off, ours = [], []
  for _ in range(reps):
    off.append(_time(off_fn))
    ours.append(_time(ours_fn))
  return off, ours


def interleaved_many(fns, reps):
  """Warm every side, then run them in turn `reps` times. Returns one list of times per side."""
  for f in fns:
    f()
  times = [[] for _ in fns]
  for _ in range(reps):
    for t, f in zip(times, fns):
      t.append(_time(f))
  return times


def _pair(s):
  a = [int(x) for x in str(s).split(",")]
  return (a[0], a[0]) if len(a) == 1 else (a[0], a[1])


def _rows_per_device(fn, sharded, num_rows, flag):
  """`fn` under jit(shard_map) over all devices, as the evaluator scores: the arguments marked
  in `sharded` are split by rows (images) over the devices, the others replicated; the output's
  rows are split alike."""
  from jax.sharding import Mesh, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  ndev = jax.device_count()
  if num_rows % ndev:
    raise SystemExit(f"{flag} {num_rows} must be divisible by the {ndev} CPU devices.")
  rows = P("rows")
  return jax.jit(jax.shard_map(fn, mesh=Mesh(np.asarray(jax.devices()), ("rows",)),
                               in_specs=tuple(rows if s else P() for s in sharded),
                               out_specs=rows, check_vma=False))


def _verdict(ratio, target):
  return f"{'MET' if ratio >= target else 'MISSED'} (target >= {target:g}x, got {ratio:.2f}x)"


def _lens(rng, n, lo, hi):
  return rng.integers(lo, hi + 1, size=n)


# ----------------------------------------------------------------------------------------------
def bench_score(args, vse, cross_net_mod):
  ni, nc = args.images, args.captions
  n_tok, l_cap, l_den, d = roofline.IMG_TOKENS, roofline.CAP_LEN, roofline.DENSE_LEN, roofline.EMBED
  rng = np.random.default_rng(0)
  img = rng.standard_normal((ni, n_tok, d), np.float32)
  cap = rng.standard_normal((nc, l_cap, d), np.float32)
  # One dense caption per image, as in the data: the official loader repeats it for each of the
  # image's captions (lib/image_caption.py: `long_captions` repeated 5x), so its forward_sim gets
  # a caption-aligned [Nc, ...] tensor; ours gets each once plus caption j's row (dense_index).
  den = rng.standard_normal((ni, l_den, d), np.float32)
  den_len = _lens(rng, ni, 40, l_den)
  cap_img = (np.arange(nc) * ni) // nc  # caption j's image: Nc / Ni consecutive captions each
  cap_len = _lens(rng, nc, 8, l_cap)
  pos = lambda L: np.arange(L)[None]
  cap_mask = pos(l_cap) < cap_len[:, None]
  den_mask = pos(l_den) < den_len[:, None]

  opt = _official.make_opt(num_patches=n_tok - 1)
  torch.manual_seed(0)
  net = cross_net_mod.CrossSparseAggrNet_v2(opt).to(DEV).eval()
  holder = type("Holder", (), {"cross_net": net})()  # forward_sim only reads self.cross_net
  t_img, t_cap, t_den = (torch.from_numpy(a).to(DEV) for a in (img, cap, den[cap_img]))
  t_cl, t_dl = torch.from_numpy(cap_len).to(DEV), torch.from_numpy(den_len[cap_img]).to(DEV)

  def off_run():
    with torch.no_grad():
      out = vse.VSEModel.forward_sim(holder, t_img, t_cap, t_cl, t_den, t_dl)
    _sync_torch()
    return out

  official = {k: v.detach().cpu().numpy() for k, v in net.aggr_net.state_dict().items()}
  params = {"aggr_net": jax.tree.map(jnp.asarray,
                                     official_seps.aggr_net_from_official(official))}
  chunk = _pair(args.chunk)
  # Ours twice: contracting over the K kept patches (gather_kept="on") and over all N with a
  # masked softmax ("off"); "auto" picks one per backend (sdtps.gather_kept_default).
  heads = {g: seps_lib.SEPSHead(num_aggregated=net.keeped_patches, rho=opt.sparse_ratio,
                                dense_mode="parity", gather_kept=g) for g in ("on", "off")}
  # As the evaluation path (`SEPS.score`) calls the head: no gradient, 4 captions per iteration
  # of the kept-patch loop.
  opts = dict(chunk=chunk, gather_batch=sdtps.EVAL_GATHER_BATCH)
  if args.repeat_dense:  # ours on the official caption-aligned layout (no sharing)
    j_args = [jnp.asarray(a) for a in (img, cap, cap_mask, den[cap_img], den_mask[cap_img])]
    scorers = {g: jax.jit(lambda p, *a, h=h: h.apply({"params": p}, *a, **opts))
               for g, h in heads.items()}
  else:
    j_args = [jnp.asarray(a) for a in (img, cap, cap_mask, den, den_mask, cap_img)]
    scorers = {g: jax.jit(lambda p, *a, h=h: h.apply({"params": p}, *a[:5], dense_index=a[5],
                                                       **opts))
               for g, h in heads.items()}
  ndev = jax.device_count()
  if ndev > 1:  # params replicated, images split, texts replicated
    sharded = (False, True) + (False,) * (len(j_args) - 1)
    scorers = {g: _rows_per_device(
        lambda p, *a, h=h: (h.apply({"params": p}, *a, **opts) if args.repeat_dense else
                            h.apply({"params": p}, *a[:5], dense_index=a[5], **opts)),
        sharded, ni, "--images") for g, h in heads.items()}
  runs = {g: (lambda f=f: f(params, *j_args).block_until_ready()) for g, f in scorers.items()}
  auto = "on" if sdtps.gather_kept_default("auto", "official") else "off"

  t0 = time.perf_counter()
  ours = {g: np.asarray(r()) for g, r in runs.items()}
  compile_s = time.perf_counter() - t0
  off = off_run().cpu().numpy()
  diff = float(max(np.max(np.abs(off - o)) for o in ours.values()))
  print(f"[score] parity: max |official - ours| = {diff:.3g} over {ni}x{nc} scores, both "
        f"variants (scores span {off.min():.3f}..{off.max():.3f}); our compile+first runs "
        f"{compile_s:.1f} s")
  times = interleaved_many([off_run, runs["on"], runs["off"]], args.reps)
  t_off, t_on, t_all = times
  pairs = ni * nc
  med = {k: float(np.median(t)) for k, t in zip(("official", "on", "off"), times)}
  m_off, m_ours = med["official"], med[auto]
  ratio = m_off / m_ours
  per_device = " (image rows per device, shard_map)" if ndev > 1 else ""
  layout = ("caption-aligned (repeated)" if args.repeat_dense else
            f"{ni} distinct, shared via dense_index")
  # XLA-counted FLOPs of one prepared image against one caption (sparse + parity dense branch;
  # the per-item preparation excluded): a 1 x 1 tile runs every loop of the scorer once, so the
  # count is exact for both variants. Same shapes as here (roofline's IMG_TOKENS, CAP_LEN, ...).
  flops = {g: roofline.seps_scoring_cost(1, 1, tile=(1, 1), gather_kept=g)["tile_flops"]
           for g in heads}
  print(f"[score] {ni} images x {nc} captions, dense captions: official {nc} caption-aligned, "
        f"ours {layout}; N_c={net.keeped_patches}, chunk {chunk}, ours on {ndev} XLA "
        f"{jax.default_backend()} device(s){per_device}:\n"
        f"        official {m_off:.3f} s ({pairs / m_off:,.0f} pairs/s); ours kept-patch gather "
        f"{med['on']:.3f} s ({pairs / med['on']:,.0f} pairs/s, {m_off / med['on']:.2f}x, "
        f"{flops['on'] / 1e6:.1f} MFLOP per image-caption pair); ours all patches "
        f"{med['off']:.3f} s ({pairs / med['off']:,.0f} pairs/s, {m_off / med['off']:.2f}x, "
        f"{flops['off'] / 1e6:.1f} MFLOP/pair); gather {med['off'] / med['on']:.2f}x faster")
  print(f"[score] ours as configured (gather_kept=auto -> {auto} on {jax.default_backend()}): "
        f"{_verdict(ratio, TARGETS['score'])}")
  return {"images": ni, "captions": nc, "max_abs_diff": diff, "official_s": t_off,
          "ours_s": t_on if auto == "on" else t_all, "ours_gather_s": t_on, "ours_all_s": t_all,
          "official_median_s": m_off, "ours_median_s": m_ours, "ratio": ratio,
          "gather_kept_auto": auto, "ratio_gather": m_off / med["on"],
          "ratio_all_patches": m_off / med["off"], "flops_per_pair": flops,
          "pairs_per_s_official": pairs / m_off, "pairs_per_s_ours": pairs / m_ours,
          "chunk": chunk, "repeat_dense": bool(args.repeat_dense), "devices": ndev}


# ----------------------------------------------------------------------------------------------
def _official_setup(vse, vision, text, batch):
  """The official VSEModel (train mode), its optimizer and the batch as torch tensors.

  Returns (opt, model, optimizer, towers, forward): `towers()` runs the three encoders,
  `forward()` returns the official training loss of the batch."""
  opt = _official.make_opt(max_violation=True)
  torch.manual_seed(0)
  model = _official.build_vse_model(vse, vision, text, opt).to(DEV).train()
  optimizer = vse.create_optimizer(opt, model)
  t = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind in "iu" else v).to(DEV)
       for k, v in batch.items() if k != "image"}
  images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(DEV)  # NCHW

  def towers():
    return (model.img_enc(images), model.txt_enc(t["input_ids"], t["_lens"]),
            model.txt_enc(t["dense_ids"], t["_dense_lens"]))

  def forward():
    return model(images, t["input_ids"], t["_lens"], img_ids=t["image_index"],
                 warmup_alpha=1.0, long_captions=t["dense_ids"], long_lengths=t["_dense_lens"])[0]

  return opt, model, optimizer, towers, forward


def _official_train(args, vse, vision, text, batch):
  del args
  opt, model, optimizer, _, forward = _official_setup(vse, vision, text, batch)

  def step():  # the body of official train.py:train() for one batch
    optimizer.zero_grad()
    loss = forward()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
    optimizer.step()
    _sync_torch()
    return float(loss)

  n_params = sum(p.numel() for p in model.parameters())
  return step, n_params, model.cross_net.keeped_patches


def _our_train(name, vision, text, batch_np, num_aggregated=None, gather_kept="auto"):
  config = roofline.train_config(name, vision, text, batch=batch_np["image"].shape[0])
  if name == "seps":
    config.model.seps.gather_kept = gather_kept
  if name == "seps" and num_aggregated is not None:
    # N_c from the true patch grid on both sides (the official encoder hard-codes 196 patches).
    grid = (vision["image_size"] // vision["patch_size"]) ** 2
    config.model.seps.num_patches = grid
  _, _, step, init = roofline.build_train_step(config)
  jstep = jax.jit(step, donate_argnums=0)
  state = jax.jit(init)()
  batch = {k: jnp.asarray(v) for k, v in roofline._model_batch(batch_np).items()}  # pylint: disable=protected-access
  rng = jax.random.key(1)
  holder = {"state": state}

  def run():
    holder["state"], metrics = jstep(holder["state"], batch, rng)
    jax.block_until_ready(holder["state"])
    return float(metrics["loss"])

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return run, n_params, config


def bench_train(args, vse):
  vision, text = roofline.reduced_encoders(args.width, args.layers, args.image_size)
  cfg = roofline.train_config("seps", vision, text, batch=args.batch)
  batch = roofline.random_batch(cfg, np.random.default_rng(0), args.batch)
  off_step, off_params, off_nc = _official_train(args, vse, vision, text, batch)
  seps_step, seps_params, seps_cfg = _our_train("seps", vision, text, batch, off_nc)
  auto = "on" if sdtps.gather_kept_default("auto", seps_cfg.model.seps.selection) else "off"
  other = "off" if auto == "on" else "on"
  alt_step, _, _ = _our_train("seps", vision, text, batch, off_nc, gather_kept=other)
  grm_step, grm_params, _ = _our_train("grm", vision, text, batch)
  print(f"[train] {args.layers} layers, width {args.width}, {args.image_size} px, batch "
        f"{args.batch}, captions {cfg.data.max_len} / dense {cfg.data.dense_max_len} tokens; "
        f"params official {off_params / 1e6:.2f} M, our SEPS {seps_params / 1e6:.2f} M, "
        f"our GRM {grm_params / 1e6:.2f} M; N_c {off_nc}")
  for name, fn in (("SEPS", seps_step), (f"SEPS gather_kept={other}", alt_step),
                   ("GRM", grm_step)):
    t0 = time.perf_counter()
    fn()
    print(f"[train] our {name} compile + first step {time.perf_counter() - t0:.1f} s")
  t_off, t_seps, t_alt, t_grm = interleaved_many([off_step, seps_step, alt_step, grm_step],
                                                 args.reps)
  m_off, m_seps, m_alt, m_grm = (float(np.median(t)) for t in (t_off, t_seps, t_alt, t_grm))
  ratio = m_off / m_seps
  print(f"[train] SEPS step: official {m_off:.3f} s, ours {m_seps:.3f} s (gather_kept=auto -> "
        f"{auto}; with {other}: {m_alt:.3f} s, {m_off / m_alt:.2f}x) -> "
        f"{_verdict(ratio, TARGETS['train'])}")
  print(f"[train] GRM step (ours) {m_grm:.3f} s = {m_grm / m_seps:.2f}x our SEPS step "
        "(no official GRM code exists)")
  # XLA's FLOP count, for the achieved CPU FLOP/s. GRM only: the SEPS head scores its pairs in
  # loops (one image, and with the gather one caption, per iteration) and XLA's cost analysis
  # counts a loop body once, so a whole-step count would leave most of the head out.
  flops = {"grm": roofline.train_step_cost(
      roofline.train_config("grm", vision, text, batch=args.batch))["flops"]}
  print(f"[train] achieved: our GRM {flops['grm'] / m_grm / 1e9:.1f} GFLOP/s (XLA-counted FLOPs "
        "/ median time)")
  return {"official_s": t_off, "seps_s": t_seps, "seps_alt_s": t_alt, "grm_s": t_grm,
          "official_median_s": m_off, "seps_median_s": m_seps, "seps_alt_median_s": m_alt,
          "gather_kept_auto": auto, "ratio": ratio, "ratio_alt": m_off / m_alt,
          "grm_over_seps": m_grm / m_seps, "xla_flops": flops,
          "params": {"official": off_params, "seps": seps_params, "grm": grm_params}}


def bench_train_profile(args, vse):
  """Where the two SEPS train steps spend their time: the same step cut into cumulative phases
  on each side (encoders forward; whole forward with the head and loss; forward + backward;
  the full step with clipping and AdamW), interleaved; differences attribute the time."""
  vision, text = roofline.reduced_encoders(args.width, args.layers, args.image_size)
  cfg = roofline.train_config("seps", vision, text, batch=args.batch)
  batch = roofline.random_batch(cfg, np.random.default_rng(0), args.batch)
  opt, model, optimizer, towers, forward = _official_setup(vse, vision, text, batch)

  def off(phase):
    def run():
      optimizer.zero_grad()
      if phase == "towers":
        with torch.no_grad():  # forward cost only; autograd bookkeeping is in the next phases
          towers()
      elif phase == "towers_bwd":
        sum(x.float().sum() for x in towers()).backward()
      elif phase == "forward":
        with torch.no_grad():
          forward()
      else:
        forward().backward()
        if phase == "step":
          torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
          optimizer.step()
      _sync_torch()
    return run

  config = roofline.train_config("seps", vision, text, batch=args.batch)
  config.model.seps.num_patches = (vision["image_size"] // vision["patch_size"]) ** 2
  ours_model, tx, step, init = roofline.build_train_step(config)
  state = jax.jit(init)()
  jbatch = {k: jnp.asarray(v) for k, v in roofline._model_batch(batch).items()}  # pylint: disable=protected-access
  rng = jax.random.key(1)
  rngs = state_lib.train_rngs(rng)

  def tower_sum(p):
    reps = ours_model.apply({"params": p}, jbatch, train=True, rngs=rngs,
                            method=ours_model.towers)
    return sum(jnp.sum(x) for x in jax.tree.leaves(reps) if jnp.issubdtype(x.dtype,
                                                                           jnp.floating))

  loss = functools.partial(trainer.loss_fn, batch=jbatch, rng=rng, step=jnp.int32(10**6),
                           model=ours_model, config=config, steps_per_epoch=1000)
  fns = {"towers": jax.jit(tower_sum), "towers_bwd": jax.jit(jax.grad(tower_sum)),
         "forward": jax.jit(lambda p: loss(p)[0]), "backward": jax.jit(jax.grad(
             lambda p: loss(p)[0]))}
  step_j = jax.jit(step)
  holder = {"state": state}

  def ours(phase):
    def run():
      if phase == "step":
        holder["state"], _ = step_j(holder["state"], jbatch, rng)
        jax.block_until_ready(holder["state"])
      else:
        jax.block_until_ready(fns[phase](holder["state"].params))
    return run

  phases = ("towers", "towers_bwd", "forward", "backward", "step")
  runs = [f(ph) for ph in phases for f in (off, ours)]
  times = interleaved_many(runs, args.reps)
  med = [float(np.median(x)) for x in times]
  print(f"[trainprof] {args.layers} layers, width {args.width}, {args.image_size} px, batch "
        f"{args.batch}; cumulative phases, medians of {args.reps} interleaved runs")
  print("| phase | official s | ours s | official / ours |\n|---|---|---|---|")
  out = {}
  for i, ph in enumerate(phases):
    o, u = med[2 * i], med[2 * i + 1]
    out[ph] = {"official_s": o, "ours_s": u}
    print(f"| {ph} | {o:.3f} | {u:.3f} | {o / u:.2f}x |")
  return out


# ----------------------------------------------------------------------------------------------
def torch_token_similarity(x, xm, y, ym, block):
  """The GRM formula the straightforward way: full cosine einsum, then masked max / mean.

  x [Bx, Lx, D], xm [Bx, Lx] bool, y [By, Ly, D], ym [By, Ly] bool -> [Bx, By] (both directions,
  halved). Images are processed `block` at a time so that [block, By, Lx, Ly] fits in memory.
  """
  xn = torch.nn.functional.normalize(x, dim=-1) * xm[..., None]
  yn = torch.nn.functional.normalize(y, dim=-1) * ym[..., None]
  out = []
  ym4 = ym[None, :, None, :]
  for i in range(0, x.shape[0], block):
    s = torch.einsum("ild,jmd->ijlm", xn[i:i + block], yn)
    xm4 = xm[i:i + block, None, :, None]
    x2y = s.masked_fill(~ym4, -1e4).amax(3)  # [b, By, Lx]
    xc = xm[i:i + block, None, :].float()
    x2y = (x2y * xc).sum(-1) / xc.sum(-1).clamp(min=1)
    y2x = s.masked_fill(~xm4, -1e4).amax(2)  # [b, By, Ly]
    yc = ym[None].float()
    y2x = (y2x * yc).sum(-1) / yc.sum(-1).clamp(min=1)
    out.append(0.5 * (x2y + y2x))
  return torch.cat(out, 0)


def bench_grm(args):
  ni, nc = args.grm_images, args.grm_captions
  rng = np.random.default_rng(1)
  lx, ly, d = roofline.IMG_TOKENS, roofline.CAP_LEN, roofline.EMBED
  x = rng.standard_normal((ni, lx, d), np.float32)
  y = rng.standard_normal((nc, ly, d), np.float32)
  xm = rng.random((ni, lx)) < 0.7  # as a key-level saliency mask
  xm[:, 0] = True
  ym = np.arange(ly)[None] < _lens(rng, nc, 8, ly)[:, None]
  tx, ty = torch.from_numpy(x).to(DEV), torch.from_numpy(y).to(DEV)
  txm, tym = torch.from_numpy(xm).to(DEV), torch.from_numpy(ym).to(DEV)

  def off_run():
    with torch.no_grad():
      out = torch_token_similarity(tx, txm, ty, tym, args.torch_block)
    _sync_torch()
    return out

  chunk = _pair(args.grm_chunk)
  jx, jxm, jy, jym = (jnp.asarray(a) for a in (x, xm, y, ym))
  buckets = _pair(args.grm_buckets)
  kernel = functools.partial(similarity.token_similarity, chunk=chunk, buckets=buckets)
  ndev = jax.device_count()
  if ndev > 1:  # image tokens and masks split, captions replicated
    kernel = _rows_per_device(kernel, (True, True, False, False), ni, "--grm_images")

  def ours_run():
    return kernel(jx, jxm, jy, jym).block_until_ready()

  t0 = time.perf_counter()
  first = np.asarray(ours_run())  # compiles: bx * by tile variants
  compile_s = time.perf_counter() - t0
  diff = float(np.max(np.abs(off_run().cpu().numpy() - first)))
  t_off, t_ours = interleaved(off_run, ours_run, args.reps)
  m_off, m_ours = float(np.median(t_off)), float(np.median(t_ours))
  ratio = m_off / m_ours
  pairs = ni * nc
  flops = roofline.cost_of(
      lambda *a: similarity.token_similarity(*a, chunk=None),
      *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (jx, jxm, jy, jym)))["flops"]
  print(f"[grm] kernel {ni} x {nc} (197 x 32 tokens): max |torch - ours| = {diff:.3g}; "
        f"torch formula {m_off:.3f} s ({pairs / m_off:,.0f} pairs/s), ours {m_ours:.3f} s "
        f"({pairs / m_ours:,.0f} pairs/s; {flops / m_ours / 1e9:.1f} GFLOP/s XLA-counted), "
        f"chunk {chunk}, buckets {buckets} (first call, compile included: {compile_s:.1f} s), "
        f"{ndev} XLA device(s) -> "
        f"{_verdict(ratio, TARGETS['grm'])}")
  return {"images": ni, "captions": nc, "max_abs_diff": diff, "official_s": t_off,
          "ours_s": t_ours, "official_median_s": m_off, "ours_median_s": m_ours,
          "ratio": ratio, "xla_flops": flops, "chunk": chunk, "buckets": buckets,
          "first_call_s": compile_s, "devices": ndev}


def main(args):
  sections = [s.strip() for s in args.only.split(",") if s.strip()]
  vse = cross = None
  if any(s in sections for s in ("score", "train", "trainprof")):
    try:
      vse, cross, path = _official.import_official(args.official_dir)
    except _official.OfficialCodeMissing as err:
      sys.exit(str(err))
    print(f"official code: {path} @ commit {_official.commit_of(path)} "
          f"({_official.OFFICIAL_REPOS[0]}, fork {_official.OFFICIAL_REPOS[1]})")
  cpus = sorted(os.sched_getaffinity(0))
  torch.set_num_threads(len(cpus))
  print(f"device: torch {torch.__version__} on {DEV}, jax {jax.__version__} on "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}); CPUs {cpus}; "
        f"torch.get_num_threads()={torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; reps {args.reps} (interleaved, "
        "medians)")
  results = {"device": {"torch": DEV, "jax": jax.default_backend(), "cpus": cpus,
                        "torch_threads": torch.get_num_threads()}}
  if "score" in sections:
    results["score"] = bench_score(args, vse, cross)
  if "train" in sections:
    results["train"] = bench_train(args, vse)
  if "trainprof" in sections:
    results["trainprof"] = bench_train_profile(args, vse)
  if "grm" in sections:
    results["grm"] = bench_grm(args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1, default=float)
  return results


if __name__ == "__main__":
  main(ARGS)
