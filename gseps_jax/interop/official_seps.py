"""The official SEPS checkpoint (github.com/maxingan2412/seps @ 7f4dfa6) <-> our params and files.

  params_from_official / params_to_official   official state dict <-> our SEPS params (exact
                                              inverses; every tensor converted by the one
                                              torch-layout table, `interop/layout.py`)
  official_checkpoint / write_official        our params -> the dict the official `train.py`
                                              saves (`model_best.pth`)
  load_official                               an official `.pth` -> state dict (numpy) + extras

The official module names: the towers under `img_enc.visual_encoder.` / `txt_enc.bert.` (HF
names, `interop/hf.py`), the projections `img_enc.vision_proj` / `txt_enc.fc` (absent when the
tower's width is already `embed_dim`) and the aggregation net `cross_net.aggr_net` (an
`nn.Sequential`: `weight.0` LayerNorm, `weight.1` / `weight.3` Linear, and a `[1, 1, 1]` scale).
"""

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from etils import epath

from gseps_jax import models
from gseps_jax.interop import common
from gseps_jax.interop import hf
from gseps_jax.interop import layout
from gseps_jax.models import encoders
from gseps_jax.models import seps

log = logging.getLogger(__name__)

VISION_PREFIX = "img_enc.visual_encoder."
TEXT_PREFIX = "txt_enc.bert."
# Our module path -> the official module name; the tensor names and layouts below it come from
# the torch-layout table.
OFFICIAL_MODULES = {
    ("vision_proj",): "img_enc.vision_proj",
    ("fc",): "txt_enc.fc",
    ("cross_net", "aggr_net"): "cross_net.aggr_net",
    ("cross_net", "aggr_net", "norm"): "cross_net.aggr_net.weight.0",
    ("cross_net", "aggr_net", "fc1"): "cross_net.aggr_net.weight.1",
    ("cross_net", "aggr_net", "fc2"): "cross_net.aggr_net.weight.3",
}
_OUR_MODULES = {v: k for k, v in OFFICIAL_MODULES.items()}
# Official shapes that differ from ours beyond the layout rule (the official scale is [1, 1, 1]).
_OFFICIAL_SHAPES = {("cross_net", "aggr_net", "scale"): (1, 1, 1)}

# The only backbones the official code builds (the hub checkpoints its encoders load).
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


def head_shapes(config) -> dict[layout.Path, tuple]:
  """Our path -> our shape of every non-encoder param of the SEPS model of `config` (the full
  config or `config.model`)."""
  mc = common.model_cfg(config)
  model = seps.SEPS.from_config(mc)
  e, nc = model.embed_dim, model.num_aggregated
  shapes = {}

  def dense(path, n_in, n_out):
    shapes[path + ("kernel",)] = (n_in, n_out)
    shapes[path + ("bias",)] = (n_out,)

  vw, tw = encoders.encoder_width(mc.vision), encoders.encoder_width(mc.text)
  if vw != e:
    dense(("vision_proj",), vw, e)
  if tw != e:
    dense(("fc",), tw, e)
  a = ("cross_net", "aggr_net")
  shapes[a + ("scale",)] = ()
  shapes[a + ("norm", "scale")] = (e,)
  shapes[a + ("norm", "bias")] = (e,)
  dense(a + ("fc1",), e, int(e * model.dim_ratio))
  dense(a + ("fc2",), int(e * model.dim_ratio), nc)
  return shapes


def official_name(path: layout.Path, ndim: int) -> str:
  """Our head param path -> its official name (`OFFICIAL_MODULES` + the torch-layout table)."""
  return OFFICIAL_MODULES[path[:-1]] + "." + layout.torch_name(path[-1:], ndim)


def official_shape(path: layout.Path, shape: tuple) -> tuple:
  return _OFFICIAL_SHAPES.get(path, layout.torch_shape(path, shape))


def to_official(path: layout.Path, x) -> np.ndarray:
  """Our head tensor at `path` -> its official layout (C order)."""
  x = layout.to_torch(path, np.asarray(x))
  return np.array(x.reshape(_OFFICIAL_SHAPES.get(path, x.shape)), order="C")


