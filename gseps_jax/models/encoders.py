"""The encoder table and helpers that build an encoder from an HF-style config.

`cfg` everywhere is a dict or `ml_collections.ConfigDict` with HF `config.json` keys
(`configs/common.py`: `VIT_B16`, `SWIN_B`, `BERT_BASE`, `*_TINY`), so an HF directory's config can
be used as is.
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from gseps_jax.models.bert import Bert
from gseps_jax.models.layers import REMAT_POLICIES
from gseps_jax.models.swin import Swin, swin_output_grid
from gseps_jax.models.vit import ViT, pair

ENCODERS = {"vit": ViT, "swin": Swin, "bert": Bert}
VISION_TYPES = ("vit", "swin")


def config_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """A plain dict copy of `cfg` (accepts dict or ConfigDict)."""
  return dict(cfg.to_dict()) if hasattr(cfg, "to_dict") else dict(cfg)


def model_type(cfg: Mapping[str, Any]) -> str:
  """`cfg['model_type']`, checked against `ENCODERS`."""
  mt = cfg.get("model_type")
  if mt not in ENCODERS:
    raise ValueError(f"Unknown encoder model_type {mt!r}; supported: {sorted(ENCODERS)}.")
  return mt


def encoder_from_config(cfg: Mapping[str, Any], dtype: Any = jnp.float32,
                        remat: str = "none") -> nn.Module:
  """Builds `ViT` / `Swin` / `Bert` from HF config keys; `dtype` = compute dtype (str or dtype).

  Keys the module does not use (HF configs carry many) are ignored; missing keys take the HF
  defaults of that model's config class. `remat` (`config.model.remat`: "none" | "blocks" |
  "dots") rematerialises the transformer blocks in the backward pass (`layers.remat_block`); it
  is not an HF key and does not change the parameters.
  """
  cfg = config_dict(cfg)
  if remat != "none" and remat not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat {remat!r}; supported: {('none', *REMAT_POLICIES)}.")
  return ENCODERS[model_type(cfg)].from_config(cfg, dtype=jnp.dtype(dtype), remat=remat)


def encoder_width(cfg: Mapping[str, Any]) -> int:
  """Width D of the encoder's output tokens (ViT/BERT `hidden_size`; Swin final-stage width)."""
  cfg = config_dict(cfg)
  mt = model_type(cfg)
  if mt == "swin":
    return int(cfg["embed_dim"] * 2 ** (len(cfg["depths"]) - 1))
  return int(cfg["hidden_size"])


def encoder_grid(cfg: Mapping[str, Any], image_size: int | Sequence[int] | None = None
                 ) -> tuple[int, int]:
  """`(h, w)` grid of patch tokens a vision encoder produces for `image_size` (default: config's).

  ViT: `(H // p, W // p)` (no CLS); Swin: the final-stage grid (rounding up at each step).
  """
  cfg = config_dict(cfg)
  mt = model_type(cfg)
  if mt not in VISION_TYPES:
    raise ValueError(f"encoder_grid needs a vision encoder config, got model_type {mt!r}.")
  hw = pair(cfg.get("image_size", 224) if image_size is None else image_size)
  p = pair(cfg.get("patch_size", 16 if mt == "vit" else 4))
  if mt == "vit":
    return hw[0] // p[0], hw[1] // p[1]
  return swin_output_grid(hw, p, len(cfg["depths"]))


def encoder_num_tokens(cfg: Mapping[str, Any],
                       image_size: int | Sequence[int] | None = None) -> int:
  """Number of tokens a vision encoder returns: ViT `1 + h*w` (CLS first), Swin `h*w`.

  E.g. ViT-B/16 at 224 -> 197, at 384 -> 577; Swin-B at 224 -> 49, window-12 at 384 -> 144.
  """
  h, w = encoder_grid(cfg, image_size)
  return h * w + (1 if config_dict(cfg)["model_type"] == "vit" else 0)
