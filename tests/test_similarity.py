"""Tests of the token-similarity kernel against an independent float64 NumPy double loop."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from gseps_jax.models import similarity

# XLA's cheap CPU code generation for the test compiles (they dominate this file's time; the
# values are the same). Only a top-level jit takes compiler options.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
token_similarity = jax.jit(similarity.token_similarity,
                           static_argnames=("direction", "chunk", "compute_dtype", "precision",
                                            "buckets"),
                           compiler_options=FAST)


def numpy_reference(x, xm, y, ym, direction):
  """float64 double loop straight from the definition (no tiling, no masking tricks)."""
  out = np.zeros((len(x), len(y)))
  for i in range(len(x)):
    for j in range(len(y)):
      a, b = x[i][xm[i]].astype(np.float64), y[j][ym[j]].astype(np.float64)
      if len(a) == 0 or len(b) == 0:
        continue  # documented: an empty item scores 0
      a = a / np.linalg.norm(a, axis=1, keepdims=True)
      b = b / np.linalg.norm(b, axis=1, keepdims=True)
      cos = a @ b.T  # [la, lb]
      x2y, y2x = cos.max(axis=1).mean(), cos.max(axis=0).mean()
      out[i, j] = {"x2y": x2y, "y2x": y2x, "both": 0.5 * (x2y + y2x)}[direction]
  return out


def ragged(seed, bx=7, by=5, lx=6, ly=4, d=8):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(bx, lx, d)).astype(np.float32)
  y = rng.normal(size=(by, ly, d)).astype(np.float32)
  xm = rng.random((bx, lx)) < 0.6
  ym = rng.random((by, ly)) < 0.6
  xm[:, 0] = True  # at least one valid token ...
  ym[:, 0] = True
  xm[min(3, bx - 1)] = False  # ... except one empty x item and one empty y item
  ym[min(1, by - 1)] = False
  x[~xm] = 1e3 * rng.normal(size=((~xm).sum(), d))  # garbage in padding must not matter
  return x, xm, y, ym


@pytest.mark.parametrize("direction", ["x2y", "y2x", "both"])
@pytest.mark.parametrize("chunk", [None, 3, (2, 4)])  # 3 and 4 do not divide 7 / 5
def test_matches_numpy_double_loop(direction, chunk):
  x, xm, y, ym = ragged(0)
  got = token_similarity(x, xm, y, ym, direction=direction, chunk=chunk)
  assert got.shape == (7, 5) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), numpy_reference(x, xm, y, ym, direction),
                             atol=2e-6)


def test_direction_names_follow_the_asking_side():
  # x has one token equal to y's first token and nothing else; y has an extra orthogonal token.
  # x2y: x's only token finds a perfect match -> 1. y2x: y's tokens average 1 and 0 -> 0.5.
  x = jnp.array([[[1.0, 0.0]]])
  y = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  mx, my = jnp.ones((1, 1), bool), jnp.ones((1, 2), bool)
  assert float(token_similarity(x, mx, y, my, direction="x2y")[0, 0]) == pytest.approx(1.0)
  assert float(token_similarity(x, mx, y, my, direction="y2x")[0, 0]) == pytest.approx(0.5)
  assert float(token_similarity(x, mx, y, my, direction="both")[0, 0]) == pytest.approx(0.75)


def test_invalid_tokens_never_win_a_max():
  # The masked-out y token is identical to x's token; the valid one is anti-aligned -> -1.
  x = jnp.array([[[1.0, 0.0]]])
  y = jnp.array([[[1.0, 0.0], [-1.0, 0.0]]])
  s = token_similarity(x, jnp.ones((1, 1), bool), y, jnp.array([[False, True]]))
  assert float(s[0, 0]) == pytest.approx(-1.0)


def test_gradients_match_finite_differences():
  x, xm, y, ym = ragged(1, bx=3, by=2, lx=3, ly=3, d=4)
  with jax.enable_x64(True):
    x64, y64 = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
    for chunk in (None, 2):
      f = lambda a, b: similarity.token_similarity(a, xm, b, ym, direction="both", chunk=chunk)
      assert f(x64, y64).dtype == jnp.float64
      check_grads(f, (x64, y64), order=1, modes=("rev",), eps=1e-6, atol=1e-5, rtol=1e-5)


def test_gradient_is_finite_with_zero_padding_and_tiling_agrees():
  x, xm, y, ym = ragged(2)
  x = np.where(xm[..., None], x, 0.0)  # all-zero padding vectors: x/(|x|+eps) would give NaN
  grads = [np.asarray(jax.jit(jax.grad(
      lambda a: similarity.token_similarity(a, xm, y, ym, chunk=c).sum()),
      compiler_options=FAST)(jnp.asarray(x))) for c in (None, (3, 2))]
  np.testing.assert_allclose(grads[0], grads[1], atol=1e-6)  # the tiled backward is the same
  gx = grads[1]
  assert np.isfinite(gx).all()
  assert np.abs(gx[3]).max() == 0.0  # the empty item gets no gradient
  assert np.abs(gx[~xm]).max() == 0.0  # nor do padding tokens
  assert np.abs(gx[xm]).max() > 0.0


def test_bf16_compute_is_close_to_fp32():
  x, xm, y, ym = ragged(4, d=64)
  f32 = token_similarity(x, xm, y, ym)
  b16 = token_similarity(jnp.asarray(x, jnp.bfloat16), xm, jnp.asarray(y, jnp.bfloat16), ym,
                         compute_dtype=jnp.bfloat16, chunk=3)
  assert b16.dtype == jnp.float32  # fp32 accumulation and output
  np.testing.assert_allclose(np.asarray(b16), np.asarray(f32), atol=2e-2)
  assert np.abs(np.asarray(b16) - np.asarray(f32)).max() > 0  # really took the bf16 path


def test_tiling_bounds_memory():
  """Compiled temp memory of a tiled call is far below one full [Bx,By,Lx,Ly] block."""
  x, m = jnp.ones((32, 40, 16)), jnp.ones((32, 40), bool)
  full_block = 32 * 32 * 40 * 40 * 4
  kernel = similarity.token_similarity  # default compiler options: what users get
  temp = lambda c: kernel.lower(x, m, x, m, chunk=c).compile().memory_analysis(
  ).temp_size_in_bytes
  assert temp(None) >= full_block  # the untiled kernel does hold the whole block
  assert temp(4) < full_block / 8  # tiles of 4x4 pairs: 1/64 of it (plus small buffers)
  grad_temp = jax.jit(jax.grad(lambda a: kernel(a, m, x, m, chunk=4).sum())).lower(
      x).compile().memory_analysis().temp_size_in_bytes
  assert grad_temp < full_block / 8  # the backward is tiled too (checkpointed tiles)


def test_clear_errors():
  x, m = jnp.ones((2, 3, 4)), jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match="direction"):
    token_similarity(x, m, x, m, direction="i2t")
  with pytest.raises(ValueError, match="widths"):
    token_similarity(x, m, jnp.ones((2, 3, 5)), m)
  with pytest.raises(ValueError, match="masks"):
    token_similarity(x, m[:, :2], x, m)
  with pytest.raises(ValueError, match="chunk"):
    token_similarity(x, m, x, m, chunk=0)


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    from jax.sharding import Mesh
    from gseps_jax.models.similarity import sharded_token_similarity
    data = np.load(sys.argv[1])
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    report = {"n_devices": jax.device_count()}
    for name, xa, ya, chunk in [("a_b", "a", "b", None), ("ab_rep", ("a", "b"), None, 3),
                                ("rep_b", None, "b", (1, 1))]:
      out = sharded_token_similarity(mesh, xa, ya, data["x"], data["xm"], data["y"], data["ym"],
                                     chunk=chunk)
      np.save(sys.argv[2] + name + ".npy", np.asarray(out))
      spec = [a if a is None or isinstance(a, str) else list(a) for a in out.sharding.spec]
      report[name] = {"spec": spec,
                      "shard_shape": list(out.addressable_shards[0].data.shape)}
    print(json.dumps(report))
""")