def from_official(name: str, x) -> tuple[layout.Path, np.ndarray]:
  """An official head tensor -> (our path, float32 C-order array in our layout)."""
  module, leaf = name.rsplit(".", 1)
  x = np.asarray(x)
  if leaf == "weight":
    leaf = "kernel" if x.ndim == 2 else "scale"
  path = _OUR_MODULES[module] + (leaf,)
  if path in _OFFICIAL_SHAPES:
    x = x.reshape(())
  # np.array, not ascontiguousarray: the latter turns the 0-d `scale` into shape (1,).
  return path, np.array(layout.from_torch(path, x), dtype=np.float32, order="C")


def head_table(config) -> dict[str, tuple[layout.Path, tuple]]:
  """Official name -> (our path, official shape) of every non-encoder tensor of the checkpoint."""
  return {official_name(p, len(s)): (p, official_shape(p, s))
          for p, s in head_shapes(config).items()}


def params_from_official(state_dict: Mapping[str, Any], config) -> dict:
  """Official SEPS state dict (`torch.load(...)['model']`, arrays as numpy) -> our params.

  Args:
    state_dict: official name -> array (`img_enc.visual_encoder.*`, `img_enc.vision_proj.*`,
      `txt_enc.bert.*`, `txt_enc.fc.*`, `cross_net.aggr_net.*`).
    config: the full config or `config.model` (fixes every expected name and shape).
  Returns:
    Nested dict of float32 numpy arrays: {'vision_encoder', 'text_encoder', 'vision_proj'?,
    'fc'?, 'cross_net': {'aggr_net': ...}}.
  Raises:
    ValueError: ONE error listing every missing, unexpected and mis-shaped tensor.
  """
  mc = common.model_cfg(config)
  table = head_table(mc)
  problems, params = [], {}
  for key, (prefix, cfg, name) in {
      "vision_encoder": (VISION_PREFIX, mc.vision, "vision"),
      "text_encoder": (TEXT_PREFIX, mc.text, "text")}.items():
    try:
      params[key] = hf.state_dict_to_params(cfg["model_type"], cfg, state_dict, prefix)
    except ValueError as err:
      problems.append(f"[{name} encoder] {err}")
  heads = {k: np.shape(v) for k, v in state_dict.items()
           if not k.startswith((VISION_PREFIX, TEXT_PREFIX))}
  problems += layout.compare_shapes(heads, {k: shape for k, (_, shape) in table.items()})
  if problems:
    raise ValueError("Official SEPS state dict does not match this config. " + " ".join(problems))
  for k in table:
    layout.set_path(params, *from_official(k, state_dict[k]))
  return params


def params_to_official(params: Mapping[str, Any], config) -> dict:
  """Exact inverse of `params_from_official`: our params -> official names and layouts.

  The HF poolers are not written (our encoders have none); the official loader uses
  `load_state_dict(strict=False)`, which leaves them at their initial values (unused by SEPS).

  Raises:
    ValueError: ONE error listing every missing, unexpected and mis-shaped param.
  """
  mc = common.model_cfg(config)
  shapes = head_shapes(mc)
  flat = layout.flatten({k: v for k, v in params.items()
                         if k not in ("vision_encoder", "text_encoder")})
  got = {"/".join(p): np.shape(x) for p, x in flat.items()}
  got.update({top: () for top in ("vision_encoder", "text_encoder") if top in params})
  want = {"/".join(p): s for p, s in shapes.items()}
  want.update(vision_encoder=(), text_encoder=())
  problems = layout.compare_shapes(got, want)
  out = {}
  for key, prefix, cfg in (("vision_encoder", VISION_PREFIX, mc.vision),
                           ("text_encoder", TEXT_PREFIX, mc.text)):
    if key in params:
      try:
        out.update(hf.params_to_state_dict(cfg["model_type"], cfg, params[key], prefix))
      except ValueError as err:
        problems.append(f"[{key}] {err}")
  if problems:
    raise ValueError("Params do not match this SEPS config. " + " ".join(problems))
  for p, shape in shapes.items():
    out[official_name(p, len(shape))] = to_official(p, flat[p])
  return out


