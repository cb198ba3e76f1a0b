"""Cached frozen text features (gseps_jax/data/text_cache.py): equal to the encoder's train=False
outputs, keyed by max_len, written atomically, and training on them gives the loss of running
the frozen tower."""

import numpy as np
import pytest

import jax
import ml_collections

from gseps_jax.data import pipeline, text_cache
from gseps_jax.interop import hf as hf_import
from tests import tiny

CAPTIONS = [
    ["a red circle at the top left", "one shape", "a small red circle", "red", "a circle"],
    ["a blue square on the right and a green diamond", "two shapes", "blue and green",
     "a square on the right", "a diamond in the middle"],
    ["a large white triangle at the bottom left", "a triangle", "white", "one large shape",
     "a white triangle on the left of the picture"],
]


def _records():
  return [{"captions": caps, "dense_caption": f"there is the dense caption {i} on the left",
           "index": i} for i, caps in enumerate(CAPTIONS)]


def _config(tmp_path, **overrides):
  c = tiny.tiny_config("grm")
  d = tiny.minilm_dir()
  c.model.text = ml_collections.ConfigDict(hf_import.hf_config(d))
  c.model.text_hf_dir = d
  c.model.freeze_text = True
  c.data.text_aug_prob = 0.0
  c.data.text_cache_dir = str(tmp_path / "cache")
  c.data.max_len = 12
  for k, v in overrides.items():
    node, *rest = k.split(".")
    c[node][rest[0]] = v
  return c


@pytest.fixture(scope="module")
def minilm():
  return hf_import.load_hf_encoder(tiny.minilm_dir())


def _encode(minilm, tok, texts, max_len):
  module, params = minilm
  ids, mask = tok.encode_batch(texts, max_len)
  return np.asarray(module.apply({"params": params}, ids, mask, train=False))


def test_cached_features_equal_encoder_outputs(tmp_path, minilm):
  config = _config(tmp_path, **{"data.hflip": 0.5})
  tok = pipeline.tokenizer_from_config(config)
  cache = text_cache.for_split(config, _records(), "train", train=True, tok=tok)
  item, choice = np.array([0, 2, 1, 1]), np.array([1, 4, 0, 3])
  flipped = np.array([False, False, True, True])
  got = cache.lookup(item, choice, flipped).astype(np.float32)
  texts = [CAPTIONS[i][j] for i, j in zip(item, choice)]
  texts = [pipeline.swap_left_right(t) if f else t for t, f in zip(texts, flipped)]
  assert texts[2] == "a blue square on the left and a green diamond"
  want = _encode(minilm, tok, texts, config.data.max_len)
  valid = tok.encode_batch(texts, config.data.max_len)[1].astype(bool)
  assert got.shape == want.shape == (4, 12, 384) and not valid.all()
  # Valid positions as the encoder computes them (float16 storage); padding stored as zeros.
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-2, atol=1e-2)
  assert not got[~valid].any()
  # Not just any features: the row of another caption is far off.
  assert np.abs(got[0] - want[1]).max() > 0.1
  # Evaluation (train=False) caches no swapped rows and asks for none.
  ev = text_cache.for_split(config, _records(), "test", tok=tok)
  assert ev.flip_rows is None
  one = ev.lookup([2], [4], [False]).astype(np.float32)
  valid = tok.encode_batch([CAPTIONS[2][4]], 12)[1].astype(bool)
  np.testing.assert_allclose(one[valid], _encode(minilm, tok, [CAPTIONS[2][4]], 12)[valid],
                             rtol=1e-2, atol=1e-2)


def test_cache_key_changes_with_max_len_and_reuses_file(tmp_path, monkeypatch):
  kw = dict(weights="w", vocab="v", texts=["a red circle"], text_config={"hidden_size": 384})
  assert text_cache.cache_key(max_len=16, **kw) != text_cache.cache_key(max_len=17, **kw)
  assert text_cache.cache_key(max_len=16, **kw) == text_cache.cache_key(max_len=16, **kw)
  assert (text_cache.cache_key(max_len=16, **kw) != text_cache.cache_key(
      max_len=16, **dict(kw, texts=["a red circle."])))
  config = _config(tmp_path)
  tok = pipeline.tokenizer_from_config(config)
  first = text_cache.for_split(config, _records(), "train", tok=tok)
  config.data.max_len = 10
  other = text_cache.for_split(config, _records(), "train", tok=tok)
  assert first.path != other.path
  assert np.load(other.path, mmap_mode="r").shape == (15, 10, 384)

  def fail(*a, **k):
    raise AssertionError("rebuilt an existing cache")

  monkeypatch.setattr(text_cache, "compute_features", fail)
  config.data.max_len = 12
  assert text_cache.for_split(config, _records(), "train", tok=tok).path == first.path


def test_cache_written_atomically(tmp_path, minilm):
  module, params = minilm
  tok = pipeline.tokenizer_from_config(_config(tmp_path))
  calls = []

  class BrokenTok:  # fails on the second batch, after the first was written
    def encode_batch(self, texts, max_len):
      calls.append(1)
      if len(calls) > 1:
        raise RuntimeError("interrupted")
      return tok.encode_batch(texts, max_len)

  path = tmp_path / "out" / "f.npy"
  with pytest.raises(RuntimeError, match="interrupted"):
    text_cache.compute_features(["a", "b", "c"], path, encoder=module, params=params,
                                tok=BrokenTok(), max_len=8, batch_size=2)
  assert len(calls) == 2
  assert not path.exists() and not list(path.parent.iterdir())  # no partial or temp file
  text_cache.compute_features(["a", "b", "c"], path, encoder=module, params=params, tok=tok,
                              max_len=8, batch_size=2)
  assert [p.name for p in path.parent.iterdir()] == ["f.npy"]