def test_sharded_on_8_fake_devices_matches_one_device(tmp_path):
  x, xm, y, ym = ragged(5, bx=16, by=8)
  np.savez(tmp_path / "in.npz", x=x, xm=xm, y=y, ym=ym)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path / "in.npz"),
                         str(tmp_path / "out_")], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["n_devices"] == 8
  assert report["a_b"] == {"spec": ["a", "b"], "shard_shape": [8, 2]}
  assert report["ab_rep"] == {"spec": [["a", "b"], None], "shard_shape": [2, 8]}
  assert report["rep_b"] == {"spec": [None, "b"], "shard_shape": [16, 2]}
  one_device = np.asarray(token_similarity(x, xm, y, ym))
  for name in ("a_b", "ab_rep", "rep_b"):
    np.testing.assert_allclose(np.load(tmp_path / f"out_{name}.npy"), one_device, atol=1e-6)
  np.testing.assert_allclose(one_device, numpy_reference(x, xm, y, ym, "both"), atol=2e-6)


def test_sharded_rejects_bad_axes():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("a",))
  with pytest.raises(ValueError, match="share mesh axes"):
    similarity.make_sharded_similarity(mesh, "a", "a")
  x, m = jnp.ones((2, 3, 4)), jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match="no axis"):
    similarity.sharded_token_similarity(mesh, "zz", None, x, m, x, m)


