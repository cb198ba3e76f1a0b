"""Tokenised dense captions cached per split (gseps_jax/data/token_cache.py): the batches equal
per-example tokenisation (flips included), the file is keyed and reused, and the config path
uses it."""

import dataclasses

import ml_collections
import numpy as np
import pytest

from gseps_jax.data import pipeline, token_cache
from tests import tiny

PP = pipeline.Preprocess(image_size=16, max_len=12, dense_max_len=40, crop_scale=(0.6, 1.0),
                         hflip=0.5)


def _cfg(data, tmp_path):
  return ml_collections.ConfigDict(dict(data, text_cache_dir=str(tmp_path / "cache")))


def _loader(data, tok, pp, **kw):
  return pipeline.TrainLoader(pipeline.open_split(data, "train"), tok, pp, global_batch_size=8,
                              seed=3, process_index=0, process_count=1, **kw)


@pytest.mark.parametrize("device_augment", [False, True])
def test_batches_equal_per_example_tokenisation(data, tok, tmp_path, device_augment):
  pp = dataclasses.replace(PP, device_augment=device_augment, canvas_size=32)
  src = pipeline.open_split(data, "train")
  cache = token_cache.for_split(_cfg(data, tmp_path), src, "train", tok=tok,
                                max_len=pp.dense_max_len, flips=True)
  flip_rows = cache.rows.flip_rows
  assert (flip_rows != np.arange(len(flip_rows))).any()  # some dense captions change when swapped
  plain, cached = _loader(data, tok, pp), _loader(data, tok, pp, dense_tokens=cache)
  swapped_seen = False
  for _ in range(6):  # 48 examples: both flip states, swapped rows among them
    want, got = next(plain), next(cached)
    assert sorted(want) == sorted(got)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got["dense_ids"].dtype == np.int32 and got["dense_mask"].dtype == np.int32
    rows = cache.rows.offsets[got["image_index"]]
    swapped_seen |= bool((flip_rows[rows] != rows).any())
  assert swapped_seen


def test_file_is_padded_with_minus_one_keyed_and_reused(data, tok, tmp_path, monkeypatch):
  cfg, src = _cfg(data, tmp_path), pipeline.open_split(data, "train")
  first = token_cache.for_split(cfg, src, "train", tok=tok, max_len=40, flips=False)
  table = np.load(first.rows.path)
  ids, mask = tok.encode(pipeline.sources.as_text(src[2]["dense_caption"]), 40)
  np.testing.assert_array_equal(table[2], np.where(mask > 0, ids, -1))
  assert first.rows.flip_rows is None and table.shape == (len(src), 40)
  other = token_cache.for_split(cfg, src, "train", tok=tok, max_len=24, flips=False)
  assert other.rows.path != first.rows.path  # max_len is part of the key

  def fail(*a, **k):
    raise AssertionError("rebuilt an existing token file")
  monkeypatch.setattr(token_cache, "write_tokens", fail)
  again = token_cache.for_split(cfg, src, "train", tok=tok, max_len=40, flips=False)
  assert again.rows.path == first.rows.path
  assert not list((tmp_path / "cache").glob("*.tmp*"))  # written atomically, nothing left


def test_enabled_only_for_models_that_tokenise_dense():
  cfg = ml_collections.ConfigDict({"cache_dense_tokens": True})
  assert token_cache.enabled(cfg, tokenizes_dense=True)
  assert not token_cache.enabled(cfg, tokenizes_dense=False)
  cfg.cache_dense_tokens = False
  assert not token_cache.enabled(cfg, tokenizes_dense=True)


def test_dense_tokens_need_a_dense_pipeline(data, tok, tmp_path):
  src = pipeline.open_split(data, "train")
  cache = token_cache.for_split(_cfg(data, tmp_path), src, "train", tok=tok, max_len=40,
                                flips=True)
  with pytest.raises(ValueError, match="does not tokenise dense captions"):
    _loader(data, tok, dataclasses.replace(PP, dense=False), dense_tokens=cache)


def _tiny_config(model, data, tmp_path, **data_fields):
  """`model`'s tiny config on the test's generated data, caches under tmp_path, `data_fields`
  set on `config.data`."""
  c = tiny.tiny_config(model)
  c.data.name, c.data.data_dir = data["name"], data["data_dir"]
  c.data.synthetic.update(data["synthetic"])
  c.data.text_cache_dir = str(tmp_path / "cache")
  c.data.update(data_fields)
  return c


