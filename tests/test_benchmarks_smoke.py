"""Smoke test of benchmarks/roofline.py's cost-analysis path at tiny sizes (no timing).

Checks that XLA's FLOP counts are positive and scale with the batch as the formulas say: the
pair-grid kernel is quadratic in the batch (every image x every caption), tile x tile-count equals
the untiled grid (the method used for COCO-5K), and the official-loop FLOP formula matches a hand
count. (Train-step lowering is left to the benchmark itself: even a tiny GRM step takes 30-150 s
to compile on this shared CPU.)
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import roofline  # pylint: disable=g-import-not-at-top,wrong-import-position
from gseps_jax.models import similarity  # pylint: disable=wrong-import-position


def _kernel_flops(b, lx=6, ly=4, d=8):
  sds = jax.ShapeDtypeStruct
  return roofline.cost_of(lambda *a: similarity.token_similarity(*a, chunk=None),
                          sds((b, lx, d), jnp.float32), sds((b, lx), bool),
                          sds((b, ly, d), jnp.float32), sds((b, ly), bool))


def test_kernel_flops_quadratic_in_batch():
  c4, c8 = _kernel_flops(4), _kernel_flops(8)
  assert c4["flops"] > 0 and c4["bytes"] > 0
  # The [B, B, Lx, Ly] cosine block dominates: doubling B -> ~4x the FLOPs.
  assert 3.5 < c8["flops"] / c4["flops"] < 4.5
  # At least the matmul's 2 * B^2 * Lx * Ly * D FLOPs are counted.
  assert c8["flops"] >= 2 * 8 * 8 * 6 * 4 * 8


def test_tiled_scoring_cost_is_tile_times_count():
  """roofline lowers one pair tile and multiplies by the tile count (XLA counts a loop body once):
  the product must agree with lowering the whole grid untiled, and grow 4x when both sides
  double."""
  whole = roofline.grm_scoring_cost(8, 16, tile=(8, 16))
  tiled = roofline.grm_scoring_cost(8, 16, tile=(4, 8))
  small = roofline.grm_scoring_cost(4, 8, tile=(4, 8))
  assert tiled["n_tiles"] == 4 and whole["n_tiles"] == 1
  assert whole["flops"] > 0
  np.testing.assert_allclose(tiled["flops"], whole["flops"], rtol=0.05)
  assert 3.5 < whole["flops"] / small["flops"] < 4.5


def test_seps_scoring_cost_per_pair_between_bounds():
  """The SEPS roofline lowers (it stopped lowering once, unnoticed, when the kernel moved to
  models/sdtps.py): per pair, at least the all-patch aggregation GEMM 2 N_c N D, and less than
  the official loop, which re-runs the aggregation MLP for every pair."""
  c = roofline.seps_scoring_cost(2, 8, tile=(1, 4))
  assert c["n_tiles"] == 4 and c["pairs"] == 16
  per_pair = c["tile_flops"] / 4
  off = roofline.official_seps_pair_flops()
  assert 2 * off["N_c"] * 196 * 512 <= per_pair < off["pair"]


def test_official_pair_flops_hand_count():
  off = roofline.official_seps_pair_flops()
  assert (off["K"], off["N_c"], off["H"], off["T"]) == (98, 39, 102, 41)
  n, k, d, h, nc = 196, 98, 512, 102, 39
  sparse = 2 * n * d + 2 * k * d * h + 2 * k * h * nc + 2 * nc * k * d + 2 * (n - k) * d + \
      2 * 32 * 41 * d
  assert off["sparse"] == sparse
  assert off["pair"] == sparse + off["dense"] > sparse


def test_floors_take_the_binding_limit():
  fl = roofline.floors(989e12, 0.0)["H100-SXM"]
  np.testing.assert_allclose(fl["floor_bf16_s"], 1.0)
  fl = roofline.floors(0.0, 3.35e12)["H100-SXM"]
  np.testing.assert_allclose(fl["floor_bf16_s"], 1.0)


def test_demo_table_ceiling_from_generator_ground_truth():
  """benchmarks/demo_table.py's ceiling: hand cases of the tie formula, and on a small generated
  split every caption fits its own image, captions naming fewer attributes fit more images, and
  the bound is below a perfect 600."""
  import demo_table  # pylint: disable=g-import-not-at-top
  from gseps_jax.data import scenes  # pylint: disable=g-import-not-at-top
  tie = demo_table.expected_recall_ties
  assert tie(1, 1, 1) == 1.0 and tie(2, 1, 1) == 0.5 and tie(4, 1, 5) == 1.0
  assert tie(10, 5, 1) == 0.5 and tie(7, 5, 1) == pytest.approx(5 / 7)
  assert tie(7, 5, 2) == pytest.approx(1 - 1 / 21)  # both top-2 from the 2 others: 1/C(7,2)
  # Ranked tie groups (size, relevant): an image whose one own caption fits only it ranks that
  # caption first (R@1 = 1), where one tie of its 5 own + 2 twin captions gave 5/7.
  grp = demo_table.expected_recall_groups
  assert grp([(1, 1), (6, 4)], 1) == 1.0
  assert grp([(2, 0), (4, 1)], 1) == 0.0 and grp([(2, 0), (4, 1)], 3) == pytest.approx(0.25)
  assert grp([(2, 0), (4, 1)], 6) == 1.0 and grp([(3, 0)], 5) == 0.0
  assert grp([(7, 5)], 2) == pytest.approx(tie(7, 5, 2))
  gt = scenes.split_ground_truth(0, "test", 40)
  assert len(gt) == 40 and all(len(caps) == 5 for caps in gt)
  assert all(i in s for i, caps in enumerate(gt) for s in caps)
  # A caption naming only shapes and positions fits a twin that differs in colour or size.
  twins = 0
  for pair in range(20):
    (a, diff_a, _), (b, diff_b, _) = scenes.pair_scenes(0, "test", pair)
    if diff_b in ("colour", "size"):
      assert scenes.template_signature(a, 5) == scenes.template_signature(b, 5)
      assert scenes.template_signature(a, 0) != scenes.template_signature(b, 0)
      twins += 1
  assert twins > 0
  c = demo_table.ceiling(0, "test", 40)
  assert 300 < c["rsum"] < 600 and c["t2i_r1"] < 100 and c["captions_fitting_several"] > 0
  # The Bayes-optimal i2t ranking beats one tie over every fitting caption, image by image.
  fits = np.zeros(40)
  for caps in gt:
    for s in caps:
      fits[list(s)] += 1
  assert c["i2t_r1"] >= 100 * np.mean([tie(int(m), 5, 1) for m in fits]) - 1e-9


def test_train_memory_estimate_orders_the_variants():
  """benchmarks/train_memory.py on reduced encoders (tracing only): remat keeps fewer
  activations (blocks < dots < none), gradient caching keeps one chunk's encoder activations
  (fewer than the full batch's), bf16 activations take less than fp32, and the fixed part
  (parameters, gradients, AdamW state; fp32 in every variant) does not change."""
  import train_memory  # pylint: disable=g-import-not-at-top
  enc = roofline.reduced_encoders(width=32, layers=2, image_size=32, heads=2)
  got = {name: train_memory.step_memory("grm", 16, *train_memory.VARIANTS[name], encoders=enc)
         for name in ("plain", "remat=dots", "remat=blocks", "encoder_chunk=8", "bf16")}
  res = {k: v["residuals"] for k, v in got.items()}
  assert res["remat=blocks"] < res["remat=dots"] < res["plain"]
  assert res["encoder_chunk=8"] < res["plain"]
  assert res["bf16"] < res["plain"]
  assert len({v["fixed"] for v in got.values()}) == 1
  assert all(v["peak"] == v["fixed"] + v["residuals"] + v["batch"] for v in got.values())
  # The fit: a peak that doubles per 8 examples past 24 GB caps the batch.
  assert train_memory.max_batch({8: 1e9, 16: 2e9, 32: 4e9}, 24) == 160


def test_grm_ablation_redundancy_figures():
  """benchmarks/grm_ablation.py --redundancy: an object's centre patch is an object patch, an
  empty scene has none, and on a few generated images every figure is a proper fraction."""
  import grm_ablation  # pylint: disable=g-import-not-at-top
  from gseps_jax.data import scenes  # pylint: disable=g-import-not-at-top
  scene = {"objects": [{"shape": "square", "colour": "red", "size": "large", "cell": [0, 0],
                        "jitter": [0.0, 0.0]}]}
  obj = grm_ablation._object_patches(scenes.render_scene(scene, 32), 8)
  x, y = scenes.object_centre(scene["objects"][0], 32)
  assert obj.shape == (4, 4) and obj[int(y) // 8, int(x) // 8]
  assert not obj[3, 3]  # the bottom-right corner is background
  assert not grm_ablation._object_patches(scenes.render_scene({"objects": []}, 32), 8).any()
  caps = os.path.join(os.path.dirname(__file__), "data", "f30k", "test_caps.txt")
  r = grm_ablation.redundancy(num_images=6, f30k_caps=caps)
  assert r["patches"] == 16 and 1.0 <= r["object_patches_mean"] < 16
  assert 0.2 < r["attr_word_frac"] < 0.9 and 0.2 < r["f30k_content_frac"] < 0.9


def test_demo_table_trains_and_scores_every_baseline(tmp_path):
  """benchmarks/demo_table.py end to end on a tiny generated split: the two baselines (models
  outside the registry, trained by the project's loop and scored by its Evaluator) and GRM each
  train and score the test split."""
  import demo_table  # pylint: disable=g-import-not-at-top
  out = tmp_path / "rows.json"
  demo_table.main(["--models=pooled,tokens,grm", "--modes=steps", "--steps=1",
                   "--num_train=16", "--num_test=8", "--batch_size=8",
                   f"--data_dir={tmp_path / 'tfds'}", f"--out={out}"])
  import json  # pylint: disable=g-import-not-at-top
  rows = json.loads(out.read_text())["rows"]
  assert [r["model"] for r in rows] == ["pooled", "tokens", "grm"]
  assert all(r["steps"] == 1 and 0.0 <= r["rsum"] <= 600.0 for r in rows)
  # The demo's frozen MiniLM gets no update.
  assert all(r["text_tower"] == "frozen" and r["text_change"] == 0.0 for r in rows)


def test_demo_table_scratch_text_tower_trains(tmp_path):
  """`--text_tower=scratch`: a small random text transformer (2 layers, 128 wide, MiniLM's
  vocabulary) replaces the frozen MiniLM, gets no cached features, and its parameters move."""
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  import demo_table  # pylint: disable=g-import-not-at-top
  args = argparse.Namespace(variant="", data_dir=str(tmp_path / "tfds"), num_train=16,
                            num_test=8, batch_size=8, split="test", text_tower="scratch")
  for name in ("pooled", "grm"):
    c = demo_table.make_config(name, args)
    assert not c.model.freeze_text and c.optim.frozen_patterns == ()
    assert (c.model.text.num_hidden_layers, c.model.text.hidden_size) == (2, 128)
    assert c.model.text.vocab_size == 30522  # MiniLM's tokenizer still feeds it
  out = tmp_path / "rows.json"
  demo_table.main(["--models=pooled,grm", "--modes=steps", "--steps=2", "--num_train=16",
                   "--num_test=8", "--batch_size=8", "--text_tower=scratch",
                   f"--data_dir={tmp_path / 'tfds'}", f"--out={out}"])
  rows = json.loads(out.read_text())["rows"]
  assert [r["model"] for r in rows] == ["pooled", "grm"]
  assert all(r["text_tower"] == "scratch" and r["text_change"] > 0.0 for r in rows)
  assert all(r["regime"] == "2 steps scratch text" for r in rows)
