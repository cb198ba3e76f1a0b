"""synthetic_regions: determinism, captions true of the pixels, one-attribute hard negatives,
idempotent prepare CLI."""

import io
import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from gseps_jax.data import prepare, scenes, tokenizer

SIZES = dict(num_train=24, num_dev=4, num_test=7, image_size=32, seed=3)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("syn")
  cfg = {"name": "synthetic_regions", "data_dir": str(data_dir), "synthetic": dict(SIZES)}
  builder = prepare.ensure_prepared(cfg)
  return cfg, builder


def _src(builder, split):
  return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})


def _s(x):
  return x.decode() if isinstance(x, bytes) else x


def test_sizes_and_regeneration(built):
  _, builder = built
  for split, n in (("train", 24), ("dev", 4), ("test", 7)):
    src = _src(builder, split)
    assert len(src) == n
    for k in range(n):
      ex = src[k]
      again = scenes.generate_example(SIZES["seed"], split, k, 32, num_images=n)
      assert ex["image"] == again["image"]  # byte-identical: deterministic from the seed
      assert [_s(c) for c in ex["captions"]] == again["captions"]
      assert _s(ex["scene"]) == again["scene"]
      assert ex["hard_negative"] == again["hard_negative"]
  assert _src(builder, "test")[6]["hard_negative"] == -1  # odd split: last image unpaired
  # A different seed gives different data.
  assert scenes.generate_example(4, "train", 0, 32)["scene"] != _s(_src(builder, "train")[0]
                                                                       ["scene"])


def _nearest_colour(rgb):
  names = list(scenes.COLOURS)
  d = [np.sum((np.array(scenes.COLOURS[c]) - rgb) ** 2) for c in names]
  return names[int(np.argmin(d))]


def test_captions_match_pixels(built):
  _, builder = built
  src = _src(builder, "train")
  colour_words, shape_words = set(scenes.COLOURS), set(scenes.SHAPES)
  for k in range(len(src)):
    ex = src[k]
    scene = json.loads(_s(ex["scene"]))
    image = np.asarray(Image.open(io.BytesIO(ex["image"])).convert("RGB")).astype(int)
    for o in scene["objects"]:
      x, y = scenes.object_centre(o, 32)
      assert _nearest_colour(image[int(y), int(x)]) == o["colour"]
    # Nothing drawn outside the objects: corners (never inside a cell's shape) are background.
    assert np.abs(image[0, 0] - scenes.BACKGROUND).max() < 20
    colours = {o["colour"] for o in scene["objects"]}
    shapes = {o["shape"] for o in scene["objects"]}
    captions = [_s(c) for c in ex["captions"]]
    assert len(set(captions)) == 5
    for cap in captions:
      words = set(re.findall(r"[a-z]+", cap))
      assert words & colour_words <= colours, cap
      assert {w.rstrip("s") for w in words} & shape_words <= shapes, cap
    dense = _s(ex["dense_caption"])
    for o in scene["objects"]:
      assert (f"{o['size']} {o['colour']} {o['shape']} "
              f"{scenes.position_phrase(o['cell'])}") in dense
    assert f"{scenes.NUMBERS[len(scene['objects'])]} object" in dense


def test_hard_negatives_differ_in_one_attribute(built):
  _, builder = built
  src = _src(builder, "train")
  seen = set()
  for k in range(0, len(src), 2):
    a, b = src[k], src[k + 1]
    assert a["hard_negative"] == k + 1 and b["hard_negative"] == k
    sa, sb = json.loads(_s(a["scene"]))["objects"], json.loads(_s(b["scene"]))["objects"]
    attr = _s(b["difference"])
    seen.add(attr)
    if attr == "count":
      assert abs(len(sa) - len(sb)) == 1
      small, big = sorted((sa, sb), key=len)
      extra = [o for o in big if o not in small]
      assert len(extra) == 1 and all(o in big for o in small)
      # the added/removed object repeats or removes a kind: its (colour, shape) count changes
    else:
      assert len(sa) == len(sb)
      diffs = [(oa, ob) for oa, ob in zip(sa, sb) if oa != ob]
      assert len(diffs) == 1
      oa, ob = diffs[0]
      key = {"colour": "colour", "shape": "shape", "size": "size", "position": "cell"}[attr]
      changed = [f for f in oa if oa[f] != ob[f]]
      assert changed == [key]
    assert a["dense_caption"] != b["dense_caption"]
    assert a["image"] != b["image"]
  assert len(seen) >= 3  # several kinds of hard negatives even in 12 pairs


def test_vocabulary_is_whole_words():
  tok = tokenizer.load_tokenizer(tokenizer.installed_minilm_dir())
  words = (list(scenes.COLOURS) + list(scenes.SHAPES) + [s + "s" for s in scenes.SHAPES]
           + list(scenes.SIZES) + [w for p in scenes.POSITIONS.values() for w in p.split()]
           + list(scenes.NUMBERS) + list(scenes.ORDINALS))
  for w in words:
    pieces = tok.word_pieces(w)
    assert len(pieces) == 1 and len(pieces[0]) == 1 and pieces[0][0] != tok.unk_id, w


def test_prepare_cli_idempotent(built, capsys):
  cfg, builder = built
  args = ["--dataset=synthetic_regions", f"--data_dir={cfg['data_dir']}"] + [
      f"--{k}={v}" for k, v in SIZES.items()]
  assert prepare.main(args) == 0
  assert "already prepared" in capsys.readouterr().out
  assert prepare.main(args[:1] + ["--data_dir=" + cfg["data_dir"], "--num_train=0"]) == 2
  assert "num_train must be >= 1" in capsys.readouterr().err


def test_prepare_command_matches_config(built):
  cfg, _ = built
  cmd = prepare.prepare_command(cfg)
  assert cmd.startswith("python -m gseps_jax.data.prepare --dataset=synthetic_regions")
  assert "--num_train=24" in cmd and "--image_size=32" in cmd and "--seed=3" in cmd


def _pieces(tok, text):
  return len(tok.backend.encode(text, add_special_tokens=False).ids) + 2


def test_metadata_records_longest_caption(built):
  cfg, _ = built
  # A builder read back from disk (not the one that generated the data) has the metadata.
  builder = prepare.ensure_prepared(cfg)
  tok = tokenizer.load_tokenizer(tokenizer.installed_minilm_dir())
  meta = builder.info.metadata
  for split in ("train", "dev", "test"):
    src = _src(builder, split)
    caps = [_s(c) for k in range(len(src)) for c in src[k]["captions"]]
    dense = [_s(src[k]["dense_caption"]) for k in range(len(src))]
    assert meta["max_caption_pieces"][split] == max(_pieces(tok, c) for c in caps)
    assert meta["max_dense_pieces"][split] == max(_pieces(tok, d) for d in dense)


def test_demo_max_len_fits_generated_captions():
  """The demo's data.max_len truncates under 1% of the captions of its training split (the
  first 1,000 pairs of seed 0, as built), counted with the real tokenizer."""
  from configs import grm_vit, seps_vit
  tok = tokenizer.load_tokenizer(tokenizer.installed_minilm_dir())
  lengths = np.array([_pieces(tok, c) for p in range(1000)
                      for _, _, caps in scenes.pair_scenes(0, "train", p) for c in caps])
  assert lengths.max() > 16  # the old max_len=16 cut most captions (this test would fail)
  for mod in (grm_vit, seps_vit):
    max_len = mod.get_config("demo").data.max_len
    assert np.mean(lengths > max_len) < 0.01, (mod.__name__, max_len, lengths.max())
