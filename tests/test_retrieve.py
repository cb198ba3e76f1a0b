"""Tests of `gseps_jax.retrieve` (index, query, CLI) and `gseps_jax.explain` (figures, masks).

One tiny GRM is trained once per session through `trainer.train_and_evaluate` (the real training
path: 240 steps, batch 16, InfoNCE, on 128 generated 32 px images; 16 test images). Measured on
this machine: text -> image R@1 25.0%, R@5 78.75% over the 80 test captions (chance 6.25% and
31.25%). Nearly all of the file's CPU time is that run's compiles (train step and evaluator).
"""

import base64
import fcntl
import io
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import grm_vit
from configs import seps_vit
from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import explain as explain_lib
from gseps_jax import models
from gseps_jax import optim
from gseps_jax import retrieve
from gseps_jax import state as state_lib
from gseps_jax import trainer
from gseps_jax.data import pipeline
from gseps_jax.data import tokenizer
from gseps_jax.search import encoder as search_encoder
from gseps_jax.search import index as index_lib
from gseps_jax.search import query
from gseps_jax.search import sources

NUM_TEST = 16
CAPTIONS_PER_IMAGE = 5


def _tiny_grm_config(data_dir):
  c = grm_vit.get_config("tiny,infonce")
  c.data.name = "synthetic_regions"
  c.data.data_dir = str(data_dir)
  c.data.synthetic = ml_collections.ConfigDict(dict(num_train=128, num_dev=8, num_test=NUM_TEST,
                                                    image_size=32, seed=0))
  c.data.image_size = 32
  c.data.text_aug_prob = 0.0
  c.data.tokenizer_dir = str(tokenizer.resolve_tokenizer_dir(c.data))
  c.model.vision.image_size = 32
  c.model.vision.patch_size = 8  # 4 x 4 patches + CLS
  c.train.batch_size = 16
  c.train.max_steps = 240
  c.train.eval_every = 10 ** 6  # no dev evaluations: the final test evaluation is enough
  c.train.log_every = 10 ** 6
  c.checkpoint.every_steps = 10 ** 6
  c.optim.lr = 1e-3
  c.optim.backbone_lr_mult = 1.0
  return c