def aggr_net_to_official(aggr_net_params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our `AggregationNet` params -> the official `TokenAggregation` state dict (`weight.0.weight`,
  ..., `scale` [1, 1, 1]), through the same table (benchmarks)."""
  a = ("cross_net", "aggr_net")
  prefix = OFFICIAL_MODULES[a] + "."
  return {official_name(a + p, np.ndim(x))[len(prefix):]: to_official(a + p, x)
          for p, x in layout.flatten(aggr_net_params).items()}


def aggr_net_from_official(aggr_net_state_dict: Mapping[str, Any]) -> dict:
  """The official `TokenAggregation` state dict (`weight.0.weight`, ..., `scale`) -> our
  `AggregationNet` params (numpy), through the same table (benchmarks)."""
  params = {}
  for k, v in aggr_net_state_dict.items():
    path, x = from_official("cross_net.aggr_net." + k, v)
    layout.set_path(params, path[2:], x)
  return params


def official_vit_type(config) -> str:
  """The official `--vit_type` naming the backbone (its VSEModel picks the HF hub model by it)."""
  v = config.model.vision
  size = int(config.data.image_size)
  base = "swin" if v.model_type == "swin" else "vit"
  return f"{base}_384" if size == 384 else base


def official_opt(config, step: int) -> argparse.Namespace:
  """The argparse namespace the official code saves as `'opt'` (its defaults + our config)."""
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
  """Raises common.ExportError unless the model has an official layout (SEPS/LAPS)."""
  name = common.check_model_type(config)
  if not models.MODELS[name].official_layout:
    raise common.ExportError(
        f"--format=official exists for SEPS/LAPS only (the official checkpoint layout is the "
        f"SEPS code's); this checkpoint is {name!r}: use --format=hf.")


def _torch():
  """PyTorch, which only the official `.pth` format needs (an install extra)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise common.ExportError(
        "The official .pth format needs PyTorch, which the core install leaves out: run "
        "`./install.sh --torch` (or `pip install 'gseps_jax[torch]'`).") from e
  return torch


def official_checkpoint(config, params: Mapping, step: int, meta: Optional[dict] = None) -> dict:
  """(config, params) -> the official checkpoint dict (torch tensors)."""
  torch = _torch()
  require_official(config)
  try:
    sd = params_to_official(params, config)
  except ValueError as e:
    raise common.ExportError(str(e)) from e
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
  path = Path(out_dir) / common.OFFICIAL_FILE  # local-path-ok: torch.save writes a local file
  torch.save(state, str(path))
  return path


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
    raise common.ExportError(f"{path} cannot be loaded with weights_only=True ({type(e).__name__}: "
                      f"{str(e)[:300]}). If you trust the file, pass --trust_pickle.") from e
  if not isinstance(obj, Mapping):
    raise common.ExportError(f"{path} holds a {type(obj).__name__}, not the official checkpoint "
                             f"dict.")
  if "model" in obj:
    sd, extras = obj["model"], {k: v for k, v in obj.items() if k != "model"}
  elif obj and all(torch.is_tensor(v) for v in obj.values()):
    sd, extras = obj, {}
  else:
    raise common.ExportError(f"{path} has top-level keys {sorted(obj)}; expected the official "
                      f"{{'model': state_dict, 'opt', 'epoch', ...}}.")
  out = {}
  for k, v in sd.items():
    if not torch.is_tensor(v):
      raise common.ExportError(f"State dict entry {k!r} is a {type(v).__name__}, not a tensor.")
    out[k] = v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
  return out, extras


def extras_summary(extras: dict) -> dict:
  out = {}
  for k in ("epoch", "best_rsum", "Eiters"):
    if k in extras:
      out[k] = float(extras[k]) if k == "best_rsum" else int(extras[k])
  if isinstance(extras.get("opt"), argparse.Namespace):
    out["opt"] = {k: v for k, v in vars(extras["opt"]).items()
                  if isinstance(v, (int, float, str, bool, list)) or v is None}
  return out
