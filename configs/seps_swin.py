"""SEPS with Swin-B-224 + BERT-base (rho 0.8, alpha 0.6; num_patches 49, N_c 23).

Run:  python -m gseps_jax.train --config configs/seps_swin.py --workdir runs/seps_swin
Variants as configs/seps_vit.py: `384` = Swin-B window-12 at 384 px (num_patches 144, N_c 69),
`parity` (train and evaluate with the official, answer-leaking dense pairing; default honest),
`tiny`, `demo`, key=value overrides of `model.seps.*`. Swin has no CLS: with the official
selection the image tower gets no gradient (see gseps_jax/models/seps.py).
Model selection on dev uses the sparse branch only (no dense captions for dev).
"""

from configs import common
from configs import seps_vit


def get_config(arg=None):
  flags, kv = common.parse_variant(arg)
  c = seps_vit.base_seps(common.SWIN_B, rho=0.8, alpha=0.6)
  if "384" in flags:
    c.model.vision.window_size = 12
  c = seps_vit.apply_variants(c, flags, kv)
  c.model.vision_hf_name = common.pretrained_name(c.model.vision, c.data.image_size)
  return c