def _train_once(tmp_path_factory):
  """The trained workdir and its results, trained once per test session: pytest-xdist workers
  share it (the first one to get the lock trains, the others wait and read its results); tests
  only read it."""
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  root = shared / "retrieve_trained"
  with open(shared / "retrieve_trained.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not (root / "results.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        results = trainer.train_and_evaluate(_tiny_grm_config(root / "tfds"),
                                             str(root / "grm"))
        (root / "results.json").write_text(json.dumps(results))
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return root, json.loads((root / "results.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, trainer results, restored (config, model, params, step), Retriever, Index)."""
  shared, results = _train_once(tmp_path_factory)
  root = tmp_path_factory.mktemp("retrieve")
  workdir = shared / "grm"
  config, model, params, step = state_lib.restore_params(str(workdir))
  retriever = search_encoder.Retriever(config, model, params)
  source = sources.open_images("dataset:test", config)
  out = index_lib.build_index(retriever, source, root / "index", checkpoint=str(workdir),
                             step=step)
  return dict(root=root, workdir=workdir, results=results, config=config, model=model,
              params=params, step=step, retriever=retriever, index=index_lib.load_index(out),
              source=source)


def _test_record(trained, i):
  return trained["source"].read([i])[0]


# ---------------------------------------------------------------------------------------------
# Index and text -> image search.


def test_index_layout_and_features_match_the_model(trained):
  index, config = trained["index"], trained["config"]
  meta = index.meta
  assert meta["model"] == "grm" and meta["num_images"] == NUM_TEST
  assert meta["checkpoint_step"] == trained["step"] == 240
  assert meta["fingerprint"] == ckpt_lib.fingerprint(config)
  assert meta["dense_mode"] == "none"
  assert index.names == [f"test_{i}" for i in range(NUM_TEST)]
  # Every GRM level's token set is stored, leading axis = image.
  assert set(index.images) == {"ori", "ori_mask", "key_mask", "unc", "unc_mask"}
  assert index.images["ori"].shape == (NUM_TEST, 1 + 16, config.model.embed_dim)
  assert index.images["unc"].shape == (NUM_TEST, config.model.grm.num_regions,
                                       config.model.embed_dim)
  assert len(index.caption_texts) == NUM_TEST * CAPTIONS_PER_IMAGE
  # Independent: image 5 preprocessed by the pipeline and encoded by a plain model.apply.
  rec = _test_record(trained, 5)
  assert index.caption_texts[5 * CAPTIONS_PER_IMAGE] == rec["captions"][0]
  x = pipeline.eval_image(rec["image"], pipeline.Preprocess.from_config(config.data), "5")
  ref = trained["model"].apply({"params": trained["params"]}, x[None], method="encode_images")
  np.testing.assert_allclose(index.images["ori"][5], ref["ori"][0], atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(index.images["key_mask"][5], ref["key_mask"][0])
  # Written atomically: no temporary directories left beside it, and no silent overwrite.
  assert sorted(p.name for p in index.path.parent.iterdir() if "tmp" in p.name) == []
  with pytest.raises(FileExistsError, match="--overwrite"):
    index_lib.build_index(trained["retriever"], trained["source"], index.path)


def test_caption_queries_find_their_image_far_above_chance(trained):
  """All 80 test captions as queries against the 16 test images. With random scores an image is
  in the top k with probability exactly k / 16; we require at least twice that for k = 1 and 5
  (measured 25.0% and 78.75%), and the same rates as the trainer's own evaluator (a separate code
  path: its pipeline batches and sharded scorer) on the same checkpoint."""
  index = trained["index"]
  captions = index.caption_texts
  hits = query.search_texts(trained["retriever"], index, captions, k=5)
  truth = np.arange(len(captions)) // CAPTIONS_PER_IMAGE
  top = np.array([[h["index"] for h in hs] for hs in hits])  # [80, 5]
  scores = np.array([[h["score"] for h in hs] for hs in hits])
  assert np.all(np.diff(scores, axis=1) <= 0)
  r1 = np.mean(top[:, 0] == truth)
  r5 = np.mean(np.any(top == truth[:, None], axis=1))
  chance1, chance5 = 1 / NUM_TEST, 5 / NUM_TEST
  assert r1 >= 2 * chance1, (r1, r5)
  assert r5 >= 2 * chance5, (r1, r5)
  ev = trained["results"]["test"]
  assert abs(100 * r1 - ev["t2i_r1"]) <= 100 / len(captions) + 1e-6, (r1, ev)
  assert abs(100 * r5 - ev["t2i_r5"]) <= 100 / len(captions) + 1e-6, (r5, ev)


def test_image_query_ranks_stored_captions_like_fresh_ones(trained):
  retriever, index = trained["retriever"], trained["index"]
  rec = _test_record(trained, 3)
  n = len(index.caption_texts)
  stored, mode = query.search_image(retriever, rec["image"], index.caption_texts, k=n,
                                       caption_feats=index.captions)
  assert mode == "none"
  assert [h["rank"] for h in stored] == list(range(1, n + 1))
  subset = index.caption_texts[:40]
  fresh, _ = query.search_image(retriever, rec["image"], subset, k=5)
  # The full stored ranking restricted to the first 40 captions: its top 5 must be the fresh top 5.
  best_in_subset = [h for h in stored if h["index"] < 40][:5]
  assert len(best_in_subset) == len(fresh) == 5
  # Stored caption features score exactly like captions encoded at query time.
  for a, b in zip(best_in_subset, fresh):
    assert a["caption"] == b["caption"]
    assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_folder_index_equals_dataset_index(trained, tmp_path):
  folder = tmp_path / "photos"
  folder.mkdir()
  for i in range(8):  # one encoder batch: the same compiled program as the dataset index
    rec = _test_record(trained, i)
    Image.open(io.BytesIO(rec["image"])).save(folder / f"img_{i:02d}.png")  # lossless copy
  (folder / "notes.txt").write_text("not an image")
  source = sources.open_images(str(folder), trained["config"])
  assert source.names == [f"img_{i:02d}.png" for i in range(8)]
  out = index_lib.build_index(trained["retriever"], source, tmp_path / "idx")
  index = index_lib.load_index(out)
  assert index.captions is None and index.meta["images"][0]["path"].endswith("img_00.png")
  np.testing.assert_allclose(index.images["ori"], trained["index"].images["ori"][:8], atol=1e-5)
  np.testing.assert_array_equal(index.images["key_mask"], trained["index"].images["key_mask"][:8])


# ---------------------------------------------------------------------------------------------
# Command line and mismatches.


def test_cli_query_json(trained, capsys):
  rec = _test_record(trained, 2)
  assert retrieve.main(["query", f"--index={trained['index'].path}", f"--text={rec['captions'][1]}",
                        "--k=3", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["direction"] == "text_to_image" and out["checkpoint_step"] == 240
  assert [h["rank"] for h in out["hits"]] == [1, 2, 3]
  assert out["hits"][0]["score"] >= out["hits"][1]["score"] >= out["hits"][2]["score"]
  assert all(h["name"] == f"test_{h['index']}" for h in out["hits"])
  # Same ranking as the library call (the CLI restored the checkpoint recorded in the index).
  lib = query.search_texts(trained["retriever"], trained["index"], [rec["captions"][1]], k=3)[0]
  assert [h["index"] for h in lib] == [h["index"] for h in out["hits"]]


def test_cli_index_of_a_folder_then_query_and_explain(trained, tmp_path, capsys):
  """`retrieve index` (an image folder), `query --image` and `explain` from their command lines."""
  folder = tmp_path / "photos"
  folder.mkdir()
  for i in range(8):
    Image.open(io.BytesIO(_test_record(trained, i)["image"])).save(folder / f"p{i}.png")
  wd = str(trained["workdir"])
  assert retrieve.main(["index", f"--checkpoint={wd}", f"--images={folder}",
                        f"--out={tmp_path / 'idx'}"]) == 0
  index = index_lib.load_index(tmp_path / "idx")
  assert [m["path"].rsplit("/", 1)[-1] for m in index.meta["images"]] == [
      f"p{i}.png" for i in range(8)]
  np.testing.assert_allclose(index.images["ori"], trained["index"].images["ori"][:8], atol=1e-5)
  capsys.readouterr()
  # Caption 0 of image 5 finds image 5 among the 8 no worse than the library ranking does.
  text = _test_record(trained, 5)["captions"][0]
  assert retrieve.main(["query", f"--index={tmp_path / 'idx'}", f"--text={text}", "--k=8",
                        "--json"]) == 0
  hits = json.loads(capsys.readouterr().out)["hits"]
  lib = query.search_texts(trained["retriever"], index, [text], k=8)[0]
  assert [h["index"] for h in hits] == [h["index"] for h in lib] and len(hits) == 8
  assert retrieve.main(["explain", f"--checkpoint={wd}", f"--image={folder / 'p5.png'}",
                        f"--text={text}", f"--out={tmp_path / 'fig.png'}"]) == 0
  with Image.open(tmp_path / "fig.png") as im:
    assert im.format == "PNG" and im.size[0] >= 4 * explain_lib.PANEL_PX
  assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_format_hits_table():
  hits = [dict(rank=1, score=0.5, index=3, name="a.png", path=""),
          dict(rank=2, score=-0.25, index=0, name="bb.png", path="")]
  lines = query.format_hits(hits, "image").splitlines()
  assert lines[0].split() == ["rank", "score", "image"]
  assert lines[2].split() == ["1", "0.5000", "a.png"]
  assert lines[3].split() == ["2", "-0.2500", "bb.png"]


def _zero_checkpoint(config, workdir):
  """A real, restorable checkpoint of `config`'s model with all-zero weights (no compile)."""
  model = models.build_model(config.model)
  abstract = state_lib.abstract_params(model, state_lib.sample_batch(config))
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  tx, _, _ = optim.make_optimizer(config.optim, 1, abstract)
  state = state_lib.TrainState(step=np.zeros((), np.int32), params=params,
                             opt_state=tx.init(params))
  ckpt = ckpt_lib.Checkpointer(workdir, best_metric=None, async_save=False)
  ckpt.save(0, state, {"config": config.to_dict(), "fingerprint": ckpt_lib.fingerprint(config),
                       "data_state": {"seed": 0, "step": 0}})
  ckpt.close()
  return workdir


def test_query_with_another_models_checkpoint_is_a_clear_error(trained, tmp_path):
  other = seps_vit.get_config("tiny")
  _zero_checkpoint(other, tmp_path / "seps")
  with pytest.raises(index_lib.IndexMismatchError, match=r"different model.*model\.name"):
    retrieve.main(["query", f"--index={trained['index'].path}",
                   f"--checkpoint={tmp_path / 'seps'}", "--text=a red circle"])


def test_same_model_other_weights_is_a_clear_error(trained):
  index, config, params = trained["index"], trained["config"], trained["params"]
  index_lib.check_index(index, config, params)  # the right weights pass
  nudged = jax.tree.map(lambda x: x * 1.01, params)
  with pytest.raises(index_lib.IndexMismatchError, match="other weights"):
    index_lib.check_index(index, config, nudged)
  bigger = config.copy_and_resolve_references()
  bigger.data.image_size = 64
  with pytest.raises(index_lib.IndexMismatchError, match="data.image_size"):
    index_lib.check_index(index, bigger)


def test_seps_dense_modes_and_dense_file_errors(tmp_path):
  seps = seps_vit.get_config("tiny")
  folder = tmp_path / "f"
  folder.mkdir()
  Image.new("RGB", (8, 8)).save(folder / "a.png")
  Image.new("RGB", (8, 8)).save(folder / "b.png")
  src = sources.open_images(str(folder), seps)
  assert index_lib.dense_mode_for(seps, src)[0] == "sparse_only"
  dense = tmp_path / "dense.jsonl"
  dense.write_text(json.dumps({"image": "a.png", "dense_caption": "a black square"}) + "\n")
  with pytest.raises(ValueError, match="1 images have none"):
    sources.open_images(str(folder), seps, str(dense))
  with dense.open("a") as f:
    f.write(json.dumps({"image": "b.png", "dense_caption": "another black square"}) + "\n")
  src = sources.open_images(str(folder), seps, str(dense))
  assert index_lib.dense_mode_for(seps, src)[0] == "honest"
  assert src.read([1])[0]["dense"] == "another black square"
  laps = seps_vit.get_config("tiny,use_dense=false")
  assert index_lib.dense_mode_for(laps, src)[0] == "none"


def test_bucket_sizes():
  assert [search_encoder.bucket(n, 8) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 8]
  with pytest.raises(ValueError):
    search_encoder.bucket(0, 8)


# ---------------------------------------------------------------------------------------------
# explain.


def test_explain_grm_figure_and_masks_match_the_model(trained, tmp_path):
  config, model, params = trained["config"], trained["model"], trained["params"]
  rec = _test_record(trained, 7)
  path = tmp_path / "img.jpg"
  path.write_bytes(rec["image"])
  text = rec["captions"][0]
  png, arrays = explain_lib.explain(config, model, params, str(path), text,
                                    out=tmp_path / "fig.png")
  k = config.model.grm.num_regions
  with Image.open(png) as im:
    assert im.size == explain_lib.figure_size_px(arrays) == (max(4, k) * explain_lib.PANEL_PX,
                                                             2 * explain_lib.PANEL_PX)
  # Independent: the public encoders via model.apply on the pipeline's preprocessing.
  x = pipeline.eval_image(rec["image"], pipeline.Preprocess.from_config(config.data), "7")
  img = model.apply({"params": params}, x[None], method="encode_images")
  np.testing.assert_array_equal(arrays["kept_tokens"], np.asarray(img["key_mask"][0]))
  np.testing.assert_array_equal(arrays["kept_patches"].ravel(), np.asarray(img["key_mask"][0, 1:]))
  assert arrays["region_attention"].shape == (k, 4, 4) and arrays["region_sigma"].shape == (k,)
  # Â's columns sum to 1 over the kept tokens (patches + CLS) and vanish on dropped ones.
  total = arrays["region_attention"].sum((1, 2)) + arrays["region_attention_cls"]
  np.testing.assert_allclose(total, 1.0, atol=1e-4)
  assert np.all(arrays["region_attention"][:, ~arrays["kept_patches"]] == 0)
  assert np.all(arrays["region_sigma"] > 0)
  # Word -> best patch: argmax cosine of the text tokens against the patch tokens, in NumPy.
  tok = pipeline.tokenizer_from_config(config)
  ids, mask = tok.encode_batch([text], config.data.max_len)
  txt = model.apply({"params": params}, ids, mask, method="encode_texts")
  t = np.asarray(txt["ori"][0])[arrays["word_positions"]]
  v = np.asarray(img["ori"][0, 1:])
  cos = (t / np.linalg.norm(t, axis=1, keepdims=True)) @ (
      v / np.linalg.norm(v, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(arrays["word_patch"], np.argmax(cos, axis=1))
  np.testing.assert_array_equal(arrays["text_kept"],
                                np.asarray(txt["key_mask"][0])[arrays["word_positions"]])
  word_ids = ids[0][arrays["word_positions"]]
  assert arrays["words"] == [tok.backend.id_to_token(int(i)) for i in word_ids]


@pytest.fixture(scope="module")
def seps_explainer():
  """A tiny SEPS with random weights (selection needs no training to be checked)."""
  config = seps_vit.get_config("tiny")
  config.data.tokenizer_dir = str(tokenizer.resolve_tokenizer_dir(config.data))
  model = models.build_model(config.model)
  abstract = state_lib.abstract_params(model, state_lib.sample_batch(config))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
  return explain_lib.Explainer(config, model, params)


def test_explain_seps_selection_matches_numpy_reference(seps_explainer, tmp_path):
  ex = seps_explainer
  image = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
  text = "a small red circle at the top left"
  arrays = ex.arrays(image, text, dense_caption="a red circle and a blue square")
  # Reference: the public encoders, then the SEPS rule in NumPy.
  data, _ = explain_lib.image_bytes(image)
  x = pipeline.eval_image(data, ex.pp, "x")
  tokens = np.asarray(ex.model.apply({"params": ex.params}, x[None],
                                     method="encode_images")["tokens"][0])
  assert tokens.shape[0] == 17  # CLS + 4 x 4 patches
  patches = tokens[1:]
  ids, mask = ex.tok.encode_batch([text], ex.pp.max_len)
  words = np.asarray(ex.model.apply({"params": ex.params}, ids, mask,
                                    method="encode_texts")["tokens"][0])
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  score = unit(patches) @ unit(patches.mean(0)) + unit(patches) @ unit(words[mask[0] > 0].mean(0))
  k = int(np.ceil(16 * ex.config.model.seps.rho))
  keep = np.zeros(16, bool)
  keep[np.argsort(-score, kind="stable")[:k]] = True
  assert arrays["k"] == k == 8
  np.testing.assert_array_equal(arrays["kept_tokens"], keep)
  np.testing.assert_allclose(arrays["selection_score"].ravel(), score, atol=1e-5)
  assert arrays["dense_kept_patches"].sum() == k
  cos = unit(words[arrays["word_positions"]]) @ unit(patches).T
  np.testing.assert_array_equal(arrays["word_patch"], np.argmax(cos, axis=1))


def test_html_report_is_self_contained(seps_explainer, tmp_path):
  paths = []
  for i, colour in enumerate(((200, 30, 30), (30, 30, 200))):
    p = tmp_path / f"q{i}.png"
    Image.new("RGB", (32, 32), colour).save(p)
    paths.append(p)
  out = explain_lib.html_report(seps_explainer, [(paths[0], "a <b>red</b> square"),
                                                 (paths[1], "a blue square")],
                                tmp_path / "r" / "report.html", title="t")
  page = out.read_text()
  assert page.count("data:image/png;base64,") == 2
  assert "&lt;b&gt;red&lt;/b&gt;" in page and "<b>red</b>" not in page
  assert "http" not in page  # nothing fetched from a server
  blob = page.split("data:image/png;base64,")[1].split('"')[0]
  with Image.open(io.BytesIO(base64.b64decode(blob))) as im:
    assert im.size == (4 * explain_lib.PANEL_PX, 2 * explain_lib.PANEL_PX)
