r"""The demo's comparison table: five models on the generated data, at equal steps and at equal
wall-clock, next to the measured ceiling of the test split.

  python benchmarks/demo_table.py --steps=800 --budget_s=420            # the full table
  python benchmarks/demo_table.py --steps=20 --budget_s=30 --models=pooled,grm   # a short run

Models (every one on the demo's data, ViT, cached frozen MiniLM features, batch, optimiser and
schedule; configs/grm_vit.py:demo unless said otherwise):
  pooled  (a) global embeddings: mean-pooled projected tokens, cosine score, InfoNCE.
  tokens  (b) the token-level model with the ori level only (the GRM kernel on V, T), InfoNCE.
  grm     (c) full GRM (configs/grm_vit.py:demo).
  seps    (d) SEPS (configs/seps_vit.py:demo: its hinge recipe, honest dense captions).
  laps    (e) LAPS (configs/laps_vit.py:demo).

Text tower (`--text_tower`): `frozen` (default, the demo's: the pretrained MiniLM as a fixed
feature extractor, its cached token features) or `scratch` (a 2-layer, 128-wide text transformer
with MiniLM's vocabulary, trained from random init at the full lr with everything else): the
control for "is the pooled model's lead the frozen sentence-embedding tower?"
(docs/benchmarks.md, session 31). Each row reports `text_change`, the largest change of a text
tower parameter over the run (0 for the frozen tower).

Regimes: `steps` trains each model for --steps steps (cosine horizon = --steps); `time` trains
each for --budget_s seconds of training (evaluation not counted), its cosine horizon set to the
steps its own `steps` run showed it makes in that time (or --time_horizon when given). Both
report test rSum, R@1 both ways, steps and seconds.

Ceiling: some captions describe several test images (a caption that names shapes and positions
but not colours fits both twins of a colour pair). From the generator's ground truth
(`scenes.split_ground_truth`), a Bayes-optimal model ranks, for each caption, the images it
fits first (t2i R@K = min(1, K / k) for a caption that fits k images) and, for each image, the
captions that fit it first, those fitting fewer images ahead (a caption fitting k images is the
image's own with probability 1 / k); ties in random order. Expected R@K of that ranking, summed,
is the ceiling rSum (`ceiling`).

The numbers depend on the machine and its load (docs/benchmarks.md records them with the
conditions); equal-step rows are the load-independent comparison.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position

MODELS = ("pooled", "tokens", "grm", "seps", "laps")
LABELS = {"pooled": "(a) mean-pooled global", "tokens": "(b) token-level, ori only",
          "grm": "(c) GRM", "seps": "(d) SEPS", "laps": "(e) LAPS"}


# ---------------------------------------------------------------------------------------------
# Ceiling.


def expected_recall_ties(k_fit: int, n_own: int, K: int) -> float:
  """P(at least one of `n_own` relevant items is in the top K) when `k_fit` items (the relevant
  ones among them) tie at the top in random order."""
  if K >= k_fit:
    return 1.0
  return 1.0 - math.comb(k_fit - n_own, K) / math.comb(k_fit, K)


def expected_recall_groups(groups: list[tuple[int, int]], K: int) -> float:
  """P(at least one relevant item in the top K) for a ranking made of tie groups.

  Args:
    groups: `(size, relevant)` per tie group, in rank order (the whole first group ranks above
      the second, ...; inside a group the order is random).
    K: the cut-off.
  """
  for size, relevant in groups:
    if K >= size:
      if relevant:
        return 1.0
      K -= size
    else:
      return expected_recall_ties(size, relevant, K) if relevant else 0.0
  return 0.0


def ceiling(seed: int, split: str, num_images: int) -> dict:
  """Expected R@1/5/10 both ways and rSum of a perfect (Bayes-optimal) model on a generated split.

  From the generator's ground truth: caption c fits the set F(c) of test images it is true of
  (its own image and, e.g., the twin that differs in an attribute c does not name), k(c) = |F(c)|.
  - t2i: every image of F(c) is equally likely to be the one c was written for, so the best a
    model can do is rank F(c) first in any order: R@K = min(1, K / k(c)).
  - i2t: among the captions that fit image i, caption c is i's own with probability 1 / k(c);
    the optimal ranking puts the captions fitting fewer images first (ties in random order).
    A caption that fits only i (e.g. one naming every attribute) therefore ranks above one that
    also fits its twin. (The first version of this bound ranked every fitting caption as one tie,
    which a trained pooled model beat: i2t R@1 80.6 against a "ceiling" of 75.2.)
  Both are expectations over the random tie order.
  """
  from gseps_jax.data import scenes  # pylint: disable=g-import-not-at-top
  gt = scenes.split_ground_truth(seed, split, num_images)
  t2i_k = [len(s) for caps in gt for s in caps]
  # For each image, the k of every caption that fits it, and whether that caption is its own.
  fitting: list[list[tuple[int, bool]]] = [[] for _ in range(num_images)]
  for owner, caps in enumerate(gt):
    for s in caps:
      for i in s:
        fitting[i].append((len(s), i == owner))
  out = {}
  for K in (1, 5, 10):
    out[f"t2i_r{K}"] = 100.0 * float(np.mean([expected_recall_ties(k, 1, K) for k in t2i_k]))
    i2t = []
    for caps in fitting:
      groups = {}
      for k, own in caps:
        size, rel = groups.get(k, (0, 0))
        groups[k] = (size + 1, rel + int(own))
      i2t.append(expected_recall_groups([groups[k] for k in sorted(groups)], K))
    out[f"i2t_r{K}"] = 100.0 * float(np.mean(i2t))
  out["rsum"] = sum(out[f"{d}_r{K}"] for d in ("i2t", "t2i") for K in (1, 5, 10))
  out["captions_fitting_several"] = float(np.mean(np.array(t2i_k) > 1))
  return out


# ---------------------------------------------------------------------------------------------
# The two baselines as models with the project's model interface.


def _baseline_module():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from gseps_jax.models import encoders  # pylint: disable=g-import-not-at-top
  from gseps_jax.models.similarity import token_similarity  # pylint: disable=g-import-not-at-top

  def unit(x):  # x * rsqrt(|x|^2 + eps): finite gradient at all-zero padding
    return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)

  class Baseline(nn.Module):
    """ViT + cached frozen text features, projected to embed_dim; `pooling`: "mean" (global
    embeddings, cosine) or "tokens" (the GRM kernel on all tokens: the ori level alone)."""
    config: Any
    pooling: str
    uses_dense = False  # the model interface the Evaluator asks (models/grm.py has it all)
    tokenizes_dense = False

    def score_options(self, dense_mode=None, caption_image=None) -> dict:
      del dense_mode, caption_image
      return {}

    def setup(self):
      c = self.config
      self.vision_encoder = encoders.encoder_from_config(c.vision, jnp.float32)
      self.text_encoder = encoders.encoder_from_config(c.text, jnp.float32)
      self.vision_proj = nn.Dense(c.embed_dim)
      self.text_proj = nn.Dense(c.embed_dim)
      self.log_temperature = self.param("log_temperature",
                                        nn.initializers.constant(math.log(0.07)), ())

    def encode_images(self, images, *, train=False):
      v = self.vision_proj(self.vision_encoder(images, train=train))
      return {"tok": v, "mask": jnp.ones(v.shape[:2], bool)}

    def encode_texts(self, input_ids, attention_mask, text_hidden=None, *, train=False):
      if not self.config.freeze_text:  # --text_tower=scratch: the tower trains
        t = self.text_encoder(input_ids, attention_mask, train=train)
        return {"tok": self.text_proj(t), "mask": attention_mask.astype(bool)}
      # The frozen tower runs deterministically.
      t = (self.text_encoder(input_ids, attention_mask, train=False) if text_hidden is None
           else jnp.asarray(text_hidden, jnp.float32))
      t = self.text_proj(jax.lax.stop_gradient(t))
      return {"tok": t, "mask": attention_mask.astype(bool)}

    def score(self, img, txt, dense_feats=None, *, chunk=None):
      del dense_feats
      if self.pooling == "mean":
        def pool(f):
          m = f["mask"][..., None].astype(jnp.float32)
          return unit(jnp.sum(f["tok"] * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0))
        return pool(img) @ pool(txt).T
      return token_similarity(img["tok"], img["mask"], txt["tok"], txt["mask"], chunk=chunk)

    def __call__(self, batch, *, train):
      img = self.encode_images(batch["image"], train=train)
      txt = self.encode_texts(batch["input_ids"], batch["attention_mask"],
                              batch.get("text_hidden"), train=train)
      return {"ori": self.score(img, txt)}, {}

  return Baseline


# ---------------------------------------------------------------------------------------------
# Configs and runs.


def make_config(name: str, args):
  import ml_collections  # pylint: disable=g-import-not-at-top

  from configs import common, grm_vit, laps_vit, seps_vit  # pylint: disable=g-import-not-at-top
  mod = {"seps": seps_vit, "laps": laps_vit}.get(name, grm_vit)
  c = mod.get_config(",".join(["demo"] + ([args.variant] if args.variant else [])))
  if name in ("pooled", "tokens"):
    c.model.name = name
    c.model[name] = ml_collections.ConfigDict(dict(level_weights={"ori": 1.0}))
    c.loss.kind = "infonce"
  c.data.data_dir = args.data_dir
  if args.num_train:
    c.data.synthetic.num_train = args.num_train
  if args.num_test:
    c.data.synthetic.num_test = args.num_test
  if args.batch_size:
    c.train.batch_size = args.batch_size
  c.train.final_eval_split = args.split
  if args.text_tower == "scratch":
    c.model.text = ml_collections.ConfigDict(dict(
        common.BERT_BASE, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    c.model.freeze_text = False  # (and so no cached features: text_cache.enabled)
    c.optim.backbone_patterns = ()  # trained at the full lr, like the from-scratch ViT
    c.optim.frozen_patterns = ()
  return c


def build(name: str, config):
  from gseps_jax import models  # pylint: disable=g-import-not-at-top
  if name in ("pooled", "tokens"):
    return _baseline_module()(config=config.model, pooling="mean" if name == "pooled" else
                              "tokens")
  return models.build_model(config.model)


def run(name: str, args, *, steps: int | None, budget_s: float | None, horizon: int) -> dict:
  """Trains model `name` until `steps` or `budget_s` seconds of training, evaluates on the test
  split; returns {rsum, i2t_r1, t2i_r1, steps, seconds, ...}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from gseps_jax import evaluator as eval_lib  # pylint: disable=g-import-not-at-top
  from gseps_jax import optim, sharding, trainer  # pylint: disable=g-import-not-at-top
  from gseps_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from gseps_jax.interop import hf as hf_import  # pylint: disable=g-import-not-at-top

  config = make_config(name, args)
  if hasattr(pipeline, "resolve_dense_max_len"):
    pipeline.resolve_dense_max_len(config)
  config.train.max_steps = horizon
  model = build(name, config)
  data = pipeline.TrainLoader.from_config(config, global_batch_size=config.train.batch_size,
                                         seed=config.seed, tokenizes_dense=model.tokenizes_dense,
                                         uses_dense=model.uses_dense)
  spe = data.steps_per_epoch
  key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(key)
  params = state_lib.init_params(model, state_lib.sample_batch(config), init_key, split=False)
  if config.model.freeze_text:  # the pretrained tower; --text_tower=scratch keeps the random init
    params["text_encoder"] = jax.tree.map(jnp.asarray, hf_import.load_hf_encoder(
        config.model.text_hf_dir)[1])
  text_start = jax.tree.map(np.array, params["text_encoder"])  # a copy: the state is donated
  tx, _, _ = optim.make_optimizer(config.optim, spe, params, total_steps=horizon)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params))
  step_fn = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx, config=config,
                                      steps_per_epoch=spe), donate_argnums=(0,))
  limit = steps if steps is not None else horizon
  trained, done = 0.0, 0
  first = None
  while done < limit:
    t0 = time.time()
    state, metrics = step_fn(state, next(data), step_key)
    if done % 10 == 0 or done == limit - 1:
      float(metrics["loss"])  # block: the clock must see the work
    done += 1
    if done == 1:  # the first step compiles: not training time
      jax.block_until_ready(state.params)
      first = time.time() - t0
      continue
    trained += time.time() - t0
    if budget_s is not None and trained >= budget_s:
      break
  jax.block_until_ready(state.params)
  loss = float(metrics["loss"])
  text_change = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(
      jax.tree.leaves(state.params["text_encoder"]), jax.tree.leaves(text_start)))
  data.close()
  mesh = sharding.make_mesh(config.mesh)
  t_eval = time.time()
  with jax.set_mesh(mesh):
    m = eval_lib.Evaluator(config, model, mesh, split=args.split).run(state.params)
  return {"model": name, "steps": done, "train_s": trained, "compile_s": first,
          "steps_per_s": (done - 1) / max(trained, 1e-9), "final_loss": loss,
          "text_tower": args.text_tower, "text_change": text_change,
          "eval_s": time.time() - t_eval,
          **{k: m[k] for k in ("rsum", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10",
                               "t2i_r10")}}


