r"""Checkpoint conversion: our orbax checkpoints -> PyTorch (HF directories / official SEPS `.pth`)
and official SEPS `.pth` -> our orbax checkpoints.

  # HF transformers encoders + heads + a self-contained PyTorch scorer (GRM or SEPS):
  python -m gseps_jax.export --checkpoint=runs/grm_vit --out=exports/grm_vit --format=hf
  # The authors' checkpoint layout (SEPS/LAPS only), loadable by their evaluation code:
  python -m gseps_jax.export --checkpoint=runs/seps_vit/checkpoints/1000 --out=exp --format=official
  # The other way: an official `model_best.pth` -> a workdir that train/evaluate can use:
  python -m gseps_jax.export --from_official=model_best.pth --config=configs/seps_vit.py \
      --out=runs/seps_from_official

Formats (`--format`):
  hf        `OUT/vision_encoder/` and `OUT/text_encoder/` (HF `config.json` + `model.safetensors`,
            loadable with `ViTModel/SwinModel/BertModel.from_pretrained`; the text directory also
            holds the tokenizer: vocab.txt, tokenizer.json, tokenizer_config.json),
            `OUT/heads.safetensors` (projections and heads, PyTorch layouts), `OUT/gseps_torch.py`
            (a copy of `gseps_jax/torch_export/gseps_torch.py`: the eval-mode GRM/SEPS scorer in
            PyTorch and `load(OUT)`), `OUT/metadata.json` and `OUT/README.md`.
  official  `OUT/model_best.pth` = `{'model': state_dict, 'opt': argparse.Namespace, 'epoch',
            'best_rsum', 'Eiters'}`, the dict the official `train.py` saves and
            `lib/evaluation.evalrank` loads (`torch.load(path)['opt']`, `VSEModel(opt)`,
            `load_state_dict(checkpoint['model'], strict=False)`).
  both      the hf export with `model_best.pth` beside it.

Every output is written into a temporary sibling directory and renamed into place when complete,
so an interrupted export leaves nothing at `--out`. An existing `--out` is an error unless
`--overwrite`.

Not carried across formats: the HF poolers (`pooler.*`) of the official checkpoint (our encoders
return tokens; SEPS never uses the pooler; the official loader's `strict=False` keeps freshly
initialised ones) and the optimiser state (an imported checkpoint starts with a fresh one).
"""

import argparse
import json
import logging
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import fileio
from gseps_jax.models import encoders
from gseps_jax.models import hf_import

log = logging.getLogger(__name__)

FORMATS = ("hf", "official", "both")
MODEL_TYPES = ("grm", "seps")
ENCODER_KEYS = ("vision_encoder", "text_encoder")
OFFICIAL_FILE = "model_best.pth"
HEADS_FILE = "heads.safetensors"
TORCH_MODULE = "gseps_torch.py"
FORMAT_VERSION = 1  # = gseps_torch.FORMAT_VERSION
_HF_CLASSES = {"vit": "ViTModel", "swin": "SwinModel", "bert": "BertModel"}
# The only backbones the official code builds (hub checkpoints named in spec/seps.md).
_OFFICIAL_BACKBONES = {
    "vit": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, patch_size=16),
    "swin": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], patch_size=4),
    "bert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522),
}

# `arguments.get_argument_parser()` defaults of the official code (maxingan2412/seps @ 7f4dfa6);
# `VSEModel(opt)` and `evalrank` read these attributes, so the saved namespace carries all of them.
OFFICIAL_OPT_DEFAULTS = dict(
    data_path="data/", dataset="f30k", margin=0.2, num_epochs=30, batch_size=128, embed_size=512,
    grad_clip=2.0, learning_rate=2e-4, workers=8, log_step=200, val_step=500,
    logger_name="runs/test", max_violation=False, vse_mean_warmup_epochs=1,
    embedding_warmup_epochs=0, f30k_img_path="", coco_img_path="", img_res=224, vit_type="vit",
    multi_gpu=0, world_size=1, rank=0, local_rank=0, dist_backend="nccl", dist_url="env://",
    seed=0, size_augment=1, loss="vse", eval=1, save_results=1, evaluate_cxc=0, gpu_id=0,
    bert_path="bert-base-uncased", lr_schedules=[9, 15, 20, 25], decay_rate=0.3, shard_size=256,
    max_word=90, aggr_ratio=0.4, sparse_ratio=0.5, attention_weight=0.8, ratio_weight=2.0)


