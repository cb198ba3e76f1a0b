"""GRM heads against NumPy re-derivations, the uncertainty sampler by Monte Carlo, and `:tiny`
training steps."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

import tiny

from configs import grm_swin, grm_vit
from gseps_jax import losses
from gseps_jax.models import encoders
from gseps_jax.models import grm as grm_lib
from gseps_jax.models import grm_heads
from gseps_jax.models.similarity import token_similarity

# Whole-model compiles dominate this file's time; XLA's cheap CPU backend settings halve them
# (the numbers computed are the same, only code generation is less optimised).
fast_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


# ----------------------------------------------------------------------------- saliency adapter


def numpy_keep_logit(params, tokens):
  """LayerNorm (eps 1e-6) -> Dense -> exact GELU -> Dense -> logp0 - logp1, in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(tokens, np.float64)
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  x = x * p["norm"]["scale"] + p["norm"]["bias"]
  h = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  z = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  return z[..., 0] - z[..., 1]  # the log-softmax difference equals the logit difference


@pytest.fixture(scope="module")
def adapter():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.normal(size=(5, 7, 16)), jnp.float32)
  valid = np.ones((5, 7), bool)
  valid[1, 4:] = False
  valid[2, 1:] = False
  valid[4] = False  # an all-padding item
  sa = grm_heads.SaliencyAdapter(tau=0.7, hard=True)
  params = fast_jit(lambda: sa.init(jax.random.key(0), tokens, valid, train=False)["params"])()
  apply = fast_jit(functools.partial(sa.apply, train=False))
  apply_train = fast_jit(lambda p, t, v, k: sa.apply({"params": p}, t, v, train=True,
                                                    rngs={"gumbel": k}))
  return dict(sa=sa, tokens=tokens, valid=jnp.asarray(valid), params=params, apply=apply,
              apply_train=apply_train)


def test_adapter_eval_is_argmax_without_noise(adapter):
  out = adapter["apply"]({"params": adapter["params"]}, adapter["tokens"], adapter["valid"])
  logit = numpy_keep_logit(adapter["params"], adapter["tokens"])
  valid = np.asarray(adapter["valid"])
  expected = (logit >= 0) & valid
  for b in range(5):  # the force-keep rule, by hand
    if valid[b].any() and not expected[b].any():
      expected[b, np.argmax(np.where(valid[b], logit[b], -np.inf))] = True
  np.testing.assert_array_equal(np.asarray(out["keep"]), expected)
  np.testing.assert_array_equal(np.asarray(out["mask"]), expected.astype(np.float32))
  np.testing.assert_allclose(np.asarray(out["prob"]), 1 / (1 + np.exp(-logit)), atol=1e-5)


def _drop_everything(params):
  """fc2 biases that make every token's keep logit very negative."""
  params = flax.core.unfreeze(jax.tree.map(lambda a: a, params))
  params["fc2"]["bias"] = jnp.array([-50.0, 50.0])
  return params


@pytest.mark.parametrize("train", [False, True])
def test_adapter_keeps_one_token_and_never_padding(adapter, train):
  params = _drop_everything(adapter["params"])
  tokens, valid = adapter["tokens"], adapter["valid"]
  if train:
    out = adapter["apply_train"](params, tokens, valid, jax.random.key(3))
  else:
    out = adapter["apply"]({"params": params}, tokens, valid)
  keep = np.asarray(out["keep"])
  assert not (keep & ~np.asarray(valid)).any()
  np.testing.assert_array_equal(keep.sum(-1), [1, 1, 1, 1, 0])  # item 4 has no valid token
  logit = numpy_keep_logit(params, tokens)
  forced = np.argmax(np.where(np.asarray(valid), logit, -np.inf), axis=-1)
  np.testing.assert_array_equal(np.argmax(keep[:4], -1), forced[:4])
  assert (np.asarray(out["mask"])[~np.asarray(valid)] == 0).all()