def test_multi_mask_kernel_equals_separate_calls():
  """`token_similarity_multi` (one cosine block, several masks; GRM eval) == one call per mask
  pair, including an item that is empty under one mask only, tiled and untiled."""
  from gseps_jax.models.similarity import token_similarity_multi
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(5, 7, 8)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(6, 4, 8)), jnp.float32)
  xm1 = jnp.asarray(rng.random((5, 7)) < 0.8).at[:, 0].set(True)
  xm2 = jnp.asarray(rng.random((5, 7)) < 0.5).at[2].set(False)
  ym1 = jnp.asarray(rng.random((6, 4)) < 0.9).at[:, 0].set(True)
  ym2 = jnp.asarray(rng.random((6, 4)) < 0.6).at[:, 1].set(True)
  for direction in ("both", "x2y", "y2x"):
    for chunk in (None, 2, (3, 4)):
      got = token_similarity_multi(x, [xm1, xm2], y, [ym1, ym2], direction=direction,
                                   chunk=chunk)
      assert got.shape == (2, 5, 6)
      for k, (xm, ym) in enumerate(((xm1, ym1), (xm2, ym2))):
        want = token_similarity(x, xm, y, ym, direction=direction, chunk=chunk)
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-6)


def test_multi_mask_kernel_with_weights_equals_separate_calls():
  """Token weights per mask pair (GRM training: ori unweighted, key weighted on both sides, unc
  weighted on y only) give the values AND gradients of one weighted call per pair."""
  from gseps_jax.models.similarity import token_similarity_multi
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(4, 6, 8)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(5, 7, 8)), jnp.float32)
  xm = [jnp.asarray(rng.random((4, 6)) < p).at[:, 0].set(True) for p in (1.0, 0.8, 0.5)]
  ym = [jnp.asarray(rng.random((5, 7)) < p).at[:, 0].set(True) for p in (0.9, 0.9, 0.7)]
  xw = [None, jnp.asarray(rng.random((4, 6)), jnp.float32), None]
  yw = [None, jnp.asarray(rng.random((5, 7)), jnp.float32),
        jnp.asarray(rng.random((5, 7)), jnp.float32)]
  probe = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)

  def fused(x, y, xw1, yw1, yw2):
    return similarity.token_similarity_multi(x, xm, y, ym, x_weights=(None, xw1, None),
                                  y_weights=(None, yw1, yw2), chunk=(3, 2))

  def separate(x, y, xw1, yw1, yw2):
    ws = ((None, None), (xw1, yw1), (None, yw2))
    return jnp.stack([similarity.token_similarity(x, xm[k], y, ym[k], x_weight=a, y_weight=b,
                                                  chunk=(3, 2))
                      for k, (a, b) in enumerate(ws)])

  args = (x, y, xw[1], yw[1], yw[2])
  fast = lambda f: jax.jit(f, compiler_options=FAST)
  np.testing.assert_allclose(fast(fused)(*args), fast(separate)(*args), rtol=1e-6, atol=1e-6)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(3.0 * f(*a)) * probe)
  g_fused = fast(jax.grad(loss(fused), argnums=tuple(range(5))))(*args)
  g_sep = fast(jax.grad(loss(separate), argnums=tuple(range(5))))(*args)
  for a, b in zip(g_fused, g_sep):
    assert float(jnp.max(jnp.abs(b))) > 0  # every input gets a gradient
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="one entry"):
    token_similarity_multi(x, xm, y, ym, x_weights=(None,))
  with pytest.raises(ValueError, match="shaped like its mask"):
    token_similarity_multi(x, xm, y, ym, y_weights=(None, None, jnp.ones((5, 6))))