class ExportError(ValueError):
  """The checkpoint or state dict cannot be converted (with the reason and what to do)."""


# ----------------------------------------------------------------------------------------------
# Small helpers.
# ----------------------------------------------------------------------------------------------
def _model_cfg(config):
  return config.model if "model" in config else config


def check_model_type(config) -> str:
  """`config.model.name`, checked against the exportable model families."""
  name = _model_cfg(config).get("name")
  if name not in MODEL_TYPES:
    raise ExportError(f"Unknown model type {name!r} (config.model.name); export supports "
                      f"{list(MODEL_TYPES)}.")
  return name


def build_model(model_cfg) -> nn.Module:
  """The Linen model of `model_cfg` (`models.build_model`)."""
  from gseps_jax import models  # pylint: disable=g-import-not-at-top
  return models.build_model(model_cfg)


def _sample_batch(config) -> dict:
  from gseps_jax import trainer  # pylint: disable=g-import-not-at-top
  return trainer.sample_batch(config, 1)


def abstract_params(config, model: Optional[nn.Module] = None):
  """`jax.ShapeDtypeStruct` tree of the model's params (nothing is allocated or compiled)."""
  model = model or build_model(_model_cfg(config))
  key = jax.random.key(0)
  rngs = {"params": key, "dropout": key, "gumbel": key, "noise": key}
  return jax.eval_shape(lambda: model.init(rngs, _sample_batch(config), train=False))["params"]