def test_adapter_training_straight_through(adapter):
  tokens, valid = adapter["tokens"], adapter["valid"]
  w = jax.random.normal(jax.random.key(1), valid.shape)

  def f(p, key):
    out = adapter["sa"].apply({"params": p}, tokens, valid, train=True, rngs={"gumbel": key})
    return jnp.sum(out["mask"] * w), out

  (_, out), g = fast_jit(jax.value_and_grad(f, has_aux=True))(adapter["params"],
                                                              jax.random.key(2))
  mask = np.asarray(out["mask"])
  np.testing.assert_allclose(mask, np.asarray(out["keep"], np.float32), atol=1e-6)  # hard fwd
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) > 1e-4  # soft backward
  # Gumbel noise: two keys give different decisions somewhere (eval never does).
  keeps = [np.asarray(adapter["apply_train"](adapter["params"], tokens, valid,
                                             jax.random.key(k))["keep"]) for k in range(4)]
  assert any((keeps[0] != k).any() for k in keeps[1:])


def test_soft_path_padding_is_never_present(adapter):
  sa = grm_heads.SaliencyAdapter(tau=0.7, hard=False)
  out = fast_jit(lambda p, k: sa.apply({"params": p}, adapter["tokens"], adapter["valid"],
                                       train=True, rngs={"gumbel": k}))(adapter["params"],
                                                                         jax.random.key(4))
  mask, valid = np.asarray(out["mask"]), np.asarray(adapter["valid"])
  assert (mask[~valid] == 0).all() and (mask[valid] > 0).all() and (mask[valid] < 1).all()


def _adapter_kernel_loss(hard):
  """InfoNCE of the key level alone on random image/caption tokens, as a function of the SA and
  GA parameters: the path by which the adapters learn (tokens weighted, not scaled)."""
  rng = np.random.default_rng(7)
  b, li, lt, d = 3, 5, 4, 8
  v = rng.normal(size=(b, li, d))
  t = rng.normal(size=(b, lt, d))
  valid_i = np.ones((b, li), bool)
  valid_t = np.arange(lt)[None, :] < np.array([[4], [2], [3]])
  sa = grm_heads.SaliencyAdapter(tau=1.0, hard=hard, dtype=jnp.float64)

  def loss(params, key):
    ki, kt = jax.random.split(key)
    wi = sa.apply({"params": params["sa"]}, v, valid_i, train=True, rngs={"gumbel": ki})["mask"]
    wt = sa.apply({"params": params["ga"]}, t, valid_t, train=True, rngs={"gumbel": kt})["mask"]
    s = token_similarity(v, valid_i, t, valid_t, x_weight=wi, y_weight=wt) / 0.1
    # InfoNCE written out in float64 (losses.infonce computes in float32)
    return -0.5 * jnp.mean(jnp.diagonal(jax.nn.log_softmax(s, axis=0))
                           + jnp.diagonal(jax.nn.log_softmax(s, axis=1)))

  init = lambda k, x, m: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                      sa.init(k, x, m, train=False)["params"])
  params = {"sa": init(jax.random.key(1), v, valid_i), "ga": init(jax.random.key(2), t, valid_t)}
  return loss, params


def test_adapter_gradients_through_the_kernel_match_finite_differences():
  """Soft path (hard=False), float64: d loss / d (SA, GA params) = central differences."""
  with jax.enable_x64(True):
    loss, params = _adapter_kernel_loss(hard=False)
    key = jax.random.key(3)
    g = jax.grad(loss)(params, key)
    for name in ("sa", "ga"):
      assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g[name])) > 1e-4, name
    rng = np.random.default_rng(8)
    for _ in range(3):  # random directions in the joint parameter space
      u = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
      eps = 1e-5
      shift = lambda s: jax.tree.map(lambda a, du: a + s * eps * du, params, u)
      fd = (loss(shift(1.0), key) - loss(shift(-1.0), key)) / (2 * eps)
      an = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(u)))
      np.testing.assert_allclose(float(an), float(fd), rtol=1e-5, atol=1e-8)
    # The hard straight-through path learns too (the forward is the 0/1 mask).
    loss_h, params_h = _adapter_kernel_loss(hard=True)
    g_h = jax.grad(loss_h)(params_h, key)
    for name in ("sa", "ga"):
      assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_h[name])) > 1e-4, name