@pytest.mark.parametrize("direction", ["x2y", "y2x", "both"])
@pytest.mark.parametrize("chunk,buckets", [((3, 2), 3), (None, 2), ((2, 4), 4), ((3, 2), (1, 3)),
                                           ((2, 4), (4, 1)), ((3, 3), (2, 5))])
def test_length_buckets_match_numpy_double_loop(direction, chunk, buckets):
  """Buckets (valid tokens packed first, items sorted by count, per-tile cut) change no score."""
  x, xm, y, ym = ragged(4, bx=9, by=11, lx=10, ly=7)
  rng = np.random.default_rng(9)
  xm &= rng.random(xm.shape) < 0.8  # scattered (non-prefix) x masks
  ym = np.arange(7)[None] < rng.integers(0, 8, size=11)[:, None]  # prefix masks, some empty
  got = token_similarity(x, xm, y, ym, direction=direction, chunk=chunk, buckets=buckets)
  np.testing.assert_allclose(np.asarray(got), numpy_reference(x, xm, y, ym, direction),
                             atol=2e-6)


def test_length_buckets_gradients_multi_and_errors():
  x, xm, y, ym = ragged(5)
  f = lambda bk: jax.grad(lambda x, y: jnp.sum(jnp.sin(similarity.token_similarity(
      x, xm, y, ym, chunk=(3, 2), buckets=bk))), (0, 1))(x, y)
  for a, b in zip(f(1), f(3)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  masks = ((xm, np.ones_like(xm)), (ym, ym))
  np.testing.assert_allclose(
      np.asarray(similarity.token_similarity_multi(x, masks[0], y, masks[1], chunk=2,
                                                   buckets=3)),
      np.asarray(similarity.token_similarity_multi(x, masks[0], y, masks[1], chunk=2)),
      atol=1e-6)
  assert similarity._bucket_lengths(197, 8) == (25, 50, 74, 99, 124, 148, 173, 197)  # pylint: disable=protected-access
  assert similarity._bucket_lengths(3, 8) == (1, 2, 3)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="buckets"):
    similarity.token_similarity(x, xm, y, ym, buckets=0)
  for bad in ((1, 0), (2,), (2, 2, 2), (2, 1.5), 2.0, "8"):
    with pytest.raises(ValueError, match=r"pair \(bx, by\)"):
      similarity.token_similarity(x, xm, y, ym, buckets=bad)


def test_per_side_buckets_compile_only_their_variants():
  """(1, b) buckets the y side only: b tile variants (one cosine einsum each) instead of b^2,
  with the same scores."""
  x, xm, y, ym = ragged(6, bx=8, by=12, lx=9, ly=8)
  ref = np.asarray(similarity.token_similarity(x, xm, y, ym, chunk=(4, 4)))

  def einsums(bk):
    ir = jax.jit(lambda *a: similarity.token_similarity(*a, chunk=(4, 4), buckets=bk)).lower(
        x, xm, y, ym).as_text()
    return ir.count("stablehlo.dot_general")

  for bk in ((1, 4), (4, 1), 4, (2, 3)):
    np.testing.assert_allclose(np.asarray(similarity.token_similarity(
        x, xm, y, ym, chunk=(4, 4), buckets=bk)), ref, atol=2e-6)
  # _bucket_lengths(9, 4) = (3, 5, 7, 9), _bucket_lengths(8, 4) = (2, 4, 6, 8), (8, 3) = (3, 6, 8)
  assert einsums(1) == 1
  assert einsums((1, 4)) == einsums((4, 1)) == 4
  assert einsums(4) == 16
  assert einsums((2, 3)) == 2 * 3