def test_not_cached_without_frozen_pretrained_tower(tmp_path):
  assert text_cache.for_split(_config(tmp_path, **{"model.freeze_text": False}), _records(),
                              "train") is None
  assert text_cache.for_split(_config(tmp_path, **{"model.cache_text": False}), _records(),
                              "train") is None
  aug = _config(tmp_path, **{"data.text_aug_prob": 0.2})
  assert text_cache.for_split(aug, _records(), "train", train=True) is None
  assert text_cache.for_split(aug, _records(), "test") is not None  # eval: no augmentation


def test_training_loss_same_with_cache(tmp_path, minilm):
  """One training batch of the tiny GRM with a frozen MiniLM: the loss from cached features
  equals the loss of running the frozen tower (dropout off in it), and differs when the cached
  rows are those of other captions."""
  from gseps_jax import models, trainer
  from gseps_jax import state as state_lib
  config = _config(tmp_path, **{"data.hflip": 0.5})
  config.data.data_dir = str(tiny.DATA_DIR)
  tiny.ensure_data(config)
  loader = pipeline.TrainLoader.from_config(config, global_batch_size=8, seed=0)
  assert loader.text_cache is not None
  batch = next(loader)
  assert batch["text_hidden"].shape == (8, 12, 384) and batch["text_hidden"].dtype == np.float16
  model = models.build_model(config.model)
  key = jax.random.key(0)
  params = state_lib.init_params(model, state_lib.sample_batch(config), key, split=False)
  params = dict(params, text_encoder=minilm[1])
  jitted = jax.jit(lambda b: trainer.loss_fn(params, b, key, 0, model=model, config=config,
                                             steps_per_epoch=4)[0])
  loss = lambda b: float(jitted(b))
  plain = {k: v for k, v in batch.items() if k != "text_hidden"}
  with_cache, without = loss(batch), loss(plain)
  assert abs(with_cache - without) < 2e-3 * max(1.0, abs(without)), (with_cache, without)
  shuffled = dict(batch, text_hidden=batch["text_hidden"][::-1])
  assert abs(loss(shuffled) - without) > 1e-2


@pytest.mark.parametrize("name", ["seps"])  # GRM: test_training_loss_same_with_cache
def test_models_use_text_hidden_in_place_of_the_frozen_tower(name):
  """`text_hidden` / `dense_hidden` given = the frozen text tower's train=False outputs: the
  training forward scores exactly as when the tower runs (no dropout in a frozen tower), and
  differently when the features are of other captions."""
  from gseps_jax import models, trainer
  from gseps_jax import state as state_lib
  config = tiny.tiny_config(name)
  config.model.freeze_text = True
  config.model.text.hidden_dropout_prob = 0.3  # dropout a frozen tower must not apply
  model = models.build_model(config.model)
  key = jax.random.key(1)
  rngs = {"params": key, "dropout": key, "gumbel": key, "noise": key}
  batch = state_lib.sample_batch(config, 4)
  r = np.random.default_rng(0)
  batch["input_ids"] = r.integers(1000, 2000, batch["input_ids"].shape).astype(np.int32)
  batch["dense_ids"] = r.integers(1000, 2000, batch["dense_ids"].shape).astype(np.int32)
  batch["image"] = r.normal(size=batch["image"].shape).astype(np.float32)
  params = model.init(rngs, batch, train=False)["params"]
  tower = lambda ids, mask: model.apply(
      {"params": params}, ids, mask, method=lambda m, i, a: m.text_encoder(i, a, train=False))
  cached = dict(batch, text_hidden=tower(batch["input_ids"], batch["attention_mask"]),
                dense_hidden=tower(batch["dense_ids"], batch["dense_mask"]))
  fwd = jax.jit(lambda b: model.apply({"params": params}, b, train=True, rngs=rngs)[0])
  plain, from_cache = fwd(batch), fwd(cached)
  for level, s in plain.items():
    np.testing.assert_allclose(from_cache[level], s, rtol=1e-4, atol=1e-5)
  wrong = fwd(dict(cached, text_hidden=cached["text_hidden"][::-1]))
  assert any(np.abs(wrong[k] - v).max() > 1e-3 for k, v in plain.items())


def test_cache_dir_is_local_for_a_bucket_data_dir(monkeypatch, tmp_path):
  """The cache is memory-mapped: a gs:// data_dir keeps it on local disk (never 'gs:/...')."""
  import ml_collections
  from gseps_jax.data import text_cache
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  remote = ml_collections.ConfigDict(dict(data_dir="gs://bucket/tfds", text_cache_dir=""))
  assert str(text_cache.cache_dir(remote)) == str(tmp_path / "gseps_jax" / "text_features")
  local = ml_collections.ConfigDict(dict(data_dir=str(tmp_path / "d"), text_cache_dir=""))
  assert str(text_cache.cache_dir(local)) == str(tmp_path / "d" / "text_features")
  given = ml_collections.ConfigDict(dict(data_dir="gs://bucket/tfds", text_cache_dir="/x/y"))
  assert str(text_cache.cache_dir(given)) == "/x/y"
