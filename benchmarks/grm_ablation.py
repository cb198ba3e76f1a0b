"""GRM ablation on the generated demo data at equal steps (issue 18; table in docs/benchmarks.md).

Run:  python benchmarks/grm_ablation.py --steps=600 --workdir=/tmp/grm_ablation
      python benchmarks/grm_ablation.py --steps=600 --variants=full,ori_only   # a subset

Every variant trains `configs/grm_vit.py:demo` (the README demo: generated `synthetic_regions`
data, small ViT from scratch, frozen MiniLM text tower) for exactly `--steps` steps from the same
seed (no wall-clock budget), then scores the whole test split ("full" protocol: every image
against every caption). Variants (switches of `grm_defaults`, configs/grm_vit.py):

  full        GRM as configured
  no_sa       use_sa=False: every image token kept
  no_ga       use_ga=False: every word kept
  no_regions  use_regions=False: no region prompts, so no unc level (score 0.5 ori + 0.5 key)
  no_unc      use_uncertainty=False: sigma = 0 (u = mu in training)
  ori_only    level weights {ori: 1}, no SA/GA/regions: the plain token-level dual encoder

For `full`, the trained checkpoint is also rescored with each level alone (level weights
{ori: 1}, {key: 1}, {unc: 1}; the fingerprint lets the checkpoint restore under other level
weights). Reported per variant: test rSum and R@1s, the evaluation keep ratios (image, text),
and the training metrics at the last step (region_cos = overlap of the region maps,
region_mean_cos, keep ratios).

`--redundancy` prints instead how much of each side a saliency adapter could drop without losing
what tells a caption's image apart (no training): the fraction of the ViT's patches that hold
any object pixel on the generated images, and the fraction of caption word pieces that name an
attribute (colour, shape, size, position, count) on the generated captions, against the same
fraction of content words on real Flickr30K test captions (tests/data/f30k). `--saliency=WORKDIR`
prints what a trained GRM's adapters keep on generated test images: object vs background
patches, attribute vs other words.

Output: a Markdown table on stdout and `<workdir>/ablation.json`. Variants are independent: on
a shared machine they can run as separate processes (one `--variants=NAME` each, own
`--workdir`), then `--collect DIR1 DIR2 ...` prints one table from their ablation.json files.
"""

import argparse
import json
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ("full", "no_sa", "no_ga", "no_regions", "no_unc", "ori_only")


def variant_config(name: str, steps: int, base: str = "demo"):
  """The demo config with the ablation `name` applied, trained for exactly `steps` steps."""
  from configs import grm_vit  # pylint: disable=g-import-not-at-top
  c = grm_vit.get_config(base)
  g = c.model.grm
  if name == "no_sa":
    g.use_sa = False
  elif name == "no_ga":
    g.use_ga = False
  elif name == "no_regions":
    g.use_regions = False
    g.level_weights = dict(ori=0.5, key=0.5, unc=0.0)
  elif name == "no_unc":
    g.use_uncertainty = False
  elif name == "ori_only":
    g.use_sa = g.use_ga = g.use_regions = False
    g.level_weights = dict(ori=1.0, key=0.0, unc=0.0)
  elif name != "full":
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
  c.train.max_steps = steps
  c.train.max_minutes = -1.0  # equal steps, whatever the machine's speed
  c.train.eval_every = 0
  c.train.final_eval_split = "test"
  c.checkpoint.every_steps = max(steps, 1)
  c.checkpoint.keep_best = False
  return c


def rescore_levels(config, workdir: str) -> dict:
  """Test rSum of each level alone, from the checkpoint in `workdir` (no retraining)."""
  from gseps_jax import evaluator as eval_lib  # pylint: disable=g-import-not-at-top
  from gseps_jax import sharding  # pylint: disable=g-import-not-at-top
  from gseps_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for level in ("ori", "key", "unc"):
    c = config.copy_and_resolve_references()
    c.model.grm.level_weights = {k: float(k == level) for k in ("ori", "key", "unc")}
    mesh = sharding.make_mesh(c.mesh)
    c, model, params, _ = state_lib.restore_params(workdir, mesh, c)
    m = eval_lib.Evaluator(c, model, mesh, split="test").run(params)
    out[level] = m["rsum"]
  return out