# ----------------------------------------------------------------------------- token weights


def numpy_weighted_reference(x, xm, xw, y, ym, yw):
  """float64 loops of the weighted kernel's definition ("both"): w-weighted mean over the
  asking side's tokens of the gated max w * (cos + 1) - 1 over the other side's tokens."""
  out = np.zeros((len(x), len(y)))
  for i in range(len(x)):
    for j in range(len(y)):
      if not xm[i].any() or not ym[j].any():
        continue
      a = x[i][xm[i]].astype(np.float64)
      b = y[j][ym[j]].astype(np.float64)
      wa, wb = xw[i][xm[i]].astype(np.float64), yw[j][ym[j]].astype(np.float64)
      a = a / np.linalg.norm(a, axis=1, keepdims=True)
      b = b / np.linalg.norm(b, axis=1, keepdims=True)
      cos = a @ b.T
      x2y = np.sum(wa * (wb[None, :] * (cos + 1) - 1).max(axis=1)) / wa.sum()
      y2x = np.sum(wb * (wa[:, None] * (cos + 1) - 1).max(axis=0)) / wb.sum()
      out[i, j] = 0.5 * (x2y + y2x)
  return out


def test_hard_weights_equal_the_boolean_kernel_on_kept_tokens_and_reach_dropped_tokens():
  """0/1 weights over the padding mask = the boolean kernel on the kept tokens (the forward of
  the straight-through keep mask), and the dropped tokens' weights still get a gradient."""
  x, xm, y, ym = ragged(5)
  rng = np.random.default_rng(5)
  xk, yk = xm & (rng.random(xm.shape) < 0.6), ym & (rng.random(ym.shape) < 0.6)
  xk[:, 0] &= xm[:, 0]
  xk[xm.any(1), 0], yk[ym.any(1), 0] = True, True
  for chunk, buckets in ((None, 1), (3, 1), ((2, 4), 2)):
    ref = token_similarity(x, xk, y, yk, chunk=chunk, buckets=buckets)
    got = token_similarity(x, xm, y, ym, x_weight=xk.astype(np.float32),
                           y_weight=yk.astype(np.float32), chunk=chunk, buckets=buckets)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6)
  g = jax.jit(jax.grad(lambda wx: similarity.token_similarity(
      x, xm, y, ym, x_weight=wx, y_weight=yk.astype(np.float32)).sum()),
      compiler_options=FAST)(jnp.asarray(xk, jnp.float32))
  g = np.asarray(g)
  dropped = xm & ~xk
  dropped[3] = False  # the empty x item gets nothing
  assert (np.abs(g[dropped]) > 0).all()  # every dropped valid token learns
  assert np.abs(g[~xm]).max() == 0.0  # padding never


def test_soft_weights_match_numpy_and_finite_differences():
  x, xm, y, ym = ragged(6, bx=3, by=4, lx=4, ly=3, d=5)
  rng = np.random.default_rng(6)
  xw, yw = rng.uniform(0.05, 1, xm.shape), rng.uniform(0.05, 1, ym.shape)
  got = token_similarity(x, xm, y, ym, x_weight=xw.astype(np.float32),
                         y_weight=yw.astype(np.float32), chunk=2)
  np.testing.assert_allclose(np.asarray(got), numpy_weighted_reference(x, xm, xw, y, ym, yw),
                             atol=2e-6)
  with jax.enable_x64(True):
    x64, y64 = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
    for chunk in (None, 2):
      f = lambda a, b, wa, wb: similarity.token_similarity(a, xm, b, ym, x_weight=wa,
                                                            y_weight=wb, chunk=chunk)
      check_grads(f, (x64, y64, jnp.asarray(xw), jnp.asarray(yw)), order=1, modes=("rev",),
                  eps=1e-6, atol=1e-5, rtol=1e-5)


def test_weights_must_match_their_mask():
  x, xm, y, ym = ragged(7)
  with pytest.raises(ValueError, match="x_weight must be shaped like its mask"):
    similarity.token_similarity(x, xm, y, ym, x_weight=np.ones((2, 2), np.float32))