def _first_batch(c, tok, *, tokenizes_dense):
  """(`TrainLoader.from_config(c)`, its first batch of 8); the loader is closed."""
  loader = pipeline.TrainLoader.from_config(c, global_batch_size=8, seed=0, process_index=0,
                                            process_count=1, tok=tok,
                                            tokenizes_dense=tokenizes_dense, uses_dense=False)
  try:
    return loader, next(loader)
  finally:
    loader.close()


@pytest.mark.parametrize("on", [True, False])
def test_from_config_uses_the_cache_unless_switched_off(data, tok, tmp_path, on):
  c = _tiny_config("seps", data, tmp_path, cache_dense_tokens=on)
  loader, batch = _first_batch(c, tok, tokenizes_dense=True)
  assert (loader.dense_tokens is not None) == on
  assert batch["dense_ids"].shape == (8, c.data.dense_max_len)
  assert bool(list((tmp_path / "cache").glob("*_dense_tokens_*.npy"))) == on
  no_dense = pipeline.TrainLoader.from_config(c, global_batch_size=8, seed=0, process_index=0,
                                              process_count=1, tok=tok, tokenizes_dense=False,
                                              uses_dense=False)
  assert no_dense.dense_tokens is None


# ----------------------------------------------------------------------------- caption tokens

CAPTION_PP = dataclasses.replace(PP, text_aug_prob=0.0, dense=False)


@pytest.mark.parametrize("device_augment", [False, True])
def test_caption_tokens_equal_per_example_tokenisation(data, tok, tmp_path, device_augment):
  """Without text augmentation a caption's tokens depend only on (image, choice, flipped): the
  batches built from the caption token cache equal per-example tokenisation, flipped (swapped
  left/right) captions included, and so does every other field (the draws are the same)."""
  pp = dataclasses.replace(CAPTION_PP, device_augment=device_augment, canvas_size=32)
  src = pipeline.open_split(data, "train")
  cache = token_cache.for_split(_cfg(data, tmp_path), src, "train", tok=tok, max_len=pp.max_len,
                                flips=True, kind="captions")
  assert cache.rows.path.endswith(".npy") and "_captions_tokens_" in cache.rows.path
  table = np.load(cache.rows.path)
  swapped = {tuple(r) for r in table[cache.rows.offsets[-1]:]}  # rows only a flip reads
  assert swapped
  plain, cached = _loader(data, tok, pp), _loader(data, tok, pp, caption_tokens=cache)
  swapped_seen = choices_seen = False
  for _ in range(6):
    want, got = next(plain), next(cached)
    assert sorted(want) == sorted(got)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got["input_ids"].dtype == np.int32 and got["attention_mask"].dtype == np.int32
    rows = np.where(got["attention_mask"] > 0, got["input_ids"], -1)
    swapped_seen |= any(tuple(r) in swapped for r in rows)
    choices_seen |= len({tuple(r) for r in rows}) > 1
  assert swapped_seen and choices_seen


def test_caption_tokens_refuse_an_augmenting_pipeline(data, tok, tmp_path):
  src = pipeline.open_split(data, "train")
  cache = token_cache.for_split(_cfg(data, tmp_path), src, "train", tok=tok, max_len=12,
                                flips=True, kind="captions")
  with pytest.raises(ValueError, match="augments captions"):
    _loader(data, tok, dataclasses.replace(CAPTION_PP, text_aug_prob=0.2), caption_tokens=cache)
  with pytest.raises(ValueError, match="kind"):
    token_cache.for_split(_cfg(data, tmp_path), src, "train", tok=tok, max_len=12, flips=False,
                          kind="words")


@pytest.mark.parametrize("aug,on,used", [(0.0, True, True), (0.0, False, False),
                                         (0.2, True, False)])
def test_from_config_caches_captions_only_without_augmentation(data, tok, tmp_path, aug, on,
                                                                used):
  c = _tiny_config("grm", data, tmp_path, text_aug_prob=aug, cache_caption_tokens=on)
  loader, batch = _first_batch(c, tok, tokenizes_dense=False)
  assert (loader.caption_tokens is not None) == used
  assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, c.data.max_len)
  assert bool(list((tmp_path / "cache").glob("*_captions_tokens_*.npy"))) == used
