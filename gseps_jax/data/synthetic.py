"""`synthetic_regions`: the tfds builder of the generated fine-grained image-caption dataset
(the embedded demo). What an example is (scenes of coloured shapes, captions, one-attribute hard
negatives) and how it is generated: `data/scenes.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gseps_jax.data import karpathy
from gseps_jax.data import scenes


@dataclasses.dataclass(eq=True)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Sizes, image side and seed; the config name encodes them (one data dir per setting)."""
  num_train: int = 5000
  num_dev: int = 200
  num_test: int = 500
  image_size: int = 64
  seed: int = 0


def config_name(num_train: int, num_dev: int, num_test: int, image_size: int, seed: int) -> str:
  return f"{image_size}px_{num_train}_{num_dev}_{num_test}_seed{seed}"


def _config(**kw) -> SyntheticConfig:
  return SyntheticConfig(name=config_name(**kw), **kw)


class SyntheticRegions(tfds.core.GeneratorBasedBuilder):
  """Generated scenes of coloured shapes with fine-grained captions and one-attribute hard
  negatives."""

  # tfds finds the module's files through importlib resources of the top-level package, which
  # fails for a namespace/editable install; name them explicitly.
  pkg_dir_path = epath.Path(__file__).parent
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial generator.",
                   "1.1.0": "Shorter position-first captions (longest caption 45 -> 37 word "
                            "pieces); info.metadata records the longest caption per split."}
  # No BUILDER_CONFIGS: tfds insists a config named like a predefined one be that very object,
  # which breaks pickling the data source into worker processes. Every config is custom and its
  # name encodes the settings.

  def __init__(self, *, config: SyntheticConfig | None = None, **kwargs):
    super().__init__(config=config or self.make_config(), **kwargs)

  @staticmethod
  def make_config(*, num_train: int = 5000, num_dev: int = 200, num_test: int = 500,
                  image_size: int = 64, seed: int = 0) -> SyntheticConfig:
    """A config (the default: 5,000 / 200 / 500 images of 64 px, seed 0)."""
    for n, v in (("num_train", num_train), ("num_dev", num_dev), ("num_test", num_test),
                 ("image_size", image_size)):
      if int(v) < 1:
        raise ValueError(f"synthetic_regions {n} must be >= 1, got {v}.")
    return _config(num_train=int(num_train), num_dev=int(num_dev), num_test=int(num_test),
                   image_size=int(image_size), seed=int(seed))

  def _info(self) -> tfds.core.DatasetInfo:
    # metadata (saved with the data, `builder.info.metadata`): per split, the longest caption
    # and dense caption in word pieces with [CLS]/[SEP] (`max_caption_pieces`,
    # `max_dense_pieces`: {split: n}), so a config's max_len can be checked against the data.
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(karpathy.example_features(
            scene=tfds.features.Text(), hard_negative=np.int32,
            difference=tfds.features.Text())),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    sizes = {"train": c.num_train, "dev": c.num_dev, "test": c.num_test}
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split: str, num_images: int) -> Iterator:
    c = self.builder_config
    meta = self.info.metadata
    longest = meta.setdefault("max_caption_pieces", {})
    longest_dense = meta.setdefault("max_dense_pieces", {})
    longest[split] = longest_dense[split] = 0
    for index in range(num_images):
      if index % 2 == 0:
        pair = scenes.generate_pair(c.seed, split, index // 2, c.image_size)
      ex = pair[index % 2]
      if index == num_images - 1 and index % 2 == 0:
        ex = dict(ex, hard_negative=-1)
      pieces = scenes.num_word_pieces
      longest[split] = max([longest[split]] + [pieces(t) for t in ex["captions"]])
      longest_dense[split] = max(longest_dense[split], pieces(ex["dense_caption"]))
      yield index, ex
