"""Word-level caption augmentation of the SEPS/LAPS training recipe, seeded.

Each word (BERT basic-tokeniser word, i.e. punctuation counts as a word) is selected with
probability `prob` (config `text_aug_prob`, 0.2). A selected word is, with conditional
probabilities 0.5 / 0.1 / 0.4 (the official split of the 20%):
  - masked: every wordpiece becomes [MASK];
  - replaced: every wordpiece becomes a random vocabulary token;
  - deleted.
Unselected words keep their wordpieces.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MASK_FRAC = 0.5
REPLACE_FRAC = 0.1  # the remaining 0.4 of selected words are deleted


def augment_words(words: Sequence[Sequence[int]], rng: np.random.Generator, prob: float, *,
                  mask_id: int, replace_ids: np.ndarray) -> list[int]:
  """Wordpiece ids grouped by word -> flat augmented wordpiece ids (no [CLS]/[SEP]).

  Args:
    words: per word, its wordpiece ids.
    rng: the example's generator (the only source of randomness).
    prob: probability that a word is augmented at all, in [0, 1].
    mask_id: id of [MASK].
    replace_ids: `[V'] int32` candidate ids for replacement (vocabulary without special tokens).
  """
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"text augmentation probability must be in [0, 1], got {prob}.")
  n = len(words)
  # Draw all decisions at once so the stream consumed does not depend on the outcomes.
  u = rng.random(n)
  v = rng.random(n)
  out: list[int] = []
  for i, pieces in enumerate(words):
    if u[i] >= prob:
      out.extend(pieces)
    elif v[i] < MASK_FRAC:
      out.extend([mask_id] * len(pieces))
    elif v[i] < MASK_FRAC + REPLACE_FRAC:
      out.extend(int(t) for t in rng.choice(replace_ids, size=len(pieces)))
    # else: deleted
  return out