def test_keep_penalty_and_ratio_by_hand():
  mask = jnp.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  valid = jnp.array([[True, True, True, True], [True, True, False, False],
                     [False, False, False, False]])
  # item ratios 0.5 and 1.0 (the third, empty item counts 0); target 0.5
  assert float(losses.keep_penalty(mask, valid, 0.5)) == pytest.approx((0 + 0.25 + 0) / 3)
  assert float(losses.keep_ratio(mask, valid)) == pytest.approx(4 / 6)  # padding not counted


# ----------------------------------------------------------------------------- regions


def test_region_prompts_match_numpy():
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
  keep = jnp.asarray(rng.random((2, 6)) < 0.7).at[:, 0].set(True)
  for kwargs in (dict(), dict(normalize_tokens=True, learn_scale=True, init_scale=5.0)):
    mod = grm_heads.RegionPrompts(num_regions=3, **kwargs)
    params = fast_jit(lambda: mod.init(jax.random.key(0), tokens, keep)["params"])()
    attn, means, stats = fast_jit(mod.apply)({"params": params}, tokens, keep)
    p = np.asarray(params["prompts"], np.float64)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    v = np.asarray(tokens, np.float64)
    if kwargs:
      v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    scale = kwargs.get("init_scale", 1.0)
    a = 1 / (1 + np.exp(-scale * v @ p.T)) * np.asarray(keep)[..., None]
    a_hat = a / a.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(attn), a_hat, atol=1e-5)
    np.testing.assert_allclose(np.asarray(means),
                               np.einsum("blk,bld->bkd", a_hat, np.asarray(tokens)), atol=1e-5)
    ent = -(a_hat * np.log(np.where(a_hat > 0, a_hat, 1))).sum(1).mean()
    assert float(stats["region_entropy"]) == pytest.approx(ent, rel=1e-4)
    mu = np.einsum("blk,bld->bkd", a_hat, np.asarray(tokens))
    mu = mu / np.linalg.norm(mu, axis=-1, keepdims=True)
    cos = [mu[b, i] @ mu[b, j] for b in range(2) for i in range(3) for j in range(3) if i != j]
    assert float(stats["region_mean_cos"]) == pytest.approx(np.mean(cos), rel=1e-4)
    cols = a_hat / np.linalg.norm(a_hat, axis=1, keepdims=True)  # the maps, per column
    cos = [cols[b, :, i] @ cols[b, :, j] for b in range(2) for i in range(3) for j in range(3)
           if i != j]
    assert float(stats["region_cos"]) == pytest.approx(np.mean(cos), rel=1e-4)


def test_region_overlap_is_one_for_equal_maps_and_zero_for_disjoint_ones():
  same = jnp.full((1, 4, 3), 0.25)
  disjoint = jnp.asarray(np.eye(4)[None, :, :3])
  assert float(grm_heads.map_overlap(same)) == pytest.approx(1.0, abs=1e-6)
  assert float(grm_heads.map_overlap(disjoint)) == pytest.approx(0.0, abs=1e-6)


def test_orthogonal_prompts_start_orthonormal_and_too_many_are_refused():
  tokens, keep = jnp.ones((1, 3, 8)), jnp.ones((1, 3), bool)
  mod = grm_heads.RegionPrompts(num_regions=5, prompt_init="orthogonal")
  p = np.asarray(mod.init(jax.random.key(0), tokens, keep)["params"]["prompts"], np.float64)
  np.testing.assert_allclose(p @ p.T, np.eye(5), atol=1e-5)
  with pytest.raises(ValueError, match="num_regions <= embed_dim"):
    grm_heads.RegionPrompts(num_regions=9, prompt_init="orthogonal").init(
        jax.random.key(0), tokens, keep)


