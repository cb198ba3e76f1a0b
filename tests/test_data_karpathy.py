"""Karpathy-format builders (flickr30k_karpathy, coco_karpathy): round trip, real F30K test text,
every promised error message, and no TensorFlow import."""

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from gseps_jax.data import karpathy, pipeline, prepare, tokenizer

# Real released text (first 100 images of the F30K test split; tests/data/f30k/README.md).
F30K_FIXTURE = Path(__file__).resolve().parent / "data" / "f30k"
F30K_IMAGES = 100
REPO = Path(__file__).resolve().parents[1]
SPLIT_SIZES = {"train": 6, "dev": 3, "test": 3}  # 12 images


def _jpeg(value: int, size: int = 8) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(out, format="JPEG")
  return out.getvalue()


def write_fixture(root: Path, *, coco: bool = False) -> tuple[Path, Path, dict]:
  """A caption folder + image folder with 12 images; returns (manual_dir, image_dir, truth)."""
  manual, images = root / "caps", root / "images"
  manual.mkdir(parents=True)
  images.mkdir()
  files = karpathy.COCO_FILES if coco else karpathy.FLICKR30K_FILES
  mapping, truth, next_id = {}, {}, 100
  for split, n in SPLIT_SIZES.items():
    ids, caps, dense, truth[split] = [], [], [], []
    for k in range(n):
      image_id = str(next_id)
      next_id += 7  # ids are not positions
      if coco:  # COCO names point into sub-folders
        sub = "train2014" if split == "train" else "val2014"
        name = f"COCO_{sub}_{int(image_id):012d}.jpg"
        (images / sub).mkdir(exist_ok=True)
        (images / sub / name).write_bytes(_jpeg(10 * len(mapping)))
      else:
        name = f"{image_id}.jpg"
        (images / name).write_bytes(_jpeg(10 * len(mapping)))
      mapping[image_id] = name
      c = [f"{split} image {k} caption {j} , with punctuation ." for j in range(5)]
      ids += [image_id] * 5
      caps += c
      d = f"dense {split} {k}: a long \"quoted\" description."
      dense.append(json.dumps({"text": d, "model_id": "llava", "metadata": {"length": 5}}))
      truth[split].append({"image_id": image_id, "file_name": name, "captions": c,
                           "dense": d if split != "dev" else ""})
    (manual / files[split].caps).write_text("\n".join(caps) + "\n")
    (manual / files[split].ids).write_text("\n".join(ids) + "\n")
    if split != "dev":  # no dense file for dev, as released
      (manual / files[split].dense).write_text("\n".join(dense) + "\n")
  (manual / "id_mapping.json").write_text(json.dumps(mapping))
  return manual, images, truth


def _build(name, manual, images, data_dir):
  cfg = {"name": name, "data_dir": str(data_dir), "manual_dir": str(manual),
         "image_dir": str(images)}
  return prepare.prepare(cfg, verbose=False)


def _s(x):
  return x.decode() if isinstance(x, bytes) else x


@pytest.mark.parametrize("name,coco", [("flickr30k_karpathy", False), ("coco_karpathy", True)])
def test_fixture_round_trip(tmp_path, name, coco):
  manual, images, truth = write_fixture(tmp_path, coco=coco)
  builder, built = _build(name, manual, images, tmp_path / "tfds")
  assert built
  assert {s: v.num_examples for s, v in builder.info.splits.items()} == SPLIT_SIZES
  for split, expected in truth.items():
    src = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    assert len(src) == len(expected)
    for k, exp in enumerate(expected):  # split order = file order
      ex = src[k]
      assert ex["index"] == k
      assert _s(ex["image_id"]) == exp["image_id"]
      assert _s(ex["file_name"]) == exp["file_name"]
      assert [_s(c) for c in ex["captions"]] == exp["captions"]
      assert _s(ex["dense_caption"]) == exp["dense"]
      assert bool(ex["has_dense"]) == (split != "dev")
      sub = ("train2014" if split == "train" else "val2014") if coco else ""
      assert ex["image"] == (images / sub / exp["file_name"]).read_bytes()  # bytes kept as is
  # A second prepare is a no-op.
  assert not _build(name, manual, images, tmp_path / "tfds")[1]


def test_coco_1k_folds():
  folds = karpathy.coco_1k_folds()
  assert [(f.start, f.stop) for f in folds] == [(0, 1000), (1000, 2000), (2000, 3000),
                                                (3000, 4000), (4000, 5000)]


def _error(tmp_path, mutate, coco=False):
  manual, images, _ = write_fixture(tmp_path, coco=coco)
  mutate(manual, images)
  name = "coco_karpathy" if coco else "flickr30k_karpathy"
  with pytest.raises(karpathy.DataFormatError) as e:
    _build(name, manual, images, tmp_path / "tfds")
  assert not (tmp_path / "tfds" / name / "1.0.0" / "dataset_info.json").exists()
  return str(e.value)