def _flat(tree) -> dict:
  return {tuple(k.key for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_params(params, expected, what: str) -> None:
  """Raises ExportError listing every missing, unexpected and mis-shaped leaf of `params`."""
  got, want = _flat(params), _flat(expected)
  problems = []
  missing = sorted("/".join(p) for p in want if p not in got)
  unexpected = sorted("/".join(p) for p in got if p not in want)
  shaped = sorted(f"{'/'.join(p)} {tuple(np.shape(got[p]))} (expected {tuple(want[p].shape)})"
                  for p in want if p in got and tuple(np.shape(got[p])) != tuple(want[p].shape))
  for label, names in (("Missing", missing), ("Unexpected", unexpected),
                       ("Wrong shape", shaped)):
    if names:
      problems.append(f"{label} {len(names)}: {', '.join(names)}.")
  if problems:
    raise ExportError(f"{what} does not match the model of this config. " + " ".join(problems))


def _json_default(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  return list(x)


atomic_dir = fileio.atomic_dir  # public here too (tests, callers of the export API)


def _config_dict(config) -> dict:
  return json.loads(json.dumps(config.to_dict(), default=_json_default))





# ----------------------------------------------------------------------------------------------
# Restoring our checkpoints (host side).
# ----------------------------------------------------------------------------------------------
def restore(checkpoint) -> tuple[Any, dict, int, dict]:
  """(config, params as numpy, step, meta) of `WORKDIR` or `WORKDIR/checkpoints/STEP`.

  Restores onto one CPU device whatever mesh wrote the checkpoint (export is a host job).

  Raises:
    FileNotFoundError: the path does not exist or holds no checkpoint.
    ExportError: the config's model type is not exportable.
  """
  from gseps_jax import sharding  # pylint: disable=g-import-not-at-top
  from gseps_jax import trainer  # pylint: disable=g-import-not-at-top
  if not epath.Path(checkpoint).exists():
    raise FileNotFoundError(f"Checkpoint path {checkpoint} does not exist; pass a training "
                            f"workdir or WORKDIR/checkpoints/STEP.")
  config, _, meta = ckpt_lib.load_config_from_checkpoint(checkpoint)
  check_model_type(config)
  cpu_mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.local_devices(backend="cpu")[:1])
  config, _, params, step = trainer.restore_params(checkpoint, cpu_mesh, config)
  return config, jax.tree.map(np.asarray, jax.device_get(params)), step, meta


# ----------------------------------------------------------------------------------------------
# HF format.
# ----------------------------------------------------------------------------------------------
def heads_state_dict(params: Mapping) -> dict[str, np.ndarray]:
  """Every non-encoder param -> PyTorch name and layout (the names of gseps_torch's modules).

  `a/b/kernel` [in, out] -> `a.b.weight` [out, in]; a LayerNorm's `norm/scale` -> `norm.weight`;
  everything else keeps its name (`regions.prompts`, `cross_net.aggr_net.scale`, biases).
  """
  out = {}
  for path, x in _flat({k: v for k, v in params.items() if k not in ENCODER_KEYS}).items():
    x = np.asarray(x, np.float32)
    leaf = path[-1]
    if leaf == "kernel" and x.ndim == 2:
      leaf, x = "weight", x.T
    elif leaf == "scale" and len(path) > 1 and path[-2] == "norm":
      leaf = "weight"
    out[".".join(path[:-1] + (leaf,))] = np.ascontiguousarray(x)
  return out


def _grm_heads_meta(mc) -> dict:
  from gseps_jax.models import grm  # pylint: disable=g-import-not-at-top
  g = mc.grm
  return dict(
      embed_dim=int(mc.embed_dim), vision_width=encoders.encoder_width(mc.vision),
      text_width=encoders.encoder_width(mc.text),
      adapter_ln_eps=float(nn.LayerNorm().epsilon),  # SaliencyAdapter uses Flax's default
      num_regions=int(g.num_regions), region_normalize_tokens=bool(g.region_normalize_tokens),
      region_learn_scale=bool(g.region_learn_scale),
      region_logit_scale=float(g.region_logit_scale),
      region_eps=float(grm.RegionPrompts(num_regions=1).eps), phi_width=int(g.phi_width),
      learn_temperature=bool(g.get("learn_temperature", False)), direction=str(g.direction),
      level_weights={k: float(v) for k, v in dict(g.level_weights).items()})


def _seps_heads_meta(mc) -> dict:
  from gseps_jax.models import seps  # pylint: disable=g-import-not-at-top
  m = seps.SEPS.from_config(mc)
  return dict(
      embed_dim=int(m.embed_dim), vision_width=encoders.encoder_width(mc.vision),
      text_width=encoders.encoder_width(mc.text), num_aggregated=int(m.num_aggregated),
      rho=float(m.rho), dim_ratio=float(m.dim_ratio), use_sparse=bool(m.use_sparse),
      use_dense=bool(m.use_dense), eval_text_cut=int(m.eval_text_cut),
      aggr_ln_eps=float(seps.AGGR_LN_EPS), leaky_slope=float(seps.LEAKY_SLOPE),
      train_dense_mode=str(m.dense_mode))


def export_metadata(config, step: int, tokenizer_info: dict) -> dict:
  """The `metadata.json` of an hf export (what gseps_torch.load reads)."""
  mc = config.model
  name = check_model_type(config)
  seps_like = name == "seps"
  variant = "laps" if seps_like and not mc.seps.use_dense else name
  return {
      "format_version": FORMAT_VERSION,
      "model_type": name,
      "variant": variant,
      "step": int(step),
      "vision_model_type": encoders.model_type(mc.vision),
      "image_size": int(config.data.image_size),
      "image_layout": "NCHW float32, RGB in [0, 1] then (x - mean) / std",
      "mean": [float(v) for v in config.data.mean],
      "std": [float(v) for v in config.data.std],
      "max_len": int(config.data.max_len),
      "dense_max_len": int(config.data.dense_max_len) if seps_like else None,
      "tokenizer": tokenizer_info,
      "dense_mode": str(config.eval.dense_mode) if seps_like and mc.seps.use_dense else None,
      "compute_dtype": str(mc.dtype),
      "heads": _seps_heads_meta(mc) if seps_like else _grm_heads_meta(mc),
      "config": _config_dict(config),
  }


def _save_hf_encoder(out_dir: Path, cfg, params) -> None:
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  cfg = encoders.config_dict(cfg)
  mt = encoders.model_type(cfg)
  sd = hf_import.params_to_state_dict(mt, cfg, params)
  hf_cfg = transformers.AutoConfig.for_model(**cfg)
  hf_cfg.architectures = [_HF_CLASSES[mt]]
  hf_cfg.save_pretrained(out_dir)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()},
            str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def _save_tokenizer(out_dir: Path, config, tokenizer_dir: Optional[str]) -> dict:
  from gseps_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if tokenizer_dir:
    src = Path(tokenizer_dir)  # local-path-ok: HF tokenizers load from a local dir
  else:
    src = tok_lib.resolve_tokenizer_dir(config.data, config.model.get("text_hf_dir", ""))
  tok = hf_import.load_hf_tokenizer(str(src))
  vocab = config.model.text.get("vocab_size")
  if vocab is not None and len(tok) > int(vocab):
    raise ExportError(f"Tokenizer at {src} has {len(tok)} tokens but the text encoder's "
                      f"vocab_size is {vocab}; pass the tokenizer the model was trained with "
                      f"(--tokenizer_dir).")
  tok.save_pretrained(str(out_dir))
  vocab_file = src / "vocab.txt" if src.is_dir() else src
  # transformers 5 writes tokenizer.json only.
  shutil.copyfile(vocab_file, out_dir / "vocab.txt")  # local-path-ok: local HF tokenizer dirs
  return {"class": "BertTokenizer", "do_lower_case": bool(tok.do_lower_case),
          "vocab_size": len(tok), "source": str(src)}


_README = """# {variant} export of a gseps_jax checkpoint (step {step})

Files
- `vision_encoder/`: HF `{vision_class}` (config.json + model.safetensors).
- `text_encoder/`: HF `BertModel` + its tokenizer (vocab.txt, tokenizer.json, tokenizer_config.json).
- `heads.safetensors`: projections and {model_type} heads (PyTorch layouts).
- `gseps_torch.py`: the eval-mode scorer in PyTorch (needs torch, transformers, safetensors).
- `metadata.json`: model type, head settings, image size {image_size}, mean {mean}, std {std},
  caption length {max_len}{dense_len}, step, the full training config.
{official}
Load and score (eval mode; identical to gseps_jax's `score` up to float rounding):

```python
import sys; sys.path.insert(0, "{{this directory}}")
import gseps_torch
model = gseps_torch.load("{{this directory}}")
tok = gseps_torch.load_tokenizer("{{this directory}}")
ids, mask = gseps_torch.tokenize(tok, ["a red square on the left"], model.meta["max_len"])
img = model.encode_images(pixel_values)   # [B, 3, {image_size}, {image_size}], (x - mean) / std
txt = model.encode_texts(ids, mask)
{score_line}
```

The encoders alone: `{vision_class}.from_pretrained("vision_encoder")` (its `last_hidden_state` is
what the heads consume) and `BertModel.from_pretrained("text_encoder")`; the poolers are not
trained here (HF initialises them fresh; they are unused).
"""


def write_hf(config, params: Mapping, step: int, out_dir, *,
             tokenizer_dir: Optional[str] = None) -> None:
  """Writes the hf export of (config, params) into the existing empty directory `out_dir`."""
  name = check_model_type(config)
  mc = config.model
  check_params(params, abstract_params(config), "Checkpoint params")
  out_dir = Path(out_dir)  # local-path-ok: HF save_pretrained / safetensors write locally
  for key, cfg in (("vision_encoder", mc.vision), ("text_encoder", mc.text)):
    (out_dir / key).mkdir()
    _save_hf_encoder(out_dir / key, cfg, params[key])
  tok_info = _save_tokenizer(out_dir / "text_encoder", config, tokenizer_dir)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(heads_state_dict(params), str(out_dir / HEADS_FILE), metadata={"format": "pt"})
  src = resources.files("gseps_jax.torch_export").joinpath(TORCH_MODULE)
  (out_dir / TORCH_MODULE).write_text(src.read_text())
  meta = export_metadata(config, step, tok_info)
  (out_dir / "metadata.json").write_text(json.dumps(meta, indent=2))
  seps_dense = name == "seps" and mc.seps.use_dense
  (out_dir / "README.md").write_text(_README.format(
      variant=meta["variant"].upper(), step=step, model_type=name.upper(),
      vision_class=_HF_CLASSES[meta["vision_model_type"]], image_size=meta["image_size"],
      mean=meta["mean"], std=meta["std"], max_len=meta["max_len"],
      dense_len=f", dense caption length {meta['dense_max_len']}" if seps_dense else "",
      official=(f"- `{OFFICIAL_FILE}`: the same weights in the official SEPS layout.\n"
                if (out_dir / OFFICIAL_FILE).exists() else ""),
      score_line=("dense = model.encode_texts(dense_ids, dense_mask)  # one per image\n"
                  "sims = model.score(img, txt, dense, dense_mode=\"honest\")  # [Ni, Nc]"
                  if seps_dense else "sims = model.score(img, txt)  # [Ni, Nc]")))


def export_hf(checkpoint, out, *, overwrite: bool = False,
              tokenizer_dir: Optional[str] = None) -> Path:
  """Checkpoint -> hf export directory `out` (see the module docstring). Returns `out`."""
  config, params, step, _ = restore(checkpoint)
  with fileio.atomic_dir(out, overwrite) as tmp:
    write_hf(config, params, step, tmp, tokenizer_dir=tokenizer_dir)
  return Path(out)  # local-path-ok: the hf export is a local HF directory


# ----------------------------------------------------------------------------------------------
# Official SEPS format.
# ----------------------------------------------------------------------------------------------
def official_vit_type(config) -> str:
  """The official `--vit_type` naming the backbone (its VSEModel picks the HF hub model by it)."""
  v = config.model.vision
  size = int(config.data.image_size)
  base = "swin" if v.model_type == "swin" else "vit"
  return f"{base}_384" if size == 384 else base


def official_opt(config, step: int) -> argparse.Namespace:
  """The argparse namespace the official code saves as `'opt'` (its defaults + our config)."""
  from gseps_jax.models import seps  # pylint: disable=g-import-not-at-top
  mc, sc = config.model, config.model.seps
  opt = dict(OFFICIAL_OPT_DEFAULTS)
  opt.update(
      embed_size=int(mc.embed_dim), vit_type=official_vit_type(config),
      img_res=int(config.data.image_size), sparse_ratio=float(sc.rho),
      aggr_ratio=float(sc.alpha), ratio_weight=float(sc.ratio_weight),
      max_word=int(sc.eval_text_cut), margin=float(config.loss.margin),
      num_epochs=int(config.train.num_epochs), batch_size=int(config.train.batch_size),
      learning_rate=float(config.optim.lr), grad_clip=float(config.optim.clip_norm),
      lr_schedules=[int(e) for e in config.optim.decay_epochs],
      decay_rate=float(config.optim.decay_factor),
      vse_mean_warmup_epochs=int(config.loss.warmup_epochs),
      dataset="coco" if "coco" in config.data.name else "f30k", seed=int(config.seed),
      num_patches=seps.backbone_num_patches(mc.vision) if sc.num_patches <= 0
      else int(sc.num_patches))
  del step  # the step is saved as the top-level 'Eiters'
  return argparse.Namespace(**opt)


def official_incompatibilities(config) -> list[str]:
  """Why the official `VSEModel(opt)` would build a different architecture (it always builds
  ViT-B/16 or Swin-B at 224/384 from the hub, and bert-base-uncased); empty if none."""
  mc = config.model
  v, t = encoders.config_dict(mc.vision), encoders.config_dict(mc.text)
  out = [f"vision {k}={v.get(k)} (official: {want})"
         for k, want in _OFFICIAL_BACKBONES[encoders.model_type(v)].items()
         if json.dumps(v.get(k), default=list) != json.dumps(want)]
  if int(config.data.image_size) not in (224, 384):
    out.append(f"image_size={config.data.image_size} (official: 224 or 384)")
  out += [f"text {k}={t.get(k)} (official: {want})"
          for k, want in _OFFICIAL_BACKBONES["bert"].items() if t.get(k) != want]
  return out


def require_official(config) -> None:
  """Raises ExportError unless the model has an official layout (SEPS/LAPS)."""
  name = check_model_type(config)
  if name != "seps":
    raise ExportError(f"--format=official exists for SEPS/LAPS only (the official checkpoint "
                      f"layout is the SEPS code's); this checkpoint is {name!r}: use --format=hf.")


def _require_official_checkpoint(checkpoint) -> None:
  """`require_official` on the checkpoint's saved config, before any array is read."""
  if not epath.Path(checkpoint).exists():
    raise FileNotFoundError(f"Checkpoint path {checkpoint} does not exist; pass a training "
                            f"workdir or WORKDIR/checkpoints/STEP.")
  require_official(ckpt_lib.load_config_from_checkpoint(checkpoint)[0])


def _torch():
  """PyTorch, which only the official `.pth` format needs (an install extra)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError("The official .pth format needs PyTorch, which the core install leaves out: "
                      "run `./install.sh --torch` (or `pip install 'gseps_jax[torch]'`).") from e
  return torch


def official_checkpoint(config, params: Mapping, step: int, meta: Optional[dict] = None) -> dict:
  """(config, params) -> the official checkpoint dict (torch tensors)."""
  torch = _torch()
  from gseps_jax.models import seps  # pylint: disable=g-import-not-at-top
  require_official(config)
  try:
    sd = seps.params_to_official(params, config)
  except ValueError as e:
    raise ExportError(str(e)) from e
  official = (meta or {}).get("official", {})
  return {
      "model": {k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()},
      "opt": official_opt(config, step),
      "epoch": int(official.get("epoch", 0)),
      "best_rsum": float(official.get("best_rsum", 0.0)),
      "Eiters": int(step),
  }


def write_official(config, params: Mapping, step: int, out_dir, meta=None) -> Path:
  """Writes `out_dir/model_best.pth`; warns if the official code would build another model."""
  torch = _torch()
  state = official_checkpoint(config, params, step, meta)
  issues = official_incompatibilities(config)
  if issues:
    log.warning("The official VSEModel(opt) builds ViT-B/Swin-B + bert-base from the hub; this "
                "checkpoint's architecture differs (%s), so only its layout is official.",
                "; ".join(issues))
  path = Path(out_dir) / OFFICIAL_FILE  # local-path-ok: torch.save writes a local file
  torch.save(state, str(path))
  return path


def export_official(checkpoint, out, *, overwrite: bool = False) -> Path:
  """Checkpoint (SEPS/LAPS) -> `out/model_best.pth` in the official layout. Returns the .pth."""
  _require_official_checkpoint(checkpoint)
  config, params, step, meta = restore(checkpoint)
  with fileio.atomic_dir(out, overwrite) as tmp:
    write_official(config, params, step, tmp, meta)
  return Path(out) / OFFICIAL_FILE  # local-path-ok: torch.save wrote a local file


def export(checkpoint, out, *, format: str = "hf", overwrite: bool = False,  # pylint: disable=redefined-builtin
           tokenizer_dir: Optional[str] = None) -> Path:
  """The CLI's dispatcher: `format` in FORMATS. Returns `out`."""
  if format not in FORMATS:
    raise ExportError(f"--format must be one of {FORMATS}, got {format!r}.")
  if format == "hf":
    return export_hf(checkpoint, out, overwrite=overwrite, tokenizer_dir=tokenizer_dir)
  if format == "official":
    return export_official(checkpoint, out, overwrite=overwrite).parent
  _require_official_checkpoint(checkpoint)
  config, params, step, meta = restore(checkpoint)
  with fileio.atomic_dir(out, overwrite) as tmp:
    write_official(config, params, step, tmp, meta)
    write_hf(config, params, step, tmp, tokenizer_dir=tokenizer_dir)
  return Path(out)  # local-path-ok: HF / torch exports are local directories


# ----------------------------------------------------------------------------------------------
# Official SEPS .pth -> our checkpoint.
# ----------------------------------------------------------------------------------------------
def load_official(path, *, trust_pickle: bool = False) -> tuple[dict, dict]:
  """Reads an official `.pth`: (state dict as float32 numpy, the other top-level entries).

  Loads with `weights_only=True` (only tensors, containers, primitives and the official
  `argparse.Namespace`); `trust_pickle=True` allows arbitrary pickled objects (only for files
  you trust). A bare state dict (no `'model'` key) is accepted too.
  """
  torch = _torch()
  path = epath.Path(path)  # a checkpoint: may be on gs://
  if not path.is_file():
    raise FileNotFoundError(f"Official checkpoint {path} does not exist.")
  try:
    with torch.serialization.safe_globals([argparse.Namespace]), path.open("rb") as f:
      obj = torch.load(f, map_location="cpu", weights_only=not trust_pickle)
  except Exception as e:  # pylint: disable=broad-except
    if trust_pickle:
      raise
    raise ExportError(f"{path} cannot be loaded with weights_only=True ({type(e).__name__}: "
                      f"{str(e)[:300]}). If you trust the file, pass --trust_pickle.") from e
  if not isinstance(obj, Mapping):
    raise ExportError(f"{path} holds a {type(obj).__name__}, not the official checkpoint dict.")
  if "model" in obj:
    sd, extras = obj["model"], {k: v for k, v in obj.items() if k != "model"}
  elif obj and all(torch.is_tensor(v) for v in obj.values()):
    sd, extras = obj, {}
  else:
    raise ExportError(f"{path} has top-level keys {sorted(obj)}; expected the official "
                      f"{{'model': state_dict, 'opt', 'epoch', ...}}.")
  out = {}
  for k, v in sd.items():
    if not torch.is_tensor(v):
      raise ExportError(f"State dict entry {k!r} is a {type(v).__name__}, not a tensor.")
    out[k] = v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
  return out, extras


def _extras_summary(extras: dict) -> dict:
  out = {}
  for k in ("epoch", "best_rsum", "Eiters"):
    if k in extras:
      out[k] = float(extras[k]) if k == "best_rsum" else int(extras[k])
  if isinstance(extras.get("opt"), argparse.Namespace):
    out["opt"] = {k: v for k, v in vars(extras["opt"]).items()
                  if isinstance(v, (int, float, str, bool, list)) or v is None}
  return out


def import_official(pth, config, out, *, overwrite: bool = False,
                    trust_pickle: bool = False) -> epath.Path:
  """Official SEPS `.pth` -> a workdir `out` (epath: may be gs://) with a checkpoint at step 0.

  The train state has the imported params, step 0 and a fresh optimiser state (the official
  `.pth` has none); the meta holds the config, its fingerprint and, under `'official'`, the
  `.pth`'s epoch / best_rsum / Eiters / opt. `train` and `evaluate` use `out` as a workdir.

  Raises:
    ExportError: the config is not SEPS, or the state dict does not match it (every missing,
      unexpected and mis-shaped tensor listed).
  """
  from gseps_jax import optim  # pylint: disable=g-import-not-at-top
  from gseps_jax import trainer  # pylint: disable=g-import-not-at-top
  from gseps_jax.models import seps  # pylint: disable=g-import-not-at-top
  if check_model_type(config) != "seps":
    raise ExportError(f"--from_official needs a SEPS/LAPS config (the official layout is the SEPS "
                      f"code's); got model {config.model.name!r}.")
  sd, extras = load_official(pth, trust_pickle=trust_pickle)
  try:
    params = seps.params_from_official(sd, config)
  except ValueError as e:
    raise ExportError(f"{pth}: {e}") from e
  check_params(params, abstract_params(config), f"Imported {pth}")
  tx, _, _ = optim.make_optimizer(config.optim, 1, params)
  params = jax.tree.map(jnp.asarray, params)
  # One jitted init instead of op-by-op dispatch over every leaf.
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=jax.jit(tx.init)(params))
  meta = {"config": config.to_dict(), "fingerprint": ckpt_lib.fingerprint(config),
          "official": dict(_extras_summary(extras), source=str(fileio.absolute(pth)))}
  with fileio.atomic_dir(out, overwrite) as tmp:
    (tmp / "config.json").write_text(config.to_json_best_effort(indent=2))
    ckpt = ckpt_lib.Checkpointer(tmp, best_metric=None, async_save=False)
    try:
      ckpt.save(0, state, meta)
      ckpt.wait()
    finally:
      ckpt.close()
  return epath.Path(out)