def test_cheap_sampler_matches_per_token_form_in_distribution():
  """Mean and covariance of u_k agree by Monte Carlo (n = 20,000 draws each).

  Both are Gaussian with mean mu_k and covariance sigma_k^2 ||Â[:, k]||^2 I (the per-token form
  because each column of Â sums to 1). With n draws a variance estimate has a standard error of
  about var * sqrt(2 / n) = 1% of var, a mean one of sqrt(var / n); tolerances are 5 of those.
  """
  rng = np.random.default_rng(2)
  a = rng.random((1, 6, 2)) ** 3  # uneven columns: ||Â[:, k]|| well above 1/sqrt(L)
  attn = jnp.asarray(a / a.sum(1, keepdims=True), jnp.float32)
  means = jnp.asarray(rng.normal(size=(1, 2, 3)), jnp.float32)
  logvar = jnp.asarray(np.log([[[0.5, 1.0, 2.0], [1.5, 0.3, 1.0]]]), jnp.float32)
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  draw = lambda f: np.asarray(fast_jit(jax.vmap(lambda k: f(means, logvar, attn, k)[0]))(keys),
                              np.float64)  # [n, K, D]
  cheap = draw(grm_heads.sample_regions)
  per_token = draw(grm_heads.sample_regions_per_token)
  var = np.exp(np.asarray(logvar[0], np.float64)) * (np.asarray(attn[0]) ** 2).sum(0)[:, None]
  for u in (cheap, per_token):
    np.testing.assert_allclose(u.mean(0), means[0], atol=5 * np.sqrt(var.max() / n))
    for k in range(2):
      cov = np.cov(u[:, k].T)  # [D, D]
      np.testing.assert_allclose(np.diag(cov), var[k], rtol=5 * np.sqrt(2 / n))
      off = cov - np.diag(np.diag(cov))
      assert np.abs(off).max() < 5 * var[k].max() * np.sqrt(1 / n)
  for k in range(2):  # and directly against each other
    np.testing.assert_allclose(np.diag(np.cov(cheap[:, k].T)), np.diag(np.cov(per_token[:, k].T)),
                               rtol=10 * np.sqrt(2 / n))


def test_uncertainty_eval_is_the_mean_and_logvar_is_clipped():
  mu = 100.0 * jax.random.normal(jax.random.key(0), (2, 3, 8))
  attn = jnp.full((2, 4, 3), 0.25)
  mod = grm_heads.RegionUncertainty(hidden=8, logvar_min=-1.0, logvar_max=0.5)
  params = fast_jit(lambda: mod.init(jax.random.key(1), mu, attn, train=False)["params"])()
  u, logvar = fast_jit(functools.partial(mod.apply, train=False))({"params": params}, mu, attn)
  np.testing.assert_array_equal(np.asarray(u), np.asarray(mu))
  assert float(logvar.min()) >= -1.0 and float(logvar.max()) <= 0.5
  assert float(logvar.min()) == -1.0 and float(logvar.max()) == 0.5  # large inputs hit the clip
  u_train, _ = fast_jit(lambda p: mod.apply({"params": p}, mu, attn, train=True,
                                            rngs={"noise": jax.random.key(2)}))(params)
  assert float(jnp.abs(u_train - mu).max()) > 0


# ----------------------------------------------------------------------------- full model


def tiny_config(name="grm_vit", arg="tiny"):
  """`:tiny` with one layer per tower and 32-px images, to keep compile time low on CPU."""
  config = {"grm_vit": grm_vit, "grm_swin": grm_swin}[name].get_config(arg)
  config.model.vision.num_hidden_layers = 1
  config.model.text.num_hidden_layers = 1
  config.model.vision.image_size = config.data.image_size = 32
  return config


def tiny_batch(b=4, length=8, image_size=32):
  lengths = jnp.array([8, 5, 3, 6, 2, 7, 4, 8])[:b]
  return dict(image=jax.random.normal(jax.random.key(0), (b, image_size, image_size, 3)),
              input_ids=jax.random.randint(jax.random.key(1), (b, length), 1, 1000),
              attention_mask=jnp.arange(length)[None, :] < lengths[:, None],
              image_index=jnp.arange(b))


@pytest.fixture(scope="module")
def tiny_grm():
  config = tiny_config()
  model = grm_lib.GRM.from_config(config.model)
  batch = tiny_batch()
  rngs = {k: jax.random.key(i) for i, k in enumerate(("params", "dropout", "gumbel", "noise"))}
  params = fast_jit(lambda: model.init(rngs, batch, train=False)["params"])()
  return config, model, batch, params