def test_error_missing_manual_or_image_dir(tmp_path):
  manual, images, _ = write_fixture(tmp_path)
  with pytest.raises(karpathy.DataFormatError, match=r"Missing caption folder .*nowhere"):
    _build("flickr30k_karpathy", tmp_path / "nowhere", images, tmp_path / "t2")
  with pytest.raises(karpathy.DataFormatError, match=r"Missing image folder .*no_images"):
    _build("flickr30k_karpathy", manual, tmp_path / "no_images", tmp_path / "t2")


def test_error_missing_file(tmp_path):
  msg = _error(tmp_path, lambda m, i: (m / "dev_ids.txt").unlink())
  assert "Missing id file" in msg and "dev_ids.txt" in msg


def test_error_caption_count(tmp_path):
  def drop_line(m, i):
    for f in ("test_caps.txt", "test_ids.txt"):
      lines = (m / f).read_text().splitlines()
      (m / f).write_text("\n".join(lines[:7] + lines[8:]) + "\n")  # image 1 loses a caption
  msg = _error(tmp_path, drop_line)
  assert "test_ids.txt line 6" in msg and "has 4 consecutive caption lines" in msg


def test_error_id_without_mapping(tmp_path):
  def drop(m, i):
    mapping = json.loads((m / "id_mapping.json").read_text())
    first_test = (m / "test_ids.txt").read_text().split()[0]
    del mapping[first_test]
    (m / "id_mapping.json").write_text(json.dumps(mapping))
  msg = _error(tmp_path, drop)
  assert "test_ids.txt line 1" in msg and "id_mapping.json" in msg


def test_error_id_without_image(tmp_path):
  def remove(m, i):
    first_dev = (m / "dev_ids.txt").read_text().split()[5]  # second dev image
    name = json.loads((m / "id_mapping.json").read_text())[first_dev]
    next(i.rglob(name)).unlink()
  msg = _error(tmp_path, remove, coco=True)
  assert "dev_ids.txt line 6" in msg and "not under the image folder" in msg


def test_error_corrupt_image(tmp_path):
  def corrupt(m, i):
    name = json.loads((m / "id_mapping.json").read_text())[
        (m / "train_ids.txt").read_text().split()[10]]  # third train image
    (i / name).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
  msg = _error(tmp_path, corrupt)
  assert "Corrupt image" in msg and "example 2" in msg and "split train" in msg


def test_error_dense_missing_image(tmp_path):
  def truncate(m, i):
    lines = (m / "f30k_test.jsonl").read_text().splitlines()
    (m / "f30k_test.jsonl").write_text("\n".join(lines[:2]) + "\n")
  msg = _error(tmp_path, truncate)
  assert "f30k_test.jsonl line 3" in msg and "missing the dense caption of image 2" in msg


def test_error_decode_names_example():
  record = {"index": 4, "image_id": b"77", "file_name": b"77.jpg", "image": b"garbage"}
  with pytest.raises(pipeline.CorruptImageError,
                     match=r"example 4 \(image id 77, file 77.jpg\)"):
    pipeline.train_image(record["image"], np.random.default_rng(0), pipeline.Preprocess(),
                         pipeline.example_name(record))


def test_ensure_prepared_names_command(tmp_path):
  cfg = {"name": "flickr30k_karpathy", "data_dir": str(tmp_path / "tfds"), "manual_dir": "",
         "image_dir": "/data/flickr30k-images"}
  with pytest.raises(prepare.NotPreparedError) as e:
    prepare.ensure_prepared(cfg)
  msg = str(e.value)
  assert str(tmp_path / "tfds") in msg and "config.data.manual_dir is empty" in msg
  assert ("python -m gseps_jax.data.prepare --dataset=flickr30k_karpathy "
          "--manual_dir=CAPTION_DIR --image_dir=/data/flickr30k-images "
          f"--data_dir={tmp_path / 'tfds'}") in msg


@pytest.fixture(scope="module")
def real_f30k(tmp_path_factory):
  """The released F30K test text (the repository's fixture: its first 100 images) + 8x8
  stand-in JPEGs; train/dev are its first 4 images."""
  root = tmp_path_factory.mktemp("f30k")
  manual, images = root / "caps", root / "images"
  manual.mkdir()
  images.mkdir()
  for f in ("test_caps.txt", "test_ids.txt", "f30k_test.jsonl", "id_mapping.json"):
    os.symlink(F30K_FIXTURE / f, manual / f)
  caps = (F30K_FIXTURE / "test_caps.txt").read_text().splitlines()
  ids = (F30K_FIXTURE / "test_ids.txt").read_text().splitlines()
  dense = (F30K_FIXTURE / "f30k_test.jsonl").read_text().splitlines()
  for split in ("train", "dev"):
    (manual / f"{split}_caps.txt").write_text("\n".join(caps[:20]) + "\n")
    (manual / f"{split}_ids.txt").write_text("\n".join(ids[:20]) + "\n")
  (manual / "f30k_train.jsonl").write_text("\n".join(dense[:4]) + "\n")
  mapping = json.loads((F30K_FIXTURE / "id_mapping.json").read_text())
  jpeg = _jpeg(128)
  for image_id in dict.fromkeys(ids):
    (images / mapping[image_id]).write_bytes(jpeg)
  builder, _ = _build("flickr30k_karpathy", manual, images, root / "tfds")
  return builder, caps, ids, dense, mapping


