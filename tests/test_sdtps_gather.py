"""The kept-patch gather of the SEPS scorer (`sdtps.pair_scores(gather_kept=...)`): the same
scores and gradients as the masked softmax over all patches, and against the float64
reference; the switch refuses what it cannot do."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gseps_jax.models import sdtps
from gseps_jax.models import seps
import seps_reference as ref
from test_seps import N_C, _data, _f32, _mask, _random_aggr, _ref_params


def _head(mode, rho, gather, use_sparse=True):
  return seps.SEPSHead(num_aggregated=N_C, rho=rho, dense_mode=mode, use_sparse=use_sparse,
                       gather_kept=gather)


@pytest.mark.parametrize("mode,lv,rho,chunk", [
    ("parity", 17, 0.5, (2, 3)),   # ViT-like: CLS + 16 patches, K = 8, multi-tile grid
    ("honest", 16, 0.7, None),     # Swin-like: no CLS, K = ceil(11.2) = 12, one tile
    ("parity", 10, 1.0, 3),        # 9 patches all kept: no fused token (zero), K = N
])
def test_gather_equals_all_patches_and_reference(mode, lv, rho, chunk):
  rng = np.random.default_rng(lv)
  ni, nc = 4, 6
  img, cap, cl, den, dl = _data(rng, ni, lv, nc, 6, nc if mode == "parity" else ni, 9)
  params = _random_aggr(rng)
  args = (_f32(img), _f32(cap), _mask(cl, 6), _f32(den), _mask(dl, 9))
  out = {}
  for g in ("on", "off"):
    out[g] = np.asarray(jax.jit(functools.partial(_head(mode, rho, g).apply, chunk=chunk))(
        {"params": _f32(params)}, *args))
  # The evaluation path's loop batching (4 captions per iteration; tiles of 3 or 6 captions,
  # so a remainder too) gives the same scores.
  batched = np.asarray(jax.jit(functools.partial(
      _head(mode, rho, "on").apply, chunk=chunk, gather_batch=sdtps.EVAL_GATHER_BATCH))(
          {"params": _f32(params)}, *args))
  np.testing.assert_allclose(batched, out["on"], atol=1e-6, rtol=0)
  np.testing.assert_allclose(out["on"], out["off"], atol=2e-6, rtol=0)
  want = ref.seps_scores(img, cap, cl, den, dl, _ref_params(params["aggr_net"]), rho, mode=mode)
  np.testing.assert_allclose(out["on"], want, atol=1e-5, rtol=0)


def test_gather_gradients_equal():
  """Official selection: gradients w.r.t. the aggregation net, the caption words and the image
  tokens (CLS path) are the same with and without the gather (the gather's transpose is a
  scatter-add onto the kept rows)."""
  rng = np.random.default_rng(5)
  img, cap, cl, den, dl = _data(rng, 3, 17, 5, 6, 5, 9)
  params = _f32(_random_aggr(rng))

  def grads(g):
    head = _head("parity", 0.5, g)
    loss = lambda p, im, c: jnp.sum(jnp.sin(3.0 * head.apply(
        {"params": p}, im, c, _mask(cl, 6), _f32(den), _mask(dl, 9), chunk=(2, 2))))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, _f32(img), _f32(cap))

  on, off = grads("on"), grads("off")
  flat_on, flat_off = jax.tree.leaves(on), jax.tree.leaves(off)
  assert len(flat_on) == len(flat_off)
  for a, b in zip(flat_on, flat_off):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
  assert np.abs(np.asarray(on[0]["aggr_net"]["fc2"]["kernel"])).max() > 0
  assert np.abs(np.asarray(on[2])).max() > 0


def test_gather_switch():
  assert sdtps.gather_kept_default("on", "official")
  assert not sdtps.gather_kept_default("off", "official")
  assert sdtps.gather_kept_default("auto", "official") == (jax.default_backend() == "cpu")
  assert not sdtps.gather_kept_default("auto", "straight_through")
  with pytest.raises(ValueError, match="needs selection='official'"):
    sdtps.gather_kept_default("on", "straight_through")
  with pytest.raises(ValueError, match="gather_kept must be one of"):
    sdtps.gather_kept_default("yes", "official")
  rng = np.random.default_rng(0)
  img, cap, cl, den, dl = _data(rng, 2, 17, 2, 6, 2, 9)
  bad = seps.SEPSHead(num_aggregated=N_C, rho=0.5, selection="straight_through",
                      gather_kept="on")
  with pytest.raises(ValueError, match="needs selection='official'"):
    bad.init(jax.random.PRNGKey(0), _f32(img), _f32(cap), _mask(cl, 6), _f32(den),
             _mask(dl, 9))
