"""`sources.LeanSource` returns exactly what tfds's data source returns, for every builder."""

import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from gseps_jax.data import pipeline, sources

from test_data_karpathy import _build, write_fixture  # pylint: disable=g-bad-import-order


def _same(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert type(a[k]) is type(b[k]), (k, type(a[k]), type(b[k]))
    if isinstance(a[k], list):
      assert [type(x) for x in a[k]] == [type(x) for x in b[k]]
    assert a[k] == b[k], k


def _check_split(tfds_src):
  lean = sources.lean_source(tfds_src)
  assert isinstance(lean, sources.LeanSource)
  assert len(lean) == len(tfds_src)
  for i in range(len(tfds_src)):
    _same(lean[i], tfds_src[i])
  idx = list(range(len(tfds_src)))[::-1][:5]
  for got, want in zip(lean.__getitems__(idx), tfds_src.__getitems__(idx)):
    _same(got, want)
  assert lean.__getitems__([]) == []
  return lean


@pytest.mark.parametrize("name,coco", [("flickr30k_karpathy", False), ("coco_karpathy", True)])
def test_karpathy_builders(tmp_path, name, coco):
  manual, images, _ = write_fixture(tmp_path, coco=coco)
  builder, _ = _build(name, manual, images, tmp_path / "tfds")
  for split in builder.info.splits:
    _check_split(builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()}))


def test_synthetic_builder_and_open_split(data):
  src = pipeline.open_split(data, "train")  # synthetic_regions: extra int and text fields
  assert isinstance(src, sources.LeanSource)
  lean = _check_split(src.tfds_source)
  assert {"scene", "hard_negative", "difference"} <= set(lean[0])
  again = pickle.loads(pickle.dumps(lean))  # grain workers unpickle the source
  _same(again[3], src.tfds_source[3])


def test_unsupported_schema_keeps_the_tfds_source():
  class Info:  # a feature that is not flat: a [None, 4] float tensor
    class features:  # pylint: disable=invalid-name
      @staticmethod
      def get_serialized_info():
        return {"boxes": tfds.features.TensorInfo(shape=(None, 4), dtype=np.float32)}

  class Fake:
    dataset_info = Info
    data_source = ()

  fake = Fake()
  assert sources.lean_source(fake) is fake
  plain = [{"a": 1}]
  assert sources.lean_source(plain) is plain
