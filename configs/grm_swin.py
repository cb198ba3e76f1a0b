"""GRM with Swin-B (window7-224) + BERT-base and K=50 region prompts (docs/grm_design.md).

Run:  python -m gseps_jax.train --config configs/grm_swin.py --workdir runs/grm_swin
Variants (comma-separated, `--config configs/grm_swin.py:384`):
  384   Swin-B window12 at 384 px (144 final tokens).
  tiny  random 2-stage Swin / 2-layer BERT at 64 px, batch 8: CPU tests.
  demo  see configs/grm_vit.py (the demo uses a small ViT whatever the family).
  infonce  InfoNCE with a learnable temperature.
  key=value pairs override `model.grm.*` fields, e.g. `num_regions=32`.

Recipe and loss weights: as configs/grm_vit.py.
"""

from configs import common
from configs import grm_vit


def get_config(arg=None):
  flags, kv = common.parse_variant(arg)
  c = grm_vit.base_grm(common.SWIN_B, num_regions=50)
  c = grm_vit.apply_variants(c, flags, kv)
  c.model.vision_hf_name = common.pretrained_name(c.model.vision, c.data.image_size)
  return c
