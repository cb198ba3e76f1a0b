"""Retrieval metrics vs float64 NumPy references written as plain loops, hand-checked cases,
the COCO 1K-fold protocol, and sharded inputs on 8 fake CPU devices (subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gseps_jax import metrics

KEYS = metrics.METRIC_KEYS


# ----------------------------------------------------------------------------- references


def _vse_official(sims, cpi):
  """The VSE++ `i2t` / `t2i` loops (argsort based), for scores without ties."""
  sims = np.asarray(sims, np.float64)
  ni = sims.shape[0]
  i2t = np.zeros(ni)
  for index in range(ni):
    inds = np.argsort(sims[index])[::-1]
    rank = 1e20
    for i in range(cpi * index, cpi * index + cpi):
      tmp = np.where(inds == i)[0][0]
      rank = min(rank, tmp)
    i2t[index] = rank
  t2i = np.zeros(ni * cpi)
  for j in range(ni * cpi):
    inds = np.argsort(sims[:, j])[::-1]
    t2i[j] = np.where(inds == j // cpi)[0][0]
  return i2t, t2i


def _sorted_ranks(sims, cpi, ties):
  """Ranks by an explicit sort with a tie-break: pessimistic puts tied wrong items first."""
  sims = np.asarray(sims, np.float64)
  ni, nc = sims.shape
  own_last = ties == "pessimistic"

  def rank_of(scores, is_target):
    # Python's sort is stable; key = (-score, target-after-wrong?) decides ties explicitly.
    order = sorted(range(len(scores)),
                   key=lambda k: (-scores[k], (is_target(k) == own_last)))
    return min(pos for pos, k in enumerate(order) if is_target(k))

  i2t = [rank_of(sims[i], lambda j, i=i: j // cpi == i) for i in range(ni)]
  t2i = [rank_of(sims[:, j], lambda i, j=j: i == j // cpi) for j in range(nc)]
  return np.array(i2t, np.float64), np.array(t2i, np.float64)


def _metrics_ref(i2t, t2i):
  out = {}
  for name, r in (("i2t", i2t), ("t2i", t2i)):
    for k in (1, 5, 10):
      out[f"{name}_r{k}"] = 100.0 * len(np.where(r < k)[0]) / len(r)
    out[f"{name}_medr"] = np.floor(np.median(r)) + 1
    out[f"{name}_meanr"] = r.mean() + 1
  out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
  return out


def _assert_metrics(got, want):
  assert list(got) == list(KEYS)
  for k in KEYS:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-9, err_msg=k)


# ----------------------------------------------------------------------------- hand-checked


def test_perfect_diagonal_gives_rsum_600():
  sims = np.repeat(np.eye(4), 5, axis=1) + 0.01 * np.random.default_rng(0).random((4, 20))
  m = metrics.retrieval_metrics(sims, 5)
  assert m["rsum"] == 600.0
  assert m["i2t_medr"] == m["t2i_medr"] == m["i2t_meanr"] == m["t2i_meanr"] == 1.0


# Image 0 owns captions 0-4, image 1 owns 5-9.
HAND = np.array([
    [0.10, 0.90, 0.20, 0.30, 0.40, 0.95, 0.50, 0.00, 0.00, 0.00],
    [0.85, 0.10, 0.10, 0.10, 0.10, 0.70, 0.60, 0.85, 0.20, 0.30],
])


def test_hand_built_2x10():
  # i2t: image 0's best own caption (c1, 0.90) is beaten by c5 (0.95) -> rank 1. Image 1's best
  # own caption (c7, 0.85) ties with wrong c0 (0.85) -> rank 1 pessimistic, 0 optimistic.
  # t2i: c0 (0.10 vs 0.85) and c5 (0.70 vs 0.95) rank 1; the other 8 captions rank 0.
  i2t, t2i = metrics.retrieval_ranks(HAND, 5)
  np.testing.assert_array_equal(i2t, [1, 1])
  np.testing.assert_array_equal(t2i, [1, 0, 0, 0, 0, 1, 0, 0, 0, 0])
  m = metrics.retrieval_metrics(HAND, 5)
  assert (m["i2t_r1"], m["i2t_r5"], m["i2t_medr"], m["i2t_meanr"]) == (0.0, 100.0, 2.0, 2.0)
  assert (m["t2i_r1"], m["t2i_r5"], m["t2i_medr"]) == (80.0, 100.0, 1.0)
  np.testing.assert_allclose(m["t2i_meanr"], 1.2)
  assert m["rsum"] == 480.0
  o = metrics.retrieval_metrics(HAND, 5, ties="optimistic")
  assert (o["i2t_r1"], o["i2t_medr"], o["i2t_meanr"], o["rsum"]) == (50.0, 1.0, 1.5, 530.0)


def test_constant_scores_are_not_a_perfect_model():
  m = metrics.retrieval_metrics(np.zeros((3, 15), np.float32), 5)
  # Pessimistic: every one of the 10 wrong captions ties above; t2i: 2 wrong images above.
  assert (m["i2t_r10"], m["i2t_medr"], m["t2i_r1"], m["t2i_medr"]) == (0.0, 11.0, 0.0, 3.0)


# ----------------------------------------------------------------------------- random vs references


@pytest.mark.parametrize("ni,cpi", [(9, 5), (17, 1), (6, 3)])
def test_random_distinct_scores_match_official_vse_code(ni, cpi):
  rng = np.random.default_rng(ni * 10 + cpi)
  # float32-representable values so the device (float32) and the reference see the same scores.
  sims = rng.standard_normal((ni, ni * cpi)).astype(np.float32)
  want = _metrics_ref(*_vse_official(sims, cpi))
  _assert_metrics(metrics.retrieval_metrics(sims, cpi), want)
  _assert_metrics(metrics.retrieval_metrics(sims, cpi, ties="optimistic"), want)


@pytest.mark.parametrize("ties", metrics.TIES)
@pytest.mark.parametrize("ni,cpi", [(8, 5), (15, 1)])
def test_random_scores_with_exact_ties_match_sorted_reference(ni, cpi, ties):
  rng = np.random.default_rng(ni + cpi)
  # Four distinct values: most scores tie with something.
  sims = rng.integers(0, 4, size=(ni, ni * cpi)).astype(np.float32)
  want_i2t, want_t2i = _sorted_ranks(sims, cpi, ties)
  i2t, t2i = metrics.retrieval_ranks(sims, cpi, ties=ties)
  np.testing.assert_array_equal(i2t, want_i2t)
  np.testing.assert_array_equal(t2i, want_t2i)
  _assert_metrics(metrics.retrieval_metrics(sims, cpi, ties=ties), _metrics_ref(want_i2t, want_t2i))


def test_pessimistic_never_beats_optimistic():
  sims = np.random.default_rng(3).integers(0, 3, size=(12, 36)).astype(np.float32)
  p, o = metrics.retrieval_metrics(sims, 3), metrics.retrieval_metrics(sims, 3, ties="optimistic")
  assert p["rsum"] < o["rsum"]
  assert p["i2t_meanr"] > o["i2t_meanr"]


# ----------------------------------------------------------------------------- COCO folds


def _fold_structured(n_folds, fold_size, fold_ranks, off_fold=2.0):
  """`[n, n]` scores (1 caption per image) where every query of fold f ranks at fold_ranks[f].

  In-fold: own score 0.5; wrong item at cyclic offset 1..r scores 1.0, the rest 0.0, so both
  directions have exactly r wrong items above the target. Off-fold scores beat everything.
  """
  n = n_folds * fold_size
  sims = np.full((n, n), off_fold, np.float32)
  a = np.arange(fold_size)
  offset = (a[None, :] - a[:, None]) % fold_size
  for f, r in enumerate(fold_ranks):
    block = np.where((offset >= 1) & (offset <= r), 1.0, 0.0).astype(np.float32)
    block[a, a] = 0.5
    sl = slice(f * fold_size, (f + 1) * fold_size)
    sims[sl, sl] = block
  return sims


def test_coco_1k_folds_on_5000_images():
  sims = _fold_structured(5, 1000, fold_ranks=(0, 3, 6, 9, 12))
  m = metrics.coco_1k_folds(sims, captions_per_image=1)
  # R@1: fold 0 only; R@5: ranks 0, 3; R@10: ranks 0, 3, 6, 9. medr = meanr = mean(r) + 1 = 7.
  for d in ("i2t", "t2i"):
    assert (m[f"{d}_r1"], m[f"{d}_r5"], m[f"{d}_r10"]) == (20.0, 40.0, 80.0)
    assert (m[f"{d}_medr"], m[f"{d}_meanr"]) == (7.0, 7.0)
  assert m["rsum"] == 280.0
  assert set(m) == set(KEYS)
  folds = metrics.coco_fold_metrics(sims, 1)
  assert [f["rsum"] for f in folds] == [600.0, 400.0, 200.0, 200.0, 0.0]
  # The 5K protocol on the same matrix sees the off-fold scores: 4,000 wrong items above.
  full = metrics.retrieval_metrics(sims, 1)
  assert full["rsum"] == 0.0
  # Ranks 4000 + (0, 3, 6, 9, 12), 1,000 queries each: median and mean 4006 (+1).
  assert full["i2t_medr"] == full["i2t_meanr"] == full["t2i_medr"] == 4007.0


def test_coco_folds_with_5_captions_match_per_fold_reference():
  rng = np.random.default_rng(7)
  sims = rng.standard_normal((12, 60)).astype(np.float32)
  m = metrics.coco_1k_folds(sims, 5, fold_size=4)
  refs = [_metrics_ref(*_vse_official(sims[4 * f:4 * f + 4, 20 * f:20 * f + 20], 5))
          for f in range(3)]
  for k in KEYS:
    if k != "rsum":
      np.testing.assert_allclose(m[k], np.mean([r[k] for r in refs]), atol=1e-9, err_msg=k)
  np.testing.assert_allclose(m["rsum"], np.mean([r["rsum"] for r in refs]), atol=1e-9)
  with pytest.raises(ValueError, match="multiple of fold_size"):
    metrics.coco_1k_folds(sims, 5, fold_size=5)


# ----------------------------------------------------------------------------- errors


def test_clear_errors():
  with pytest.raises(ValueError, match=r"n_images \* 5"):
    metrics.retrieval_metrics(np.zeros((3, 14)), 5)
  with pytest.raises(ValueError, match=r"\[n_images, n_captions\]"):
    metrics.retrieval_metrics(np.zeros(15), 5)
  with pytest.raises(ValueError, match="ties"):
    metrics.retrieval_metrics(np.zeros((1, 5)), 5, ties="random")
  with pytest.raises(ValueError, match="floating"):
    metrics.retrieval_metrics(np.zeros((1, 5), np.int32), 5)
  bad = np.zeros((2, 10), np.float32)
  bad[1, 3] = np.nan
  with pytest.raises(ValueError, match="1 NaN"):
    metrics.retrieval_metrics(bad, 5)


# ----------------------------------------------------------------------------- sharded


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, re
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from gseps_jax import metrics

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    rng = np.random.default_rng(0)
    sims = rng.integers(0, 6, size=(16, 80)).astype(np.float32)  # ties included
    out = {}
    specs = {"rows_cols": P("data", "fsdp"), "cols": P(None, ("data", "fsdp")),
             "rows": P(("data", "fsdp"), None)}
    for name, spec in specs.items():
      x = jax.device_put(sims, NamedSharding(mesh, spec))
      assert len(x.addressable_shards) == 8
      out[name] = {"metrics": metrics.retrieval_metrics(x, 5),
                        "folds": metrics.coco_1k_folds(x, 5, fold_size=4)["rsum"]}
    # The compiled rank computation must not move the [16, 80] matrix (or blocks of it).
    x = jax.device_put(sims, NamedSharding(mesh, P("data", "fsdp")))
    fn = metrics._ranks_fn(5, True, NamedSharding(mesh, P()))
    hlo = fn.lower(x).compile().as_text()
    # Result shapes of every collective (the text before the op name on its line).
    shapes = []
    for line in hlo.splitlines():
      m = re.search(r"= (.*?) (all-gather|all-reduce|all-to-all|collective-permute)\\(", line)
      if m:
        dims = re.findall(r"\\w+\\[([\\d,]*)\\]", m.group(1))
        shapes += [d.split(",") if d else [] for d in dims]
    out["collective_shapes"] = shapes
    print("RESULT" + json.dumps(out))
""")


def test_sharded_input_on_8_fake_devices_gives_same_metrics():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
  out = json.loads(line[len("RESULT"):])
  sims = np.random.default_rng(0).integers(0, 6, size=(16, 80)).astype(np.float32)
  want = metrics.retrieval_metrics(sims, 5)
  want_folds = metrics.coco_1k_folds(sims, 5, fold_size=4)["rsum"]
  for name in ("rows_cols", "cols", "rows"):
    _assert_metrics(out[name]["metrics"], want)
    assert out[name]["folds"] == want_folds
  # Only per-query vectors and scalars cross devices, never a [16, 80] (or any 2-D) block; and
  # the reductions really are distributed (there are collectives at all).
  shapes = out["collective_shapes"]
  assert shapes and all(len(s) <= 1 for s in shapes), shapes
  assert ["16"] in shapes and ["80"] in shapes
