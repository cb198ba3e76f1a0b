"""SEPS head and model vs the float64 NumPy reference (tests/seps_reference.py), official
checkpoint mapping, gradient modes. The head was also checked once against the authors' PyTorch
`CrossSparseAggrNet_v2` (max |diff| 1.3e-7, see docs/benchmarks.md)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import laps_vit, seps_swin, seps_vit
from gseps_jax.interop import official_seps
from gseps_jax.models import sdtps
from gseps_jax.models import seps
import seps_reference as ref

D = 16
N_C = 3


def _ref_params(aggr):
  f = lambda a: np.asarray(a, np.float64)
  return dict(ln_w=f(aggr["norm"]["scale"]), ln_b=f(aggr["norm"]["bias"]),
              w1=f(aggr["fc1"]["kernel"]).T, b1=f(aggr["fc1"]["bias"]),
              w2=f(aggr["fc2"]["kernel"]).T, b2=f(aggr["fc2"]["bias"]), scale=float(aggr["scale"]))


def _random_aggr(rng, d=D, n_c=N_C):
  h = int(d * 0.2)
  return {"aggr_net": {
      "norm": {"scale": 1 + 0.3 * rng.normal(size=d), "bias": 0.3 * rng.normal(size=d)},
      "fc1": {"kernel": rng.normal(size=(d, h)) / math.sqrt(d), "bias": 0.3 * rng.normal(size=h)},
      "fc2": {"kernel": rng.normal(size=(h, n_c)), "bias": 0.3 * rng.normal(size=n_c)},
      "scale": np.float64(1.7)}}


def _f32(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def _data(rng, ni, lv, nc, lt, nd, ld):
  img = rng.normal(size=(ni, lv, D))
  cap, den = rng.normal(size=(nc, lt, D)), rng.normal(size=(nd, ld, D))
  cl, dl = rng.integers(2, lt + 1, size=nc), rng.integers(2, ld + 1, size=nd)
  cl[0], dl[0] = lt, ld  # at least one full-length text
  return img, cap, cl, den, dl


def _mask(lens, length):
  return np.arange(length)[None] < np.asarray(lens)[:, None]


@functools.lru_cache(maxsize=None)
def _head_fn(mode, chunk, use_dense=True, selection="official", rho=0.5):
  head = seps.SEPSHead(num_aggregated=N_C, rho=rho, dense_mode=mode, use_dense=use_dense,
                       selection=selection)
  return head, jax.jit(functools.partial(head.apply, chunk=chunk))


@pytest.mark.parametrize("mode,lv,chunk", [
    # ViT-like (CLS + 4x4) and Swin-like (4x4, no CLS); non-dividing multi-tile grid
    ("parity", 17, (3, 4)), ("parity", 16, (3, 4)), ("honest", 17, (3, 4)),
    ("honest", 16, (3, 4)),
    ("parity", 17, None), ("honest", 16, 2)])  # one tile; square tiles
def test_head_matches_float64_reference(mode, lv, chunk):
  rng = np.random.default_rng(lv + len(mode))
  ni, nc = 5, 7
  img, cap, cl, den, dl = _data(rng, ni, lv, nc, 6, nc if mode == "parity" else ni, 9)
  params = _random_aggr(rng)
  _, fn = _head_fn(mode, chunk)
  got = fn({"params": _f32(params)}, _f32(img), _f32(cap), _mask(cl, 6), _f32(den), _mask(dl, 9))
  want = ref.seps_scores(img, cap, cl, den, dl, _ref_params(params["aggr_net"]), 0.5, mode=mode)
  assert got.shape == (ni, nc)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_modes_differ_and_sparse_only_matches_reference():
  """LAPS (sparse branch only) vs reference; honest and parity give different scores."""
  rng = np.random.default_rng(3)
  img, cap, cl, den, dl = _data(rng, 4, 17, 5, 6, 5, 9)
  params = _random_aggr(rng)
  _, fn = _head_fn("parity", 2, use_dense=False)
  got = fn({"params": _f32(params)}, _f32(img), _f32(cap), _mask(cl, 6))
  want = ref.seps_scores(img, cap, cl, None, None, _ref_params(params["aggr_net"]), 0.5,
                         mode="parity", use_dense=False)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  parity = ref.seps_scores(img, cap, cl, den, dl, _ref_params(params["aggr_net"]), 0.5,
                           mode="parity")
  honest = ref.seps_scores(img, cap, cl, den[:4], dl[:4], _ref_params(params["aggr_net"]), 0.5,
                           mode="honest")
  assert np.abs(parity - honest).max() > 1e-2


def _tied_image():
  """4 patches (square: no CLS) in 2 mirror pairs (x, y, +z) / (x, y, -z) with a zero-z mean:
  exact score ties inside each pair, distinct features. K = ceil(4 * 0.7) = 3 splits a pair."""
  base = np.array([[3.0, 1.0, 0.5], [1.0, 2.0, 0.7]])
  x = np.zeros((4, D))
  x[:, :3] = [base[0], base[0] * [1, 1, -1], base[1], base[1] * [1, 1, -1]]
  return x


def test_topk_ties_lower_index_first_and_fractional_k():
  x = _tied_image()
  text = np.zeros((2, D))
  text[:, 1] = 1.0
  rng = np.random.default_rng(0)
  params = _random_aggr(rng)
  head = seps.SEPSHead(num_aggregated=N_C, rho=0.7, use_dense=False)
  v = {"params": _f32(params)}
  img = head.apply(v, _f32(x[None]), method=head.prepare_images)
  txt = sdtps.prepare_texts(_f32(text[None]), np.ones((1, 2), bool))
  cos = jnp.einsum("ind,jd->ijn", img["xn"], txt["glo"])
  assert sdtps.num_kept(4, 0.7) == 3
  got = sdtps.sdtps_tokens(img, cos, k=3, selection="official", st_temperature=0.05)[0, 0]
  p = _ref_params(params["aggr_net"])
  want = ref.sdtps(x, text, p, 0.7, tie_break="low")
  other = ref.sdtps(x, text, p, 0.7, tie_break="high")
  assert np.abs(want - other).max() > 1e-2  # the tie is observable
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_counts_of_official_configs():
  assert [sdtps.num_aggregated(n, a, r) for n, a, r in
          [(196, 0.4, 0.5), (576, 0.4, 0.5), (49, 0.6, 0.8), (144, 0.6, 0.8)]] == [39, 115, 23, 69]
  got = [seps.SEPS.from_config(m.get_config(v).model).num_aggregated
         for m, v in [(seps_vit, None), (seps_vit, "384"), (seps_swin, None), (seps_swin, "384")]]
  assert got == [39, 115, 23, 69]
  assert sdtps.num_kept(196, 0.5) == 98 and sdtps.num_kept(49, 0.8) == 40
  assert sdtps.has_cls(197) and not sdtps.has_cls(49) and not sdtps.has_cls(144)
  assert sdtps.ratio_loss(98, 196, 0.5, 2, 2.0) == pytest.approx(0.5)
  assert not laps_vit.get_config().model.seps.use_dense


def _token_grads(selection, lv):
  rng = np.random.default_rng(1)
  img, cap, cl, den, dl = _data(rng, 3, lv, 3, 5, 3, 7)
  head = seps.SEPSHead(num_aggregated=N_C, rho=0.5, dense_mode="honest", selection=selection)
  v = {"params": _f32(_random_aggr(rng))}
  loss = lambda im: head.apply(v, im, _f32(cap), _mask(cl, 5), _f32(den), _mask(dl, 7)).sum()
  return np.asarray(jax.jit(jax.grad(loss))(_f32(img)))


def test_official_selection_blocks_patch_gradients():
  g = _token_grads("official", 17)
  assert np.all(g[:, 1:] == 0) and np.abs(g[:, 0]).max() > 0  # only the CLS path
  assert np.all(_token_grads("official", 16) == 0)  # Swin-like: no image gradient at all
  g = _token_grads("straight_through", 16)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_model_train_forward_and_selection_gradients():
  """Full tiny ViT model: [B, B] sims, the constant aux, and straight-through selection sends
  gradients into vision_proj beyond the official (CLS-only) ones."""
  c = seps_vit.get_config("tiny")
  c.model.vision.num_hidden_layers = c.model.text.num_hidden_layers = 1  # CPU time
  b, rng = 3, np.random.default_rng(0)
  batch = dict(
      image=jnp.asarray(rng.normal(size=(b, 64, 64, 3)), jnp.float32),
      input_ids=jnp.asarray(rng.integers(1, 99, (b, 6)), jnp.int32),
      attention_mask=jnp.asarray(_mask([6, 3, 4], 6)),
      dense_ids=jnp.asarray(rng.integers(1, 99, (b, 8)), jnp.int32),
      dense_mask=jnp.asarray(_mask([8, 5, 2], 8)), image_index=jnp.arange(b))
  grads = {}
  for sel in ("official", "straight_through"):
    c.model.seps.selection = sel
    m = seps.SEPS.from_config(c.model)
    params = m.init(jax.random.key(0), batch, train=False)["params"]

    def loss(p):
      sims, aux = m.apply({"params": p}, batch, train=False)
      return sims["seps"].sum(), (sims, aux)

    (_, (sims, aux)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    grads[sel] = np.asarray(g["vision_proj"]["kernel"])
  assert sims["seps"].shape == (b, b) and np.all(np.isfinite(sims["seps"]))
  assert float(aux["ratio_loss"]) == pytest.approx(2.0 * (2 * 8 / 16 - 0.5) ** 2)
  assert float(aux["keep_ratio"]) == pytest.approx(0.5)
  assert np.abs(grads["official"]).max() > 0  # CLS path
  assert np.abs(grads["straight_through"] - grads["official"]).max() > 1e-6


def test_score_parity_cut_and_caption_image():
  """score(): parity pairs caption j with dense[caption_image[j]] and cuts texts to
  eval_text_cut tokens; honest uses dense per image and no cut. Checked against the reference."""
  c = seps_vit.get_config("tiny")
  c.model.embed_dim = D
  c.model.seps.eval_text_cut = 4
  m = seps.SEPS.from_config(c.model)
  rng = np.random.default_rng(5)
  img, cap, cl, den, dl = _data(rng, 3, 17, 6, 6, 3, 9)
  params = _random_aggr(rng, n_c=m.num_aggregated)
  v = {"params": {"cross_net": _f32(params)}}
  feats = ({"tokens": _f32(img)}, {"tokens": _f32(cap), "mask": _mask(cl, 6)},
           {"tokens": _f32(den), "mask": _mask(dl, 9)})
  gt = np.array([0, 0, 1, 1, 2, 2])
  p = _ref_params(params["aggr_net"])
  got = m.apply(v, *feats, dense_mode="parity", caption_image=gt, chunk=2, method=m.score)
  want = ref.seps_scores(img, cap, np.minimum(cl, 4), den[gt], np.minimum(dl[gt], 4), p, 0.5,
                         mode="parity")
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  got = m.apply(v, *feats, dense_mode="honest", chunk=2, method=m.score)
  want = ref.seps_scores(img, cap, cl, den, dl, p, 0.5, mode="honest")
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="caption_image"):
    m.apply(v, *feats, dense_mode="parity", method=m.score)


@pytest.mark.parametrize("chunk,use_sparse", [((2, 3), True), (None, True), ((4, 2), False)])
def test_parity_dense_index_equals_repeated_dense_captions(chunk, use_sparse):
  """Scoring each distinct dense caption once (dense_index) == the official repeated layout."""
  rng = np.random.default_rng(11)
  ni, nc = 4, 9
  img, cap, cl, den, dl = _data(rng, ni, 17, nc, 6, ni, 9)
  gt = rng.integers(0, ni, size=nc)
  params = _f32(_random_aggr(rng))
  head = seps.SEPSHead(num_aggregated=N_C, rho=0.5, dense_mode="parity", use_sparse=use_sparse)
  f = lambda *a, **kw: head.apply({"params": params}, *a, chunk=chunk, **kw)
  args = (_f32(img), _f32(cap), _mask(cl, 6))
  repeated = f(*args, _f32(den)[gt], _mask(dl, 9)[gt])
  shared = f(*args, _f32(den), _mask(dl, 9), dense_index=jnp.asarray(gt))
  np.testing.assert_allclose(np.asarray(shared), np.asarray(repeated), atol=1e-6, rtol=0)
  want = ref.seps_scores(img, cap, cl, den[gt], dl[gt], _ref_params(params["aggr_net"]), 0.5,
                         mode="parity", use_sparse=use_sparse)
  np.testing.assert_allclose(np.asarray(shared), want, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="dense_index must be"):
    f(*args, _f32(den), _mask(dl, 9), dense_index=jnp.asarray(gt[:-1]))


@pytest.fixture(scope="module")
def tiny_official():
  c = seps_swin.get_config("tiny")
  m = seps.SEPS.from_config(c.model)
  batch = dict(image=jnp.zeros((1, 64, 64, 3)), input_ids=jnp.ones((1, 4), jnp.int32),
               attention_mask=jnp.ones((1, 4), bool), dense_ids=jnp.ones((1, 4), jnp.int32),
               dense_mask=jnp.ones((1, 4), bool))
  shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), batch, train=False))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  return c, params


def test_official_round_trip(tiny_official):
  c, params = tiny_official
  sd = official_seps.params_to_official(params, c)
  assert sd["cross_net.aggr_net.scale"].shape == (1, 1, 1)
  assert sd["cross_net.aggr_net.weight.1.weight"].shape == (6, 32)  # [int(0.2 D), D]
  assert sd["cross_net.aggr_net.weight.3.weight"].shape == (30, 6)  # [N_c, hidden]
  assert sd["img_enc.vision_proj.weight"].shape == (32, 64)  # torch [out, in]
  assert any(k.startswith("img_enc.visual_encoder.encoder.layers.1.") for k in sd)
  assert any(k.startswith("txt_enc.bert.encoder.layer.1.") for k in sd)
  back = official_seps.params_from_official(sd, c)
  flat = lambda t: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(t)}
  a, b = flat(params), flat(back)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k
  sd2 = official_seps.params_to_official(back, c)
  assert sd.keys() == sd2.keys() and all(np.array_equal(sd[k], sd2[k]) for k in sd)


def test_official_errors_list_every_name(tiny_official):
  c, params = tiny_official
  sd = official_seps.params_to_official(params, c)
  del sd["txt_enc.fc.bias"]
  del sd["img_enc.visual_encoder.layernorm.weight"]
  sd["cross_net.extra.weight"] = np.zeros(3)
  sd["cross_net.aggr_net.weight.3.weight"] = np.zeros((7, 6), np.float32)
  with pytest.raises(ValueError) as err:
    official_seps.params_from_official(sd, c)
  msg = str(err.value)
  for name in ("txt_enc.fc.bias", "img_enc.visual_encoder.layernorm.weight",
               "cross_net.extra.weight", "cross_net.aggr_net.weight.3.weight"):
    assert name in msg, (name, msg)
  bad = dict(params, cross_net={"aggr_net": dict(params["cross_net"]["aggr_net"], extra=0.0)})
  with pytest.raises(ValueError, match="cross_net/aggr_net/extra"):
    official_seps.params_to_official(bad, c)