def test_real_f30k_test_split(real_f30k):
  builder, caps, ids, dense, mapping = real_f30k
  src = builder.as_data_source("test", decoders={"image": tfds.decode.SkipDecoding()})
  assert len(src) == F30K_IMAGES and len(caps) == 5 * F30K_IMAGES
  for k in range(F30K_IMAGES):
    ex = src[k]
    assert [_s(c) for c in ex["captions"]] == [c.strip() for c in caps[5 * k:5 * k + 5]]
    assert _s(ex["image_id"]) == ids[5 * k]
    assert _s(ex["file_name"]) == mapping[ids[5 * k]]
    assert _s(ex["dense_caption"]) == json.loads(dense[k])["text"].strip()
    assert ex["has_dense"]


def test_real_f30k_token_lengths(real_f30k):
  """Tokenised lengths equal an independent tokenizer (tokenizer.json via `tokenizers`)."""
  from tokenizers import Tokenizer as RustTokenizer
  builder, caps, _, dense, _ = real_f30k
  vocab_dir = tokenizer.installed_minilm_dir()
  tok = tokenizer.load_tokenizer(vocab_dir)
  ref = RustTokenizer.from_file(str(vocab_dir / "tokenizer.json"))
  ref.no_truncation()
  ref.no_padding()
  src = builder.as_data_source("test", decoders={"image": tfds.decode.SkipDecoding()})
  pp = pipeline.Preprocess(image_size=8, max_len=32, dense_max_len=90)
  batches = list(pipeline.eval_caption_batches(src, tok, pp, global_batch_size=100,
                                               process_index=0, process_count=1))
  ids = np.concatenate([b["input_ids"] for b in batches])
  mask = np.concatenate([b["attention_mask"] for b in batches])
  assert ids.shape == (5 * F30K_IMAGES, 32)
  want = [e.ids for e in ref.encode_batch(caps)]
  lengths = np.array([min(len(w), 32) for w in want])
  np.testing.assert_array_equal(mask.sum(1), lengths)
  assert (lengths == 32).sum() > 0 and lengths.min() >= 3  # some captions are truncated
  # ids identical where not truncated, [SEP] kept when truncated
  for k in range(0, 5 * F30K_IMAGES, 7):
    w = want[k]
    if len(w) <= 32:
      assert ids[k, :len(w)].tolist() == w
    else:
      assert ids[k].tolist() == w[:31] + [tok.sep_id]
  d_ids, d_mask = tok.encode_batch([json.loads(d)["text"] for d in dense[:50]], 90)
  d_want = [min(len(ref.encode(json.loads(d)["text"].strip()).ids), 90) for d in dense[:50]]
  np.testing.assert_array_equal(d_mask.sum(1), d_want)


def test_no_tensorflow_import(tmp_path):
  """Build (real-format fixture + synthetic) and read through the pipeline with a poisoned
  `tensorflow` that any import would trigger."""
  manual, images, _ = write_fixture(tmp_path)
  script = textwrap.dedent(f"""
      import importlib.abc, importlib.machinery, sys
      class Poison(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
          if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.machinery.ModuleSpec(name, self)
        def create_module(self, spec):
          raise ImportError("tensorflow was imported")
        def exec_module(self, module):
          pass
      sys.meta_path.insert(0, Poison())
      from gseps_jax.data import pipeline, prepare, tokenizer
      for cfg in ({{"name": "flickr30k_karpathy", "data_dir": {str(tmp_path / 'tfds')!r},
                    "manual_dir": {str(manual)!r}, "image_dir": {str(images)!r}}},
                  {{"name": "synthetic_regions", "data_dir": {str(tmp_path / 'tfds')!r},
                    "synthetic": {{"num_train": 4, "num_dev": 2, "num_test": 2,
                                   "image_size": 32, "seed": 0}}}}):
        prepare.prepare(cfg, verbose=False)
        src = pipeline.open_split(cfg, "train")
        tok = tokenizer.load_tokenizer(tokenizer.installed_minilm_dir())
        loader = pipeline.TrainLoader(src, tok, pipeline.Preprocess(image_size=16),
                                      global_batch_size=2, seed=0, process_index=0,
                                      process_count=1)
        assert next(loader)["image"].shape == (2, 16, 16, 3)
      assert "tensorflow" not in sys.modules, "tensorflow imported"
      print("OK")
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