def test_grm_eval_score_equals_weighted_training_forward(tiny_grm):
  config, model, batch, params = tiny_grm

  @fast_jit
  def run(p):
    sims, aux = model.apply({"params": p}, batch, train=False)
    img = model.apply({"params": p}, batch["image"], method=grm_lib.GRM.encode_images)
    txt = model.apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                      method=grm_lib.GRM.encode_texts)
    score = model.apply({"params": p}, img, txt, chunk=3, method=grm_lib.GRM.score)
    return sims, aux, img, txt, score

  sims, aux, img, txt, score = run(params)
  assert set(sims) == {"ori", "key", "unc"} and all(s.shape == (4, 4) for s in sims.values())
  assert set(aux) == {"recon", "kl", "ent", "div", "keep", "keep_ratio_img", "keep_ratio_txt",
                      "region_entropy", "region_cos", "region_mean_cos"}
  assert all(a.shape == () and np.isfinite(float(a)) for a in aux.values())
  w = config.model.grm.level_weights
  np.testing.assert_allclose(np.asarray(score),
                             np.asarray(sum(w[k] * sims[k] for k in grm_lib.LEVELS)), atol=1e-5)
  assert img["ori"].shape == (4, 5, 32) and img["unc"].shape == (4, 4, 32)  # 1 + (32/16)^2
  assert txt["ori"].shape == (4, 8, 32)
  assert not np.asarray(txt["key_mask"] & ~batch["attention_mask"]).any()


def test_fused_levels_equal_one_kernel_call_per_level(tiny_grm):
  """`GRM._level_sims` scores ori, key and unc from one cosine block ([V ; U] on the image
  side, masks widened): values and gradients equal one `token_similarity` call per level,
  with the training weights (key: both sides, unc: words only)."""
  from gseps_jax.models.similarity import token_similarity
  _, model, _, params = tiny_grm
  rng = np.random.default_rng(3)
  v = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
  u = jnp.asarray(rng.normal(size=(3, 2, 16)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(4, 6, 16)), jnp.float32)
  vm = jnp.ones((3, 5), bool)
  tm = jnp.arange(6)[None] < jnp.array([6, 3, 1, 4])[:, None]
  um = jnp.ones((3, 2), bool)
  w_img = jnp.asarray(rng.integers(0, 2, (3, 5)), jnp.float32).at[:, 0].set(1.0)
  w_txt = jnp.asarray(rng.integers(0, 2, (4, 6)), jnp.float32).at[:, 0].set(1.0)
  probe = jnp.asarray(rng.normal(size=(3, 3, 4)), jnp.float32)

  def fused(v, u, t, w_img, w_txt):
    specs = {"ori": ("v", vm, None, tm, None), "key": ("v", vm, w_img, tm, w_txt),
             "unc": ("u", um, None, tm, w_txt)}
    out = model.apply({"params": params}, specs, v, u, t, chunk=2,
                      method=grm_lib.GRM._level_sims)  # pylint: disable=protected-access
    return jnp.stack([out[k] for k in ("ori", "key", "unc")])

  def separate(v, u, t, w_img, w_txt):
    return jnp.stack([token_similarity(v, vm, t, tm),
                      token_similarity(v, vm, t, tm, x_weight=w_img, y_weight=w_txt),
                      token_similarity(u, um, t, tm, y_weight=w_txt)])

  args = (v, u, t, w_img, w_txt)
  np.testing.assert_allclose(fused(*args), separate(*args), rtol=1e-6, atol=1e-6)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(3.0 * f(*a)) * probe)
  for a, b in zip(jax.grad(loss(fused), argnums=tuple(range(5)))(*args),
                  jax.grad(loss(separate), argnums=tuple(range(5)))(*args)):
    assert float(jnp.max(jnp.abs(b))) > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_grm_tiny_training_lowers_the_loss(tiny_grm):
  config, model, batch, params = tiny_grm
  tx = optax.adam(1e-3)

  def loss_fn(p, key):
    rngs = dict(zip(("dropout", "gumbel", "noise"), jax.random.split(key, 3)))
    sims, aux = model.apply({"params": p}, batch, train=True, rngs=rngs)
    return losses.total_loss(sims, aux, batch, config, warmup=True, warmup_scale=1.0)

  @fast_jit
  def step(p, opt, key):
    (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p, key)
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt, loss, g

  opt = tx.init(params)
  p, history = params, []
  for i in range(6):
    p, opt, loss, g = step(p, opt, jax.random.key(100 + i))
    history.append(float(loss))
    if i == 0:  # every head receives a gradient (SA and GA through the key level's weights)
      for name in ("sa", "ga", "regions", "uncertainty", "vision_proj", "text_proj",
                   "text_encoder"):
        assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g[name])) > 0, name
  assert all(np.isfinite(history))
  assert np.mean(history[-3:]) < 0.8 * np.mean(history[:2]), history


