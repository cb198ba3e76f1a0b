"""Hugging Face PyTorch checkpoints <-> our Flax encoder params, in both directions.

Our modules name their submodules like HF's PyTorch modules, so the map is the one mechanical
rule of `interop/layout.py` (names and layouts; e.g. `encoder/layer_3/.../kernel` <->
`encoder.layer.3....weight`, transposed).

Names are those `save_pretrained` writes (e.g. `encoder.layer.0.attention.attention.query.weight`
for ViT, `encoder.layer.0.attention.self.query.weight` for BERT), which are also the names in the
hub checkpoints and in the authors' SEPS/GRM checkpoints under their prefixes
(`img_enc.visual_encoder.`, `txt_enc.bert.`).

Ignored on import (documented, never an error): the pooler (`pooler.*`; our encoders return
tokens), and non-parameter buffers (`*.relative_position_index`, `embeddings.position_ids`,
`embeddings.token_type_ids`). With a non-empty `prefix`, keys outside the prefix are ignored too
(a full SEPS checkpoint holds both towers and the heads).

Params are plain nested dicts of float32 `np.ndarray` (the `'params'` collection of the module).
"""

import functools
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gseps_jax.interop import layout
from gseps_jax.models.encoders import ENCODERS, config_dict, encoder_from_config
from gseps_jax.models.vit import pair