# ----------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------
def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("checkpoint", None, "Training workdir or WORKDIR/checkpoints/STEP.")
  flags.DEFINE_string("out", None, "Output directory (written atomically).")
  flags.DEFINE_enum("format", "hf", FORMATS, "hf | official (SEPS/LAPS) | both.")
  flags.DEFINE_string("from_official", None, "Official SEPS .pth to import (needs --config).")
  config_flags.DEFINE_config_file("config", None, "Config of the official checkpoint "
                                  "(e.g. configs/seps_vit.py or configs/seps_vit.py:384).",
                                  lock_config=True)
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
  flags.DEFINE_bool("trust_pickle", False, "Load the .pth with weights_only=False.")
  flags.DEFINE_string("tokenizer_dir", None, "Tokenizer to ship (default: the config's).")
  return flags.FLAGS


def main(argv):
  """Checks and resolves the command line, then exports or imports. Expected failures (bad
  paths, mismatched state dicts, an --out that would replace its own inputs) print one line
  (`cli.run_absl`)."""
  from gseps_jax import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}: flags are written --name=value.")
  f = FLAGS
  if not f.out:
    raise cli.UserError("--out is required (the folder to write).")
  out = fileio.resolve_path(f.out)
  if f.from_official:
    if f.config is None:
      raise cli.UserError("--from_official needs --config (the model's config file).")
    from configs import common  # pylint: disable=g-import-not-at-top
    cli.resolve_config_paths(f.config)
    common.validate(f.config)
    pth = fileio.resolve_path(f.from_official)
    if f.overwrite:
      fileio.check_out_not_source(out, ("--from_official file", pth))
    path = import_official(pth, f.config, out, overwrite=f.overwrite,
                           trust_pickle=f.trust_pickle)
    print(f"Imported {f.from_official} -> {path} (step 0).")
    return
  if not f.checkpoint:
    raise cli.UserError("Pass --checkpoint (export) or --from_official (import).")
  checkpoint = fileio.resolve_path(f.checkpoint)
  tokenizer_dir = fileio.resolve_path(f.tokenizer_dir)
  workdir, _ = ckpt_lib.resolve(checkpoint)
  if f.overwrite:  # replacing --out must never delete what the export is made from
    fileio.check_out_not_source(out, ("--checkpoint workdir", workdir),
                                ("--tokenizer_dir", tokenizer_dir))
  path = export(checkpoint, out, format=f.format, overwrite=f.overwrite,
                tokenizer_dir=tokenizer_dir)
  print(f"Exported {f.checkpoint} ({f.format}) -> {path}")


if __name__ == "__main__":
  from gseps_jax import cli as _cli  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  _cli.run_absl(main, user_errors_extra=(ExportError,))