def test_grm_freeze_text_stops_text_encoder_gradients(tiny_grm):
  config, _, batch, params = tiny_grm
  grads = {}
  for freeze in (False, True):
    cfg = config.model.copy_and_resolve_references()
    cfg.freeze_text = freeze
    model = grm_lib.GRM.from_config(cfg)
    f = lambda p: model.apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                              method=grm_lib.GRM.encode_texts)["ori"].sum()
    grads[freeze] = fast_jit(jax.grad(f))(params)
  top = lambda g: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g))
  assert top(grads[False]["text_encoder"]) > 0.0
  assert top(grads[True]["text_encoder"]) == 0.0
  assert top(grads[True]["text_proj"]) > 0.0


@pytest.mark.parametrize("name,arg,model_type,size,tokens,regions", [
    ("grm_vit", None, "vit", 224, 197, 5), ("grm_vit", "384", "vit", 384, 577, 5),
    ("grm_swin", None, "swin", 224, 49, 50), ("grm_swin", "384", "swin", 384, 144, 50),
    ("grm_vit", "tiny", "vit", 64, 17, 4), ("grm_swin", "tiny,tau=0.5", "swin", 64, 64, 4)])
def test_configs(name, arg, model_type, size, tokens, regions):
  config = {"grm_vit": grm_vit, "grm_swin": grm_swin}[name].get_config(arg)
  assert config.model.name == "grm" and config.model.vision.model_type == model_type
  assert config.model.vision.image_size == config.data.image_size == size
  assert encoders.encoder_num_tokens(config.model.vision) == tokens
  assert config.model.grm.num_regions == regions
  assert dict(config.model.grm.level_weights) == {"ori": 0.4, "key": 0.4, "unc": 0.2}
  if arg and "tau=0.5" in arg:
    assert config.model.grm.tau == 0.5
  with pytest.raises(KeyError, match="Unknown GRM"):
    grm_vit.get_config("tiny,no_such_field=1")


# ----------------------------------------------------------------------------- rescoring


def test_checkpoint_restores_under_other_level_weights_but_not_other_regions(tmp_path):
  """Level weights (and the other scoring/loss-only fields) are not in the fingerprint."""
  from gseps_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  trained = grm_vit.get_config("tiny")
  ck, abstract = tiny.fingerprinted_checkpoint(tmp_path, trained)
  rescore = grm_vit.get_config("tiny")
  rescore.model.grm.level_weights = dict(ori=1.0, key=0.0, unc=0.0)
  rescore.model.grm.eval_buckets = 1
  assert ck.restore(abstract, rescore)[1]["step"] == 1
  other = grm_vit.get_config("tiny,num_regions=3")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="model.grm"):
    ck.restore(abstract, other)
  # A fingerprint saved before the scoring fields were left out still matches.
  old = ckpt_lib.fingerprint(trained)
  old["model.grm"] = dict(old["model.grm"], level_weights=dict(ori=0.4, key=0.4, unc=0.2))
  ckpt_lib.check_fingerprint(old, rescore, "old")


def test_evaluation_keep_ratios():
  from gseps_jax import evaluator  # pylint: disable=g-import-not-at-top
  img = {"ori_mask": np.ones((2, 4), bool),
         "key_mask": np.array([[1, 0, 0, 0], [1, 1, 1, 0]], bool)}
  txt = {"ori_mask": np.array([[1, 1, 0], [1, 1, 1]], bool),
         "key_mask": np.array([[1, 0, 1], [0, 1, 1]], bool)}  # padding never counts
  assert evaluator.keep_ratios(img, txt) == {"keep_ratio_img": 4 / 8, "keep_ratio_txt": 3 / 5}
  assert evaluator.keep_ratios({"tokens": 0}, {"tokens": 0}) == {}


