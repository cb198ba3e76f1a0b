"""LAPS baseline (the SEPS predecessor): the SEPS code with the sparse caption branch only.

ViT-B/16-224, rho 0.5, alpha 0.4, no dense captions anywhere (training, dev and test), so model
selection on dev is exact. Paper: Flickr30K rSum 507.3.
Run:  python -m gseps_jax.train --config configs/laps_vit.py --workdir runs/laps_vit
Variants as configs/seps_vit.py (`384`, `tiny`, `demo`, key=value).
"""

from configs import common
from configs import seps_vit


def get_config(arg=None):
  flags, kv = common.parse_variant(arg)
  c = seps_vit.base_seps(common.VIT_B16, rho=0.5, alpha=0.4)
  c.model.seps.use_dense = False
  c.model.seps.ratio_weight = 2.0
  c.data.dense_max_len = 2  # no dense branch: the (unused) dense caption is [CLS] [SEP] only
  c = seps_vit.apply_variants(c, flags, kv)
  c.model.vision_hf_name = common.pretrained_name(c.model.vision, c.data.image_size)
  c.model.seps.use_dense = False
  return c