IGNORED_KEYS = (re.compile(r"(^|\.)pooler\."), re.compile(r"(^|\.)relative_position_index$"),
                re.compile(r"^embeddings\.(position_ids|token_type_ids)$"))
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@functools.lru_cache(maxsize=32)
def _param_shapes_cached(cfg_json: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  cfg = json.loads(cfg_json)
  module = encoder_from_config(cfg)
  if cfg["model_type"] == "bert":
    args = (jnp.zeros((1, 1), jnp.int32),)
  else:
    h, w = pair(cfg.get("image_size", 224))
    args = (jnp.zeros((1, h, w, cfg.get("num_channels", 3)), jnp.float32),)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  return {path: tuple(v.shape) for path, v in layout.flatten(shapes).items()}


def param_shapes(model_type: str, cfg: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat `{flax path: shape}` of the encoder's params (abstract init; nothing is allocated)."""
  cfg = _checked_cfg(model_type, cfg)
  return _param_shapes_cached(json.dumps(cfg, sort_keys=True, default=list))


def _checked_cfg(model_type: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
  if model_type not in ENCODERS:
    raise ValueError(f"Unknown model_type {model_type!r}; supported: {sorted(ENCODERS)}.")
  cfg = config_dict(cfg)
  if cfg.get("model_type", model_type) != model_type:
    raise ValueError(f"model_type {model_type!r} disagrees with the config's "
                     f"{cfg['model_type']!r}.")
  cfg["model_type"] = model_type
  return cfg


def state_dict_to_params(model_type: str, cfg: Mapping[str, Any],
                         state_dict: Mapping[str, np.ndarray], prefix: str = "") -> dict:
  """HF-named PyTorch-layout arrays -> the encoder's Flax params.

  Args:
    model_type: 'vit' | 'swin' | 'bert'.
    cfg: HF config keys (fix the expected names and shapes).
    state_dict: name -> array (numpy or anything `np.asarray` takes).
    prefix: prepended to every HF name, e.g. `'img_enc.visual_encoder.'`; keys outside it are
      ignored when it is non-empty.

  Returns:
    Nested dict of float32 `np.ndarray` (the module's `'params'`).

  Raises:
    ValueError: one message listing all missing and unexpected tensors, or naming the first
      tensor whose shape differs (expected vs got, PyTorch layout).
  """
  shapes = param_shapes(model_type, cfg)
  params: dict = {}
  used, missing = set(), []
  for path, shape in shapes.items():
    name = prefix + layout.torch_name(path, len(shape))
    if name not in state_dict:
      missing.append(name)
      continue
    x = np.asarray(state_dict[name])
    want = layout.torch_shape(path, shape)
    if x.shape != want:
      raise ValueError(f"Tensor {name!r} has shape {x.shape}, expected {want} for this "
                       f"{model_type} config.")
    used.add(name)
    layout.set_path(params, path, np.ascontiguousarray(layout.from_torch(path, x),
                                                     dtype=np.float32))
  unexpected = [k for k in state_dict
                if k.startswith(prefix) and k not in used
                and not any(p.search(k[len(prefix):]) for p in IGNORED_KEYS)]
  problems = layout.mismatch_report(missing, unexpected, limit=layout.MAX_LISTED)
  if problems:
    raise ValueError(" ".join([f"State dict does not match the {model_type} encoder (prefix "
                               f"{prefix!r})."] + problems))
  return params


def params_to_state_dict(model_type: str, cfg: Mapping[str, Any], params: Mapping,
                         prefix: str = "") -> dict[str, np.ndarray]:
  """Exact inverse of `state_dict_to_params`: Flax params -> HF names, PyTorch layouts.

  Arrays are copied to host, contiguous, in the params' dtype (no pooler is written; HF fills a
  missing pooler with fresh weights when loading into `*Model`, and ignores it for the tokens).

  Raises:
    ValueError: listing param paths missing from / unexpected in `params` for this config.
  """
  shapes = param_shapes(model_type, cfg)
  flat = layout.flatten(params)
  missing = ["/".join(p) for p in shapes if p not in flat]
  unexpected = ["/".join(p) for p in flat if p not in shapes]
  if missing or unexpected:
    hint = (" (pass variables['params'], not the variables dict)"
            if set(params) == {"params"} else "")
    raise ValueError(f"Params do not match the {model_type} encoder{hint}: missing "
                     f"{layout.listing(missing, layout.MAX_LISTED)}; unexpected "
                     f"{layout.listing(unexpected, layout.MAX_LISTED)}.")
  out = {}
  for path in shapes:
    x = np.asarray(flat[path])
    if x.shape != shapes[path]:
      raise ValueError(f"Param {'/'.join(path)} has shape {x.shape}, expected {shapes[path]}.")
    out[prefix + layout.torch_name(path, x.ndim)] = np.ascontiguousarray(layout.to_torch(path, x))
  return out


def _model_dir(path_or_dir: str) -> str:
  path = os.fspath(path_or_dir)
  if os.path.isfile(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"HF model directory {path!r} does not exist; expected a local directory with "
        f"config.json and {' or '.join(WEIGHT_FILES)} (as written by save_pretrained).")
  return path


def hf_config(path: str) -> dict[str, Any]:
  """The `config.json` of a local HF directory (or of the directory holding `path`)."""
  d = _model_dir(path)
  f = os.path.join(d, "config.json")
  if not os.path.isfile(f):
    raise FileNotFoundError(f"No config.json in HF model directory {d!r} (expected config.json "
                            f"and model weights as written by save_pretrained).")
  with open(f) as fh:
    return json.load(fh)


def _load_safetensors(f: str) -> dict[str, np.ndarray]:
  from safetensors import numpy as st_numpy, safe_open
  try:
    return st_numpy.load_file(f)
  except TypeError:
    # NumPy has no bfloat16 for safetensors' numpy reader; read through jax (ml_dtypes) instead.
    with safe_open(f, framework="flax") as fh:
      return {k: np.asarray(fh.get_tensor(k)) for k in fh.keys()}


def read_state_dict(path_or_dir: str) -> dict[str, np.ndarray]:
  """All tensors of a local HF directory: `model.safetensors`, a sharded safetensors index, or
  `pytorch_model.bin` (this one needs torch)."""
  d = _model_dir(path_or_dir)
  single = os.path.join(d, "model.safetensors")
  index = os.path.join(d, "model.safetensors.index.json")
  bin_file = os.path.join(d, "pytorch_model.bin")
  if os.path.isfile(single):
    return _load_safetensors(single)
  if os.path.isfile(index):
    with open(index) as fh:
      shards = sorted(set(json.load(fh)["weight_map"].values()))
    sd = {}
    for shard in shards:
      sd.update(_load_safetensors(os.path.join(d, shard)))
    return sd
  if os.path.isfile(bin_file):
    try:
      import torch  # only for legacy pickled checkpoints
    except ImportError as e:
      raise FileNotFoundError(
          f"{bin_file} is a PyTorch pickle, which needs PyTorch (not in the core install): "
          f"run `./install.sh --torch`, or convert the directory to model.safetensors.") from e
    sd = torch.load(bin_file, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in sd.items()}
  raise FileNotFoundError(f"No weights in HF model directory {d!r}; expected one of "
                          f"{', '.join(WEIGHT_FILES)}.")


def _detect_prefix(model_type: str, keys) -> str:
  """'' for a saved `*Model`; `'vit.'`/`'swin.'`/`'bert.'` for task models (`ViTForX`, ...)."""
  if any(k.startswith("embeddings.") for k in keys):
    return ""
  if any(k.startswith(f"{model_type}.embeddings.") for k in keys):
    return f"{model_type}."
  return ""


def load_hf_encoder(path_or_dir: str, dtype: Any = jnp.float32):
  """Builds the encoder of a local HF directory and imports its weights.

  The architecture comes from `config.json`'s `model_type` (vit, swin, bert). Checkpoints saved
  from `ViTModel`/`SwinModel`/`BertModel` and from task models (`vit.`/`swin.`/`bert.` prefix, e.g.
  `ViTForImageClassification`, `BertForMaskedLM`) are accepted; heads and the pooler are ignored.

  Args:
    path_or_dir: directory with `config.json` and `model.safetensors` (or sharded safetensors, or
      `pytorch_model.bin`).
    dtype: compute dtype of the returned module (params are float32).

  Returns:
    `(module, params)`: use as `module.apply({'params': params}, inputs)`.
  """
  cfg = hf_config(path_or_dir)
  mt = cfg.get("model_type")
  if mt not in ENCODERS:
    raise ValueError(f"Unsupported model_type {mt!r} in {path_or_dir!r}; supported: "
                     f"{sorted(ENCODERS)}.")
  sd = read_state_dict(path_or_dir)
  params = state_dict_to_params(mt, cfg, sd, prefix=_detect_prefix(mt, sd))
  return encoder_from_config(cfg, dtype=dtype), params


def load_hf_tokenizer(path: str):
  """A slow `BertTokenizer` from the `vocab.txt` of a local directory.

  transformers 5's `BertTokenizerFast(vocab_file=...)` silently maps every word to [UNK], so the
  WordPiece tokenizer is built from the vocabulary file and checked on a common word.
  `do_lower_case` comes from `tokenizer_config.json` when present (default True).
  """
  from transformers import BertTokenizer
  d = _model_dir(path)
  vocab = os.path.join(d, "vocab.txt")
  if not os.path.isfile(vocab):
    raise FileNotFoundError(f"No vocab.txt in tokenizer directory {d!r} (expected a BERT "
                            f"WordPiece vocabulary file).")
  kwargs = {}
  tc = os.path.join(d, "tokenizer_config.json")
  if os.path.isfile(tc):
    with open(tc) as fh:
      tcfg = json.load(fh)
    for k in ("do_lower_case", "model_max_length", "strip_accents", "tokenize_chinese_chars"):
      if k in tcfg and tcfg[k] is not None:
        kwargs[k] = tcfg[k]
  tok = BertTokenizer(vocab, **kwargs)
  probe = tok.convert_tokens_to_ids(tok.tokenize("the"))
  if tok.unk_token_id in probe:
    raise ValueError(f"Tokenizer from {vocab!r} maps 'the' to {tok.unk_token}; the vocabulary "
                     f"is not a BERT WordPiece vocabulary.")
  return tok
