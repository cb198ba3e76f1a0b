"""SEPS dense captions: full-length encoding, parity's 90-feature cut, one dense mode for training
and evaluation, the i/n warm-up, and the dense-caption leak audit (issue 19).

Real data: tests/data/seps_dense_sample.jsonl holds five Flickr30K test dense captions copied
unchanged from the Flickr30K test split's dense-caption file f30k_test.jsonl (lines 1, 31, 425, 581, 893: 123, 114, 136,
63 and 178 word pieces with the bert-base-uncased vocabulary, the last the longest of the
1,000-image split).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import laps_vit, seps_swin, seps_vit
from gseps_jax import evaluate
from gseps_jax import evaluator
from gseps_jax import trainer
from gseps_jax.data import pipeline
from gseps_jax.data import tokenizer as tokenizer_lib
from gseps_jax.models import seps
import seps_reference as ref
import tiny

SAMPLE = pathlib.Path(__file__).parent / "data" / "seps_dense_sample.jsonl"
OLD_DENSE_MAX_LEN = 90  # the former default: 88 word pieces + [CLS] + [SEP]
CUT = 90  # official evaluation: the first 90 token features


def _texts():
  return [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines() if line.strip()]


def _tok():
  return tokenizer_lib.load_tokenizer(tiny.minilm_dir())


def _pieces(tok, texts):
  return np.array([len(tok.backend.encode(t, add_special_tokens=False).ids) for t in texts])


def test_longest_dense_caption_is_encoded_whole():
  """The auto length is 2 + the longest caption in word pieces, and at that length no real
  dense caption loses a piece: each ends with [SEP] right after its last piece. (At the former
  90 tokens every one but the shortest was cut.)"""
  tok, texts = _tok(), _texts()
  pieces = _pieces(tok, texts)
  assert pieces.max() == 178 and (pieces > OLD_DENSE_MAX_LEN - 2).sum() == 4  # the fixture
  source = [{"dense_caption": t} for t in texts]
  assert pipeline.longest_dense_pieces(source, tok, batch=2) == pieces.max()
  length = int(2 + pieces.max())
  ids, mask = tok.encode_batch(texts, length)
  n = mask.sum(1)
  np.testing.assert_array_equal(n, pieces + 2)
  assert np.all(ids[np.arange(len(texts)), n - 1] == tok.sep_id)
  for t, row in zip(texts, ids):  # the pieces themselves, in order
    want = tok.backend.encode(t, add_special_tokens=False).ids
    assert row[1:len(want) + 1].tolist() == want
  _, old_mask = tok.encode_batch(texts, OLD_DENSE_MAX_LEN)
  assert (old_mask.sum(1) < pieces + 2).sum() == 4  # what the old default did


def test_recorded_dense_len_measures_every_split(tmp_path):
  """`recorded_dense_len` = 2 + the longest dense caption over all splits (counted here one
  record at a time), written to dense_lengths.json next to the data; 0 in the config resolves
  to it and a too-short text encoder is refused."""
  c = tiny.tiny_config("seps")
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.synthetic.update(dict(num_train=24, num_dev=4, num_test=4))
  c.data.dense_max_len = 0
  tok = _tok()
  from gseps_jax.data import prepare
  builder = prepare.ensure_prepared(c.data)
  want = 0
  for split in ("train", "dev", "test"):
    src = pipeline.open_split(c.data, split)
    for i in range(len(src)):
      _, m = tok.encode(pipeline._text(src[i]["dense_caption"]), 512)
      want = max(want, int(m.sum()))
  assert pipeline.recorded_dense_len(c.data) == want
  table = json.loads((pathlib.Path(builder.data_dir) / pipeline.DENSE_LENGTHS_FILE).read_text())
  assert max(max(v.values()) for v in table.values()) == want - 2
  assert pipeline.Preprocess.from_config(c.data).dense_max_len == want
  assert pipeline.resolve_dense_max_len(c) == want and c.data.dense_max_len == want
  c.data.dense_max_len = 0
  c.model.text.max_position_embeddings = want - 1
  with pytest.raises(ValueError, match="max_position_embeddings"):
    pipeline.resolve_dense_max_len(c)


def _aggr_ref(aggr):
  f = lambda a: np.asarray(a, np.float64)
  return dict(ln_w=f(aggr["norm"]["scale"]), ln_b=f(aggr["norm"]["bias"]),
              w1=f(aggr["fc1"]["kernel"]).T, b1=f(aggr["fc1"]["bias"]),
              w2=f(aggr["fc2"]["kernel"]).T, b2=f(aggr["fc2"]["bias"]), scale=float(aggr["scale"]))


def test_parity_eval_keeps_first_90_features_of_full_length_encoding():
  """Parity evaluation on real dense captions == the float64 oracle of the official code fed
  the first 90 features of the FULL-length BERT encoding (lengths clipped at 90, as the
  official `embs[i, :length]` on 90 stored positions); encoding the captions cut at 90 tokens
  (the old behaviour) gives other features. Honest mode uses every feature."""
  tok, texts = _tok(), _texts()
  nd = len(texts)
  c = seps_vit.get_config("tiny")
  c.model.embed_dim = 16
  c.model.seps.eval_text_cut = CUT  # the official value (tiny uses 20)
  c.model.text.update(dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=512))
  model = seps.SEPS.from_config(c.model)
  assert model.eval_text_cut == CUT
  length = int(2 + _pieces(tok, texts).max())
  ids, mask = tok.encode_batch(texts, length)
  rng = np.random.default_rng(0)
  ni, nc, d = nd, 2 * nd, 16
  img = rng.normal(size=(ni, 17, d)).astype(np.float32)
  cap = rng.normal(size=(nc, 6, d)).astype(np.float32)
  cl = rng.integers(2, 7, size=nc)
  batch = {"image": np.zeros((2, 64, 64, 3), np.float32), "input_ids": ids[:2],
           "attention_mask": mask[:2], "dense_ids": ids[:2], "dense_mask": mask[:2],
           "image_index": np.arange(2, dtype=np.int32)}
  params = model.init(jax.random.key(0), batch, train=False)["params"]
  v = {"params": params}
  enc = jax.jit(lambda i, m: model.apply(v, i, m, method=model.encode_texts))
  full = enc(ids, mask)
  gt = np.arange(nc) // 2
  feats = ({"tokens": img}, {"tokens": cap, "mask": np.arange(6)[None] < cl[:, None]}, full)
  got = model.apply(v, *feats, dense_mode="parity", caption_image=gt, chunk=4,
                    method=model.score)
  full_tok = np.asarray(full["tokens"], np.float64)
  dl = mask.sum(1)
  p = _aggr_ref(params["cross_net"]["aggr_net"])
  want = ref.seps_scores(img.astype(np.float64), cap.astype(np.float64), cl,
                         full_tok[:, :CUT][gt], np.minimum(dl, CUT)[gt], p, 0.5, mode="parity")
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)
  # The cut features are those of the whole text: encoding the text cut at 90 differs.
  cut_ids, cut_mask = tok.encode_batch(texts, CUT)
  cut = enc(cut_ids, cut_mask)
  assert np.abs(np.asarray(cut["tokens"])[:, :CUT - 1] - full_tok[:, :CUT - 1]).max() > 1e-3
  # Honest: every feature of the full-length encoding (no cut).
  got = model.apply(v, *feats, dense_mode="honest", chunk=4, method=model.score)
  want = ref.seps_scores(img.astype(np.float64), cap.astype(np.float64), cl, full_tok, dl, p,
                         0.5, mode="honest")
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


def test_dense_mode_same_for_training_and_evaluation():
  """Default honest for training and evaluation; `:parity` (ViT and Swin) trains and evaluates
  parity; setting either field sets both; paper configs encode dense captions at full length."""
  for mod in (seps_vit, seps_swin):
    c = mod.get_config()
    assert (c.model.seps.dense_mode, c.eval.dense_mode) == ("honest", "honest")
    assert c.data.dense_max_len == pipeline.DENSE_AUTO
    c = mod.get_config("parity")
    assert (c.model.seps.dense_mode, c.eval.dense_mode) == ("parity", "parity")
    assert c.to_dict()["eval"]["dense_mode"] == "parity"
  c = seps_vit.get_config()
  c.model.seps.dense_mode = "parity"
  assert c.eval.dense_mode == "parity"
  c = seps_vit.get_config("dense_mode=parity")
  assert c.eval.dense_mode == "parity"
  c = seps_vit.get_config("demo,parity")  # parity also wins over the demo's mode
  assert (c.model.seps.dense_mode, c.eval.dense_mode) == ("parity", "parity")
  assert seps.SEPS.from_config(seps_vit.get_config().model).dense_mode == "honest"
  assert seps.SEPS.dense_mode == "honest"
  assert laps_vit.get_config().model.seps.use_dense is False


class _FixedSims:
  """A stand-in model whose in-batch scores are fixed (the loss schedule is all that varies)."""

  def __init__(self, sims):
    self.sims = sims

  def apply(self, variables, batch, *, train, rngs):
    del variables, batch, train, rngs
    return {"seps": jnp.asarray(self.sims)}, {}


def test_warmup_scale_is_i_over_n():
  """Epoch 0 weighs batch i by i / n (the first batch 0), as the official code; then the
  hardest-negative hinge at full weight. Reference: the all-negative hinge summed by hand."""
  rng = np.random.default_rng(3)
  b, n, margin = 4, 5, 0.2
  sims = rng.normal(size=(b, b)).astype(np.float32)
  ids = np.arange(b, dtype=np.int32)
  d = np.diag(sims)
  off = ~np.eye(b, dtype=bool)
  all_neg = (np.maximum(0, margin + sims - d[:, None])[off].sum()  # image i vs caption j
             + np.maximum(0, margin + sims - d[None, :])[off].sum())  # caption j vs image i
  c = seps_vit.get_config("tiny")
  c.loss.warmup_epochs = 1
  fn = jax.jit(lambda step: trainer.loss_fn({}, {"image_index": ids}, jax.random.key(0), step,
                                            model=_FixedSims(sims), config=c,
                                            steps_per_epoch=n)[0])
  for i in range(n):
    assert float(fn(i)) == pytest.approx(i / n * all_neg, rel=1e-5, abs=1e-6), i
  hard = (np.max(np.where(off, np.maximum(0, margin + sims - d[:, None]), 0), 1).sum()
          + np.max(np.where(off, np.maximum(0, margin + sims - d[None, :]), 0), 0).sum())
  assert float(fn(n)) == pytest.approx(hard, rel=1e-5)


def test_dense_derangement():
  for n, seed in ((2, 0), (5, 1), (1000, 7)):
    p = evaluator.dense_derangement(n, seed)
    assert sorted(p.tolist()) == list(range(n)) and not np.any(p == np.arange(n))
  assert not np.array_equal(evaluator.dense_derangement(50, 0), evaluator.dense_derangement(50, 1))
  with pytest.raises(ValueError, match="2 images"):
    evaluator.dense_derangement(1, 0)


def test_leak_audit_on_tiny_checkpoint(tmp_path, capsys):
  """`--dense_shuffle` on a tiny trained SEPS checkpoint: results.json and the printed table
  carry parity and honest, unshuffled and shuffled; shuffling really moves the dense captions
  (the parity scores change, the unshuffled numbers equal a plain evaluation)."""
  c = tiny.tiny_config("seps", **{"train.max_steps": 1, "data.dense_max_len": 0})
  tiny.ensure_data(c)
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(c, str(workdir))
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["data"]["dense_max_len"] >= 30  # resolved to the full length before saving
  res = evaluate.evaluate_checkpoint(str(workdir), split="test", dense_shuffle=True,
                                     dense_shuffle_seed=3, out=str(tmp_path / "ev"))
  printed = capsys.readouterr().out
  on_disk = json.loads((tmp_path / "ev" / "results.json").read_text())
  assert on_disk["dense_mode"] == "honest" and on_disk["trained_dense_mode"] == "honest"
  audit = on_disk["leak_audit"]
  assert audit["seed"] == 3
  for mode in ("parity", "honest"):
    r = audit[mode]
    assert r["rsum_drop"] == pytest.approx(r["unshuffled"]["rsum"] - r["shuffled"]["rsum"])
    assert r["max_abs_score_change"] > 1e-6  # the permutation really moved the dense captions
    assert mode in printed
  assert audit["honest"]["unshuffled"]["rsum"] == pytest.approx(res["metrics"]["rsum"])
  assert "leak audit" in printed and "dense_mode=honest" in printed
