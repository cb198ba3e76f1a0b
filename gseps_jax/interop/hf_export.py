"""Our params -> an `hf` export folder: HF encoders, PyTorch heads, a self-contained scorer.

`write_hf(config, params, step, out_dir)` writes `vision_encoder/` and `text_encoder/` (HF
`config.json` + `model.safetensors`; the text folder also holds the tokenizer),
`heads.safetensors` (projections and heads, PyTorch names and layouts from the one torch-layout
table, `interop/layout.py`), `gseps_torch.py` (a copy of `gseps_jax/torch_export/gseps_torch.py`),
`metadata.json` (what `gseps_torch.load` reads) and `README.md`. What differs between models
(head settings, variant, dense captions) comes from the model (`torch_heads_meta`, `variant`,
`tokenizes_dense`, `uses_dense`).
"""

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from gseps_jax import models
from gseps_jax.interop import common
from gseps_jax.interop import hf
from gseps_jax.interop import layout
from gseps_jax.models import encoders

ENCODER_KEYS = ("vision_encoder", "text_encoder")
HEADS_FILE = "heads.safetensors"
TORCH_MODULE = "gseps_torch.py"
FORMAT_VERSION = 1  # = gseps_torch.FORMAT_VERSION
_HF_CLASSES = {"vit": "ViTModel", "swin": "SwinModel", "bert": "BertModel"}


def heads_state_dict(params: Mapping) -> dict[str, np.ndarray]:
  """Every non-encoder param -> PyTorch name and layout (the names of gseps_torch's modules):
  the torch-layout table, e.g. `a/b/kernel` [in, out] -> `a.b.weight` [out, in], a LayerNorm's
  `norm/scale` -> `norm.weight`; `regions.prompts`, `cross_net.aggr_net.scale` keep theirs."""
  out = {}
  for path, x in layout.flatten({k: v for k, v in params.items()
                                 if k not in ENCODER_KEYS}).items():
    x = np.asarray(x, np.float32)
    out[layout.torch_name(path, x.ndim)] = np.ascontiguousarray(layout.to_torch(path, x))
  return out


def export_metadata(config, step: int, tokenizer_info: dict) -> dict:
  """The `metadata.json` of an hf export (what gseps_torch.load reads)."""
  mc = config.model
  name = common.check_model_type(config)
  model = models.build_model(mc)
  return {
      "format_version": FORMAT_VERSION,
      "model_type": name,
      "variant": model.variant,
      "step": int(step),
      "vision_model_type": encoders.model_type(mc.vision),
      "image_size": int(config.data.image_size),
      "image_layout": "NCHW float32, RGB in [0, 1] then (x - mean) / std",
      "mean": [float(v) for v in config.data.mean],
      "std": [float(v) for v in config.data.std],
      "max_len": int(config.data.max_len),
      "dense_max_len": int(config.data.dense_max_len) if model.tokenizes_dense else None,
      "tokenizer": tokenizer_info,
      "dense_mode": str(config.eval.dense_mode) if model.uses_dense else None,
      "compute_dtype": str(mc.dtype),
      "heads": model.torch_heads_meta(),
      "config": common.config_dict(config),
  }


def _save_hf_encoder(out_dir: Path, cfg, params) -> None:
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  cfg = encoders.config_dict(cfg)
  mt = encoders.model_type(cfg)
  sd = hf.params_to_state_dict(mt, cfg, params)
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
  tok = hf.load_hf_tokenizer(str(src))
  vocab = config.model.text.get("vocab_size")
  if vocab is not None and len(tok) > int(vocab):
    raise common.ExportError(f"Tokenizer at {src} has {len(tok)} tokens but the text encoder's "
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
- `text_encoder/`: HF `BertModel` + its tokenizer (vocab.txt, tokenizer.json,
  tokenizer_config.json).
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
  name = common.check_model_type(config)
  mc = config.model
  common.check_params(params, common.abstract_params(config), "Checkpoint params")
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
  seps_dense = models.build_model(mc).uses_dense
  (out_dir / "README.md").write_text(_README.format(
      variant=meta["variant"].upper(), step=step, model_type=name.upper(),
      vision_class=_HF_CLASSES[meta["vision_model_type"]], image_size=meta["image_size"],
      mean=meta["mean"], std=meta["std"], max_len=meta["max_len"],
      dense_len=f", dense caption length {meta['dense_max_len']}" if seps_dense else "",
      official=(f"- `{common.OFFICIAL_FILE}`: the same weights in the official SEPS layout.\n"
                if (out_dir / common.OFFICIAL_FILE).exists() else ""),
      score_line=("dense = model.encode_texts(dense_ids, dense_mask)  # one per image\n"
                  "sims = model.score(img, txt, dense, dense_mode=\"honest\")  # [Ni, Nc]"
                  if seps_dense else "sims = model.score(img, txt)  # [Ni, Nc]")))
