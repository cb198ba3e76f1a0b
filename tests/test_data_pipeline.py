"""Input pipeline: shapes/dtypes, augmentation bounds, tokenizer, text augmentation, the batch
contract (against a reference written out without grain), per-process sharding, resume, worker
processes (same batches, errors), global arrays."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from gseps_jax.data import pipeline, prepare, text_aug, tokenizer

# Fixtures `tok` (the installed MiniLM tokenizer) and `data` (a small synthetic_regions split):
# tests/conftest.py.

PP = pipeline.Preprocess(image_size=16, max_len=12, dense_max_len=40)


def _loader(data, tok, **kw):
  args = dict(global_batch_size=8, seed=5, process_index=0, process_count=1)
  args.update(kw)
  return pipeline.TrainLoader(pipeline.open_split(data, "train"), tok, PP, **args)


def test_train_batch_shapes(data, tok):
  b = next(_loader(data, tok))
  want = {"image": ((8, 16, 16, 3), np.float32), "input_ids": ((8, 12), np.int32),
          "attention_mask": ((8, 12), np.int32), "dense_ids": ((8, 40), np.int32),
          "dense_mask": ((8, 40), np.int32), "image_index": ((8,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
  assert (b["input_ids"][:, 0] == tok.cls_id).all()
  assert (b["attention_mask"].sum(1) >= 2).all()
  lo = (0 - np.array(PP.mean)) / np.array(PP.std)
  hi = (1 - np.array(PP.mean)) / np.array(PP.std)
  assert (b["image"] >= lo - 1e-5).all() and (b["image"] <= hi + 1e-5).all()


def test_tokenizer_known_words(tok, tmp_path):
  # bert-base-uncased: line number in vocab.txt = id.
  vocab = (tokenizer.installed_minilm_dir() / "vocab.txt").read_text().splitlines()
  ids, mask = tok.encode("A Man with RED hats.", 10)
  assert ids.tolist()[:8] == [vocab.index(t) for t in
                              ["[CLS]", "a", "man", "with", "red", "hats", ".", "[SEP]"]]
  assert mask.tolist() == [1] * 8 + [0] * 2 and tok.unk_id not in ids.tolist()
  # A vocab.txt path works too; a directory without one fails clearly.
  assert tokenizer.load_tokenizer(tokenizer.installed_minilm_dir() / "vocab.txt").encode(
      "man", 4)[0].tolist() == [tok.cls_id, vocab.index("man"), tok.sep_id, tok.pad_id]
  with pytest.raises(tokenizer.TokenizerError, match="No BERT vocabulary"):
    tokenizer.load_tokenizer(tmp_path)
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nzebra\n")
  with pytest.raises(tokenizer.TokenizerError, match="maps the word 'man' to \\[UNK\\]"):
    tokenizer.load_tokenizer(tmp_path)


def test_random_resized_crop_bounds():
  rng = np.random.default_rng(0)
  for _ in range(300):
    x0, y0, w, h = pipeline.random_resized_crop_box(rng, 500, 375, (0.6, 1.0))
    assert 0 <= x0 and x0 + w <= 500 and 0 <= y0 and y0 + h <= 375
    area = w * h / (500 * 375)
    assert 0.6 - 0.01 <= area <= 1.0 + 1e-9
    assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
  # Impossible request: falls back to the centred crop clipped to the ratio range.
  assert pipeline.random_resized_crop_box(rng, 100, 10, (0.99, 1.0)) == (43, 0, 13, 10)


def test_train_image_flip_and_normalisation():
  # Left half black, right half white; full-image crop forced by scale (1, 1) on a 4:3 image.
  arr = np.zeros((30, 40, 3), np.uint8)
  arr[:, 20:] = 255
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  pp = pipeline.Preprocess(image_size=8, crop_scale=(1.0, 1.0), mean=(0.5, 0.5, 0.5),
                           std=(0.5, 0.5, 0.5))
  flips = 0
  for seed in range(40):
    out = pipeline.train_image(buf.getvalue(), np.random.default_rng(seed), pp, "x")
    left, right = out[:, 0].mean(), out[:, -1].mean()
    assert {round(float(left)), round(float(right))} == {-1, 1}  # (0 or 1 - 0.5) / 0.5
    flips += left > right
  assert 8 <= flips <= 32  # p = 0.5
  ev = pipeline.eval_image(buf.getvalue(), pp, "x")
  assert ev.shape == (8, 8, 3) and ev[:, 0].mean() < -0.9 and ev[:, -1].mean() > 0.9


def test_text_augmentation_statistics(tok):
  words = [[i] for i in range(1000, 3000)]  # 2,000 one-piece words
  rng = np.random.default_rng(0)
  out = text_aug.augment_words(words, rng, 0.2, mask_id=tok.mask_id, replace_ids=tok.replace_ids)
  n_mask = sum(t == tok.mask_id for t in out)
  n_deleted = len(words) - len(out)
  kept = set(range(1000, 3000)) & set(out)
  n_replaced = len(out) - n_mask - len(kept)
  # Expected 2000 * 0.2 * (0.5, 0.1, 0.4) = 200 / 40 / 160, loose 4-sigma bounds.
  assert 140 <= n_mask <= 260 and 15 <= n_replaced <= 70 and 105 <= n_deleted <= 215
  assert text_aug.augment_words(words[:5], rng, 0.0, mask_id=tok.mask_id,
                                replace_ids=tok.replace_ids) == [1000, 1001, 1002, 1003, 1004]
  # Seeded: same generator state, same output; no special token ever drawn as a replacement.
  a = tok.encode("a red circle at the top left", 12, rng=np.random.default_rng(7), aug_prob=0.5)
  b = tok.encode("a red circle at the top left", 12, rng=np.random.default_rng(7), aug_prob=0.5)
  assert np.array_equal(a[0], b[0])
  assert not set(tok.replace_ids.tolist()) & {tok.cls_id, tok.sep_id, tok.pad_id, tok.unk_id}
  with pytest.raises(ValueError, match="must be in"):
    text_aug.augment_words(words, rng, 1.5, mask_id=0, replace_ids=tok.replace_ids)


def test_two_processes_cover_each_example_once_per_epoch(data, tok):
  loaders = [_loader(data, tok, process_index=p, process_count=2) for p in range(2)]
  assert loaders[0].steps_per_epoch == 3  # 24 images / global batch 8
  for epoch in range(2):
    seen = []
    for _ in range(3):
      for ld in loaders:
        b = next(ld)
        assert b["image"].shape[0] == 4
        seen += b["image_index"].tolist()
    assert sorted(seen) == list(range(24)), epoch
  # The two epochs use different orders; one process's slice matches the single-process batch.
  single = _loader(data, tok)
  full = next(single)
  first = next(_loader(data, tok, process_index=0, process_count=2))
  second = next(_loader(data, tok, process_index=1, process_count=2))
  for k in full:
    np.testing.assert_array_equal(full[k], np.concatenate([first[k], second[k]]))


def test_resume_reproduces_batches(data, tok):
  ref = _loader(data, tok)
  batches = [next(ref) for _ in range(5)]
  assert ref.get_state() == {"seed": 5, "step": 5}
  resumed = _loader(data, tok, start_step=3)
  for want in batches[3:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  other = _loader(data, tok)
  next(other)
  other.set_state({"seed": 5, "step": 4})
  got = next(other)
  for k in batches[4]:
    np.testing.assert_array_equal(got[k], batches[4][k])
  with pytest.raises(ValueError, match="seed"):
    other.set_state({"seed": 6, "step": 0})
  # A different seed changes the data order.
  assert not np.array_equal(next(_loader(data, tok, seed=6))["image_index"],
                            batches[0]["image_index"])


def _reference_batch(src, tok, pp, *, seed, step, global_batch_size, process_index=0,
                     process_count=1):
  """The training batch contract written out without grain (and as the pre-grain pipeline did
  it, so runs resume across the change): epoch e's order is a numpy permutation keyed by
  (seed, 1, e), global batch w of the epoch is its positions [w*G, (w+1)*G), process p takes
  the p-th slice, and each example's generator is keyed by (seed, 2, e, image index)."""
  epoch, w = divmod(step, len(src) // global_batch_size)
  perm = np.random.default_rng([seed, 1, epoch]).permutation(len(src))
  b = global_batch_size // process_count
  idx = perm[w * global_batch_size + process_index * b:][:b]
  exs = [pipeline.train_example(src[int(i)], np.random.default_rng([seed, 2, epoch, int(i)]),
                                pp, tok) for i in idx]
  return {k: np.stack([e[k] for e in exs]) for k in exs[0]}


def _assert_batches_equal(want, got):
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_batches_follow_the_contract(data, tok, process_count):
  src = pipeline.open_split(data, "train")
  seen = [[] for _ in range(2)]  # per epoch
  for p in range(process_count):
    ld = _loader(data, tok, global_batch_size=6, process_index=p, process_count=process_count)
    assert ld.steps_per_epoch == 4
    for step in range(8):  # two epochs
      got = next(ld)
      want = _reference_batch(src, tok, PP, seed=5, step=step, global_batch_size=6,
                              process_index=p, process_count=process_count)
      _assert_batches_equal(want, got)
      seen[step // 4] += got["image_index"].tolist()
    # Random access to any step gives the same batch as iterating.
    _assert_batches_equal(_reference_batch(src, tok, PP, seed=5, step=9, global_batch_size=6,
                                           process_index=p, process_count=process_count),
                          ld.dataset[9])
  # The processes' shards are disjoint and cover each epoch's 24 images once.
  assert [sorted(s) for s in seen] == [list(range(24))] * 2


@pytest.mark.parametrize("num_workers", [1, 2])
def test_worker_processes_match_in_process(data, tok, num_workers):
  ref = _loader(data, tok)
  want = [next(ref) for _ in range(6)]
  with_workers = _loader(data, tok, start_step=2, num_workers=num_workers)
  try:
    got = [next(with_workers) for _ in range(3)]  # steps 2, 3, 4
    assert with_workers.get_state() == {"seed": 5, "step": 5}
    with_workers.set_state({"seed": 5, "step": 1})  # back to step 1: new workers
    got += [next(with_workers) for _ in range(2)]  # steps 1, 2
  finally:
    with_workers.close()
  for w, g in zip([want[2], want[3], want[4], want[1], want[2]], got):
    _assert_batches_equal(w, g)


def test_eval_worker_processes_match_in_process(data, tok):
  src = pipeline.open_split(data, "test")
  for make in (pipeline.eval_image_batches, pipeline.eval_caption_batches):
    kw = dict(global_batch_size=4, process_index=1, process_count=2)
    want = list(make(src, tok, PP, **kw))
    got = list(make(src, tok, PP, num_workers=2, **kw))
    assert len(got) == len(want) > 1
    for w, g in zip(want, got):
      _assert_batches_equal(w, g)


def _records(n, corrupt=()):
  out = []
  for i in range(n):
    r = dict(_record(), index=i, image_id=str(i), file_name=f"{i}.png")
    if i in corrupt:
      r["image"] = b"not an image"
    out.append(r)
  return out


class _CountingSource:
  """A list of records that remembers which ones were read."""

  def __init__(self, records):
    self.records, self.read = records, []

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.read.append(int(i))
    return self.records[i]


def test_each_process_reads_only_its_share(tok):
  reads = []
  for p in range(2):
    src = _CountingSource(_records(8))
    loader = pipeline.TrainLoader(src, tok, PP, global_batch_size=4, seed=0, process_index=p,
                                  process_count=2)
    batch = next(loader)
    assert sorted(src.read) == sorted(batch["image_index"].tolist())  # its 2 rows, no others
    reads.append(set(src.read))
  assert not reads[0] & reads[1] and len(reads[0] | reads[1]) == 4


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_error_names_example(tok, num_workers):
  # Any random-access sequence of records is a source; the error crosses the worker boundary.
  loader = pipeline.TrainLoader(_records(4, corrupt=(2,)), tok, PP, global_batch_size=4, seed=0,
                                process_index=0, process_count=1, num_workers=num_workers)
  try:
    with pytest.raises(pipeline.CorruptImageError,
                       match=r"Cannot decode the image of example 2 \(image id 2, file 2.png\)"):
      next(loader)
  finally:
    loader.close()


def test_eval_order_and_sharding(data, tok):
  src = pipeline.open_split(data, "test")  # 7 images, 35 captions
  per_proc = [list(pipeline.eval_image_batches(src, tok, PP, global_batch_size=4,
                                               process_index=p, process_count=2))
              for p in range(2)]
  assert len(per_proc[0]) == len(per_proc[1]) == 2  # same step count on every process
  order = np.concatenate([np.concatenate([per_proc[0][s]["image_index"],
                                          per_proc[1][s]["image_index"]]) for s in range(2)])
  assert order.tolist() == list(range(7)) + [-1]
  valid = np.concatenate([np.concatenate([per_proc[0][s]["valid"], per_proc[1][s]["valid"]])
                          for s in range(2)])
  assert valid.tolist() == [True] * 7 + [False]
  one = list(pipeline.eval_image_batches(src, tok, PP, global_batch_size=8, process_index=0,
                                         process_count=1))[0]
  np.testing.assert_array_equal(one["image"][:2], per_proc[0][0]["image"])
  assert one["dense_mask"][:7].sum(1).min() > 10
  caps = list(pipeline.eval_caption_batches(src, tok, PP, global_batch_size=16, process_index=1,
                                            process_count=2))
  assert len(caps) == math.ceil(35 / 16)
  idx = np.concatenate([c["caption_index"] for c in caps])
  # Global batches [0,16), [16,32), [32,48): process 1 holds the second half of each.
  assert idx.tolist() == list(range(8, 16)) + list(range(24, 32)) + [-1] * 8
  rec = src[2]
  text = rec["captions"][3].decode()
  np.testing.assert_array_equal(caps[0]["input_ids"][5], tok.encode(text, PP.max_len)[0])
  assert caps[0]["image_index"][5] == 2  # caption 13 = image 2, caption 3


def test_to_global_single_process(data, tok):
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  batch = next(_loader(data, tok))
  g = pipeline.to_global(batch, NamedSharding(mesh, P("data")))
  assert g["image"].shape == (8, 16, 16, 3) and g["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(np.asarray(g["image_index"]), batch["image_index"])


def test_open_split_errors(data):
  with pytest.raises(ValueError, match="has no split 'validation'"):
    pipeline.open_split(data, "validation")
  with pytest.raises(ValueError, match="Unknown dataset"):
    prepare.make_builder({"name": "flickr8k", "data_dir": "/tmp"})
  with pytest.raises(ValueError, match="exceeds the 24 training images"):
    _loader(data, None, global_batch_size=32)
  with pytest.raises(ValueError, match="not divisible"):
    _loader(data, None, global_batch_size=9, process_count=2)


def test_swap_left_right_words():
  s = pipeline.swap_left_right
  assert s("a circle at the top left and a square on the right") == (
      "a circle at the top right and a square on the left")
  assert s("Left of the LEFT door, the leftmost cat; rightmost. right-handed") == (
      "Right of the RIGHT door, the rightmost cat; leftmost. left-handed")
  # Whole words only.
  assert s("a bright copyright sign, lefty") == "a bright copyright sign, lefty"
  text = "left right leftmost rightmost lefthand rightward"
  assert s(s(text)) == text and s(text) != text


def _half_white_png():
  arr = np.zeros((24, 24, 3), np.uint8)
  arr[:, 12:] = 255  # white on the right
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def _record():
  return {"image": _half_white_png(), "index": 3, "image_id": "x", "file_name": "",
          "captions": ["white on the right , dark on the left"] * 5,
          "dense_caption": "the white half is on the right"}


@pytest.mark.parametrize("hflip", [0.5, 0.0])
def test_flip_swaps_caption_and_dense_caption(tok, hflip):
  pp = pipeline.Preprocess(image_size=8, crop_scale=(1.0, 1.0), hflip=hflip, max_len=12,
                           dense_max_len=12, text_aug_prob=0.0)
  swap = pipeline.swap_left_right
  cap, dense = _record()["captions"][0], _record()["dense_caption"]
  seen = set()
  for seed in range(30):
    ex = pipeline.train_example(_record(), np.random.default_rng(seed), pp, tok)
    white_right = ex["image"][:, -1].mean() > ex["image"][:, 0].mean()
    seen.add(bool(white_right))
    want_cap, want_dense = (cap, dense) if white_right else (swap(cap), swap(dense))
    assert ex["input_ids"].tolist() == tok.encode(want_cap, 12)[0].tolist()
    assert ex["dense_ids"].tolist() == tok.encode(want_dense, 12)[0].tolist()
  assert seen == ({True, False} if hflip else {True})  # prob 0 never flips


def test_crop_scale_one_is_identity_resize():
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(buf, format="PNG")
  data = buf.getvalue()
  pp = pipeline.Preprocess(image_size=16, crop_scale=(1.0, 1.0), hflip=0.0)
  ev = pipeline.eval_image(data, pp, "x")
  for seed in range(5):
    np.testing.assert_array_equal(
        pipeline.train_image(data, np.random.default_rng(seed), pp, "x"), ev)
  cropped = pipeline.Preprocess(image_size=16, crop_scale=(0.6, 1.0), hflip=0.0)
  assert any(not np.array_equal(pipeline.train_image(data, np.random.default_rng(s), cropped,
                                                     "x"), ev) for s in range(5))