def test_level_weights_choose_the_levels_computed(tiny_grm):
  """A level of weight 0 is not computed; one level alone = that level's kernel score."""
  config, _, batch, params = tiny_grm

  def scores(weights):
    cfg = config.model.copy_and_resolve_references()
    cfg.grm.level_weights = weights
    model = grm_lib.GRM.from_config(cfg)
    img = model.apply({"params": params}, batch["image"], method=grm_lib.GRM.encode_images)
    txt = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      method=grm_lib.GRM.encode_texts)
    levels = model.apply({"params": params}, img, txt, method=grm_lib.GRM.level_scores)
    return model.apply({"params": params}, img, txt, method=grm_lib.GRM.score), levels

  for level in grm_lib.LEVELS:
    alone, levels = fast_jit(lambda: scores({k: float(k == level) for k in grm_lib.LEVELS}))()
    np.testing.assert_allclose(np.asarray(alone), np.asarray(levels[level]), atol=1e-6)


def test_eval_buckets_int_buckets_captions_only(tiny_grm):
  """An int `eval_buckets` buckets the captions only (GRM's image tokens are all valid under the
  union of its level masks): b tile variants per kernel call instead of b^2, the same scores
  as no buckets and as a pair; a bad value is refused naming the field."""
  config, _, batch, params = tiny_grm

  def run(buckets):
    cfg = config.model.copy_and_resolve_references()
    if isinstance(buckets, int):
      cfg.grm.eval_buckets = buckets
      model = grm_lib.GRM.from_config(cfg)
    else:  # a pair (a config file can set one; the int field refuses one on override)
      model = grm_lib.GRM.from_config(cfg).clone(eval_buckets=buckets)
    img = model.apply({"params": params}, batch["image"], method=grm_lib.GRM.encode_images)
    txt = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      method=grm_lib.GRM.encode_texts)
    f = jax.jit(lambda i, t: model.apply({"params": params}, i, t, chunk=2,
                                         method=grm_lib.GRM.score))
    return np.asarray(f(img, txt)), f.lower(img, txt).as_text().count("stablehlo.dot_general")

  ref, _ = run(1)
  by_int, dots_int = run(3)
  by_pair, dots_pair = run((3, 3))
  np.testing.assert_allclose(by_int, ref, atol=1e-6)
  np.testing.assert_allclose(by_pair, ref, atol=1e-6)
  # 8 caption tokens in 3 buckets: (3, 6, 8); the image side 1 variant (int) or 3 (pair); two
  # kernel calls (V with ori + key, U with unc), each one einsum per variant, plus the model's
  # own dot_generals (the same in both).
  assert dots_pair - dots_int == 2 * (9 - 3)
  with pytest.raises(ValueError, match="model.grm.eval_buckets"):
    run(0)


def test_ablation_switches_remove_components(tiny_grm):
  config, _, batch, _ = tiny_grm
  cfg = config.model.copy_and_resolve_references()
  cfg.grm.use_sa = cfg.grm.use_ga = cfg.grm.use_regions = False
  model = grm_lib.GRM.from_config(cfg)
  rngs = {k: jax.random.key(i) for i, k in enumerate(("params", "dropout", "gumbel", "noise"))}

  @fast_jit
  def run():
    params = model.init(rngs, batch, train=False)["params"]
    sims, aux = model.apply({"params": params}, batch, train=True, rngs=rngs)
    return params, sims, aux

  params, sims, aux = run()
  assert not {"sa", "ga", "regions", "uncertainty"} & set(params)
  assert set(sims) == {"ori", "key"}  # no unc level without region prompts
  assert float(aux["keep_ratio_img"]) == 1.0 and float(aux["keep_ratio_txt"]) == 1.0
  assert float(aux["keep"]) == 0.0 and float(aux["div"]) == 0.0
  # keep everything: the key level is the ori level
  np.testing.assert_allclose(np.asarray(sims["key"]), np.asarray(sims["ori"]), atol=1e-6)
