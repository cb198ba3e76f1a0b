"""SEPS with ViT-B/16-224 + BERT-base (rho 0.5, alpha 0.4), the paper's main configuration.

Run:  python -m gseps_jax.train --config configs/seps_vit.py --workdir runs/seps_vit
Variants (comma-separated, `--config configs/seps_vit.py:tiny`):
  384     ViT-B/16 at 384 px (num_patches 576, N_c 115).
  parity  train AND evaluate with the official dense-caption pairing (dense_mode="parity"; the
          caption's own ground-truth dense caption is a second query, which leaks the answer:
          for comparison with the paper only). The default is "honest" for both.
  tiny    random 2-layer ViT/BERT at 64 px for CPU tests.
  demo  the generated `synthetic_regions` data set (details: `common.use_demo`).
  key=value pairs override `model.seps.*` fields, e.g. `dense_mode=honest,selection=straight_through`.

Recipe (official code): VSE++ hinge, margin 0.2, summed; epoch 0 all negatives scaled i/n_batches,
then hardest negatives; AdamW wd 1e-4, lr 2e-4 (backbones x0.1), x0.3 at epochs 9/15/20/25, 30
epochs, grad-norm clip 2.0, batch 128, fp32. The official ratio term is reported as
aux['ratio_loss'] (a constant: no gradient, so it is not added to the loss).

Model selection: there is no dense-caption file for the dev split, so `train.eval_on = "dev"`
evaluates with the SPARSE branch only (`eval.dev_use_dense = False`); test results use both
branches. Every result states `eval.dense_mode` (parity | honest).

Dense captions: one mode for training and evaluation. `eval.dense_mode` is a reference to
`model.seps.dense_mode` (setting either sets both); `python -m gseps_jax.evaluate --dense_mode=`
can still score a checkpoint the other way (the results then say so), and `--dense_shuffle` runs
the leak audit. Dense captions are tokenised at full length (`data.dense_max_len = 0`: the
longest dense caption of the data, [CLS] and [SEP] included, at most BERT's 512 positions; the
official code pads each batch to its longest and never truncates); parity evaluation keeps the
first `eval_text_cut` = 90 token FEATURES of that full-length encoding, as the official
`encode_data`; honest evaluation keeps them all.
"""

import ml_collections

from configs import common


def seps_defaults(rho: float, alpha: float) -> ml_collections.ConfigDict:
  """`config.model.seps`: the SEPS head settings."""
  return ml_collections.ConfigDict(dict(
      rho=rho,  # keep ratio: K = ceil(N * rho)
      alpha=alpha,  # aggregation ratio: N_c = int(num_patches * alpha * rho)
      num_patches=-1,  # -1: from the backbone at its configured image size (196/576/49/144)
      dim_ratio=0.2,  # aggregation MLP hidden = int(0.2 * embed_dim)
      use_sparse=True,
      use_dense=True,  # False = LAPS (sparse caption branch only)
      dense_mode="honest",  # pairing in training AND evaluation: honest | parity (official)
      selection="official",  # official (no gradient through selection) | straight_through
      st_temperature=0.05,  # soft-mask temperature of the straight-through backward pass
      precision="highest",  # head matmul precision (highest = PyTorch fp32)
      gather_kept="auto",  # auto | on | off: aggregate over the K kept patches only (auto: on CPU)
      eval_text_cut=90,  # parity eval keeps the first 90 text token features (official)
      ratio_weight=2.0,  # weight of the reported (constant) official ratio term
      train_chunk=0,  # pair tile of the in-batch scores; 0 = one tile
  ))


def apply_variants(c, flags, kv):
  """Shared variant handling of the SEPS/LAPS configs."""
  if "384" in flags:
    c.model.vision.image_size = 384
    c.data.image_size = 384
  if "tiny" in flags:
    common.use_tiny(c)
    c.data.dense_max_len = 24  # CPU smoke tests: a fixed short length (truncates dense captions)
    c.model.seps.eval_text_cut = 20
  if "demo" in flags:
    # Embedded demo, as configs/grm_vit.py:demo: generated shapes at 32 px (dense captions
    # included, also for dev), a 3-layer ViT from scratch, the pretrained MiniLM text tower
    # frozen, the official hinge recipe (all-negative warm-up epoch, then hardest negatives),
    # honest dense mode, a 7-minute budget on 2 CPU cores.
    common.use_demo(c, 32)
    c.model.seps.dense_mode = "honest"
    # dense_max_len stays 0 (full length: the longest generated dense caption, 82 word pieces);
    # the frozen MiniLM's features are cached, so the length costs only the head's work.
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 50
    c.eval.dense_mode = "honest"
    c.eval.dev_use_dense = True  # the generated dev split has dense captions
    c.eval.chunk = 50
  if "parity" in flags:  # last: also overrides the demo's honest mode
    c.model.seps.dense_mode = "parity"  # eval.dense_mode follows (a reference)
  common.override_fields(c.model.seps, kv, "SEPS")
  return c


def base_seps(vision, rho: float, alpha: float) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.model.name = "seps"
  c.model.vision = ml_collections.ConfigDict(vision)
  c.model.seps = seps_defaults(rho, alpha)
  c.loss.kind = "hinge"
  c.loss.margin = 0.2
  c.loss.warmup_epochs = 1
  c.optim.backbone_patterns = (r"^vision_encoder/", r"^text_encoder/")
  c.data.dense_max_len = 0  # full length: the longest dense caption of the data (<= 512)
  # One pairing for training and evaluation: eval.dense_mode IS model.seps.dense_mode.
  c.eval.dense_mode = c.model.seps.get_ref("dense_mode")
  c.eval.dev_use_dense = False  # no dense captions for dev (see module docstring)
  c.eval.chunk = 64  # SEPS pair tile (images x captions); per pair ~130 KB at ViT-224
  return c


def get_config(arg=None):
  flags, kv = common.parse_variant(arg)
  c = base_seps(common.VIT_B16, rho=0.5, alpha=0.4)
  c = apply_variants(c, flags, kv)
  c.model.vision_hf_name = common.pretrained_name(c.model.vision, c.data.image_size)
  return c