def run_variant(name: str, steps: int, root: str, base: str) -> dict:
  from gseps_jax import trainer  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(root, name)
  if os.path.exists(workdir):  # equal steps from scratch, never a resumed run
    shutil.rmtree(workdir)
  config = variant_config(name, steps, base)
  t0 = time.time()
  res = trainer.train_and_evaluate(config, workdir)
  row = {"variant": name, "steps": res["step"], "minutes": (time.time() - t0) / 60,
         "test": res["test"], "train": res["train"]}
  if name == "full":
    try:
      row["levels"] = rescore_levels(config, workdir)
    except Exception as e:  # pylint: disable=broad-except
      row["levels_error"] = repr(e)  # keep the trained variant's row
  return row


# Function words of English captions (closed classes: articles, prepositions, pronouns,
# auxiliaries, conjunctions) and punctuation; every other word counts as content.
FUNCTION_WORDS = frozenset("""
a an the this that these those some each other
of in on at to for with from by into onto over under near next behind while as
is are was were be being been has have his her their its it he she they them him who which
and or but there here up down out off , . : ; ' " - ! ?
""".split())
_WORD = re.compile(r"\w+|[^\w\s]")  # words and punctuation, as the generator counts them


def redundancy(seed: int = 0, split: str = "test", num_images: int = 500, image_size: int = 32,
               patch: int = 8, f30k_caps: str = "") -> dict:
  """How much of each side carries what discriminates (no model involved).

  Returns dict: 'object_patch_frac' (mean over images of the fraction of the (image_size /
  patch)^2 patches holding any object pixel), 'object_patches_mean', 'patches', 'attr_word_frac'
  (fraction of the generated captions' words that name an attribute: colour, shape, size,
  position or count word), 'f30k_content_frac' (fraction of Flickr30K caption words that are not
  function words or punctuation; when `f30k_caps` is given).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gseps_jax.data import scenes  # pylint: disable=g-import-not-at-top
  g = image_size // patch
  fracs = []
  words = attr = 0
  attr_words = _attribute_words()
  for pair in range((num_images + 1) // 2):
    for scene, _, caps in scenes.pair_scenes(seed, split, pair):
      fracs.append(_object_patches(scenes.render_scene(scene, image_size), patch).mean())
      for c in caps:
        toks = _WORD.findall(c.lower())
        words += len(toks)
        attr += sum(t in attr_words for t in toks)
  out = {"patches": g * g, "object_patch_frac": float(np.mean(fracs)),
         "object_patches_mean": float(np.mean(fracs) * g * g),
         "attr_word_frac": attr / max(words, 1)}
  if f30k_caps:
    n = content = 0
    with open(f30k_caps, encoding="utf-8") as f:
      for line in f:
        toks = _WORD.findall(line.lower())
        n += len(toks)
        content += sum(t not in FUNCTION_WORDS for t in toks)
    out["f30k_content_frac"] = content / max(n, 1)
  return out


def _object_patches(image, patch: int):
  """`[g, g]` bool: which patch of a generated image holds any object pixel."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gseps_jax.data import scenes  # pylint: disable=g-import-not-at-top
  obj = np.any(np.abs(image.astype(np.int32) - np.array(scenes.BACKGROUND)) > 8, axis=-1)
  g = image.shape[0] // patch
  return obj[:g * patch, :g * patch].reshape(g, patch, g, patch).any(axis=(1, 3))