def table(rows: list[dict], ceil: dict) -> str:
  head = (f"| {'model':<26} | {'regime':<22} | {'steps':>5} | {'train s':>7} | {'steps/s':>7} | "
          f"{'R@1 i2t':>7} | {'R@1 t2i':>7} | {'rSum':>6} |")
  lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
  for r in rows:
    lines.append(f"| {LABELS[r['model']]:<26} | {r['regime']:<22} | {r['steps']:>5} | "
                 f"{r['train_s']:>7.1f} | {r['steps_per_s']:>7.2f} | {r['i2t_r1']:>7.1f} | "
                 f"{r['t2i_r1']:>7.1f} | {r['rsum']:>6.1f} |")
  lines.append(f"| {'ceiling (perfect model)':<26} | {'':<22} | {'':>5} | {'':>7} | {'':>7} | "
               f"{ceil['i2t_r1']:>7.1f} | {ceil['t2i_r1']:>7.1f} | {ceil['rsum']:>6.1f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--modes", default="steps,time", help="steps, time or both")
  p.add_argument("--steps", type=int, default=800, help="equal-steps regime: steps per model")
  p.add_argument("--budget_s", type=float, default=420.0,
                 help="equal wall-clock regime: training seconds per model")
  p.add_argument("--time_horizon", type=int, default=0,
                 help="cosine horizon of the time regime (0: from the model's steps run)")
  p.add_argument("--batch_size", type=int, default=0, help="0: the demo's")
  p.add_argument("--variant", default="", help="extra config variant appended to 'demo', e.g. "
                 "'direction=y2x' (GRM head fields; applies to every model's config file)")
  p.add_argument("--text_tower", choices=("frozen", "scratch"), default="frozen",
                 help="frozen: the demo's pretrained MiniLM, cached features; scratch: a small "
                 "text transformer trained from random init (see the module docstring)")
  p.add_argument("--num_train", type=int, default=0, help="0: the demo's generated train size")
  p.add_argument("--num_test", type=int, default=0, help="0: the demo's generated test size")
  p.add_argument("--data_dir", default="data_cache/tfds")
  p.add_argument("--split", default="test")
  p.add_argument("--out", default="", help="also write the rows as JSON here")
  p.add_argument("--ceiling_only", action="store_true")
  args = p.parse_args(argv)
  names = [m for m in args.models.split(",") if m]
  unknown = set(names) - set(MODELS)
  if unknown:
    p.error(f"unknown --models {sorted(unknown)}; known: {MODELS}")
  modes = [m for m in args.modes.split(",") if m]
  tag = " scratch text" if args.text_tower == "scratch" else ""

  base = make_config("grm", args)
  syn = base.data.synthetic
  n_split = {"train": syn.num_train, "dev": syn.num_dev, "test": syn.num_test}[args.split]
  ceil = ceiling(syn.seed, args.split, n_split)
  print(f"ceiling on generated {args.split} ({n_split} images, seed {syn.seed}): rSum "
        f"{ceil['rsum']:.1f}, R@1 i2t {ceil['i2t_r1']:.1f} / t2i {ceil['t2i_r1']:.1f}; "
        f"{100 * ceil['captions_fitting_several']:.1f}% of captions fit several images",
        flush=True)
  rows = []
  if not args.ceiling_only:
    rates = {}
    for name in names:
      if "steps" in modes:
        r = run(name, args, steps=args.steps, budget_s=None, horizon=args.steps)
        r["regime"] = f"{args.steps} steps{tag}"
        rates[name] = r["steps_per_s"]
        rows.append(r)
        print(json.dumps(r), flush=True)
      if "time" in modes:
        horizon = args.time_horizon or (
            max(2, int(rates[name] * args.budget_s)) if name in rates else args.steps)
        r = run(name, args, steps=None, budget_s=args.budget_s, horizon=horizon)
        r["regime"] = f"{args.budget_s:.0f} s{tag}"
        rows.append(r)
        print(json.dumps(r), flush=True)
  print(table(rows, ceil))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rows": rows, "ceiling": ceil, "args": vars(args)}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