def saliency(workdir: str, num_images: int = 200) -> dict:
  """What the trained adapters keep at evaluation, against what carries the content.

  For the first `num_images` generated test images and their first caption: the fraction of
  object patches and of background patches SA keeps, and the fraction of attribute words
  (colour, shape, size, position, count) and of the other words GA keeps. An adapter that
  learned saliency keeps objects and attribute words more often than the rest.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gseps_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from gseps_jax.data import scenes  # pylint: disable=g-import-not-at-top
  from gseps_jax.explain import Explainer  # pylint: disable=g-import-not-at-top
  config, model, params, _ = state_lib.restore_params(workdir)
  ex = Explainer(config, model, params)
  size, patch = config.data.image_size, config.model.vision.patch_size
  attr_words = _attribute_words()
  kept = {"object": [], "background": [], "attribute": [], "other": []}
  for pair in range((num_images + 1) // 2):
    for scene, _, caps in scenes.pair_scenes(config.data.synthetic.seed, "test", pair):
      image = scenes.render_scene(scene, size)
      a = ex.arrays(image, caps[0])
      obj = _object_patches(image, patch)
      kept["object"].extend(a["kept_patches"][obj])
      kept["background"].extend(a["kept_patches"][~obj])
      is_attr = np.array([w in attr_words for w in a["words"]])
      kept["attribute"].extend(a["text_kept"][is_attr])
      kept["other"].extend(a["text_kept"][~is_attr])
  return {f"keep_{k}": float(np.mean(v)) for k, v in kept.items()} | {
      f"n_{k}": len(v) for k, v in kept.items()}


def _attribute_words() -> set:
  from gseps_jax.data import scenes  # pylint: disable=g-import-not-at-top
  return (set(scenes.COLOURS) | set(scenes.SHAPES) | {s + "s" for s in scenes.SHAPES}
          | set(scenes.SIZES) | set(scenes.NUMBERS)
          | {w for p in scenes.POSITIONS.values() for w in p.split()})


def fmt(x, spec=".1f"):
  return "-" if x is None else format(x, spec)


def table(rows) -> str:
  head = ("| variant | steps | test rSum | i2t R@1 | t2i R@1 | eval keep img | eval keep txt | "
          "train region_cos | train region_mean_cos | train keep img | train keep txt |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    t, tr = r["test"], r["train"]
    lines.append("| " + " | ".join([
        r["variant"], str(r["steps"]), fmt(t["rsum"]), fmt(t["i2t_r1"]), fmt(t["t2i_r1"]),
        fmt(t.get("keep_ratio_img"), ".3f"), fmt(t.get("keep_ratio_txt"), ".3f"),
        fmt(tr.get("region_cos"), ".3f"), fmt(tr.get("region_mean_cos"), ".3f"),
        fmt(tr.get("keep_ratio_img"), ".3f"), fmt(tr.get("keep_ratio_txt"), ".3f")]) + " |")
  for r in rows:
    if "levels" in r:
      lv = r["levels"]
      lines.append("")
      lines.append(f"{r['variant']}, each level alone (same checkpoint, test rSum): "
                   + ", ".join(f"{k} {v:.1f}" for k, v in lv.items())
                   + f"; weighted score {r['test']['rsum']:.1f}")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=600, help="training steps per variant")
  ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
  ap.add_argument("--workdir", default="/tmp/grm_ablation", help="one sub-folder per variant")
  ap.add_argument("--base", default="demo", help="configs/grm_vit.py variant string")
  ap.add_argument("--collect", nargs="*", default=None,
                  help="only print the table of these workdirs' ablation.json files")
  ap.add_argument("--redundancy", action="store_true",
                  help="only print the token-redundancy figures of the generated data")
  ap.add_argument("--saliency", default="",
                  help="only print what the adapters of this trained GRM workdir keep")
  args = ap.parse_args(argv)
  if args.saliency:
    print(json.dumps(saliency(args.saliency), indent=2))
    return
  if args.redundancy:
    caps = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                        "data", "f30k", "test_caps.txt")
    print(json.dumps(redundancy(f30k_caps=caps), indent=2))
    return
  if args.collect is not None:
    rows = []
    for d in args.collect:
      with open(os.path.join(d, "ablation.json")) as f:
        rows.extend(json.load(f))
    order = {v: i for i, v in enumerate(VARIANTS)}
    print(table(sorted(rows, key=lambda r: order[r["variant"]])))
    return
  names = [v.strip() for v in args.variants.split(",") if v.strip()]
  for n in names:
    if n not in VARIANTS:
      ap.error(f"unknown variant {n!r}; known: {', '.join(VARIANTS)}")
  os.makedirs(args.workdir, exist_ok=True)
  out_path = os.path.join(args.workdir, "ablation.json")
  rows = []
  for n in names:
    rows.append(run_variant(n, args.steps, args.workdir, args.base))
    with open(out_path, "w") as f:  # after every variant: a long run keeps what it finished
      json.dump(rows, f, indent=2)
    print(table(rows), flush=True)
  print(f"-> {out_path}")


if __name__ == "__main__":
  main()
