"""bfloat16 compute (`config.model.dtype = "bfloat16"`, issue #22).

Params stay float32; the encoders compute in bf16; the similarity kernel accumulates in float32;
the heads' logits, the scores and the losses are float32. Checked here:

* the bf16 model's params are float32 and its scores, aux losses and loss are float32;
* GRM and SEPS `:tiny`: the bf16 loss and gradients stay within stated tolerances of the float32
  ones for the same params, batch and rngs (hinge with hardest negatives and InfoNCE);
* the hinge and InfoNCE losses and their gradients stay finite, in bf16 and in float32, on
  near-duplicate batches (one image plus noise mostly below bf16's resolution, one caption: every
  negative scores about like the positive) and, for the losses alone, on exactly tied scores;
* the kernel's result on long token sets is within a tolerance of a float64 reference that a
  kernel accumulating in bf16 breaks (shown with the kernel's own tile at a bf16 accumulator);
* the saliency adapters' logits are float32 (a bf16 matmul would quantise them).

How close bf16 gradients can be. Both models make discrete choices: the max over tokens of the
kernel and of SEPS' HRPA, the hardest negative, SEPS' top-k, GRM's keep samples. bf16 moves the
token sets by ~0.5% (the encoders' rounding), which flips near-ties, and a flip moves a whole
gradient term from one token (or negative) to another. At `:tiny` scale (8 pairs, 17 image
tokens) a few flips make most of the bf16 gradient error, and the same error appears without
any bf16 at all: perturbing the float32 params by a relative 2^-9 (bf16's rounding) and
computing in float32 moves the gradients as much (median global relative error over 36 batches:
GRM 0.071 with bf16 and 0.071 with the perturbed params, SEPS 0.076 and 0.083; docs/scaling.md,
"bfloat16"). The gradient tolerances below are therefore loose, about twice the worst error
measured over those batches: they catch a wrong or missing gradient, not bf16 rounding. The GRM
loss tolerance and the kernel's are tight.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny

from configs import grm_vit, seps_vit
from gseps_jax import losses
from gseps_jax import models
from gseps_jax import state as state_lib
from gseps_jax.models import grm_heads
from gseps_jax.models import similarity

# Whole-model compiles dominate this file's time: XLA's cheap CPU code generation (same values).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BATCH = 8
LOG_TEMPERATURE = math.log(0.07)  # InfoNCE temperature, passed explicitly (no param needed)
KINDS = ("hinge", "infonce")

# ----------------------------------------------------------------------------- tolerances
# Measured bf16 vs float32 errors, as "test batch (seed 0) / median / worst" over 36 batches
# (seeds 0-35, same params; docs/scaling.md, "bfloat16"). Relative loss error |l16 - l32| / |l32|:
LOSS_TOL = {"grm": 1e-2, "seps": 1e-1}
#   grm:  hinge 6.2e-4 / 3.9e-4 / 4.8e-3, infonce 8.6e-4 / 4.3e-4 / 5.1e-3
#   seps: hinge 1.4e-3 / 2.3e-3 / 2.9e-2, infonce 7.9e-3 / 3.2e-3 / 4.6e-2 (top-k flips move the
#         forward value: the float32 control below moved it by up to 5.9e-2)
# Gradients, per leaf: ||g16 - g32|| / ||g32|| for every leaf with ||g32|| >= LEAF_MIN * G
# (G = the float32 gradient's global norm); the smaller leaves (e.g. attention key biases, whose
# true gradient is 0: softmax ignores them) must have ||g16 - g32|| <= SMALL_LEAF_TOL * G.
# Global: ||g16 - g32|| / G.
LEAF_MIN = 1e-2
LEAF_TOL = {"grm": 1.0, "seps": 1.5}
GLOBAL_TOL = {"grm": 0.5, "seps": 0.75}
SMALL_LEAF_TOL = 1e-2
#   grm:  largest leaf error hinge 0.04 / 0.11 / 0.35, infonce 0.03 / 0.09 / 0.43;
#         global hinge 0.035 / 0.071 / 0.23, infonce 0.025 / 0.057 / 0.20; small leaves <= 2.3e-3
#   seps: largest leaf error hinge 0.21 / 0.12 / 0.64, infonce 0.24 / 0.12 / 0.83;
#         global hinge 0.16 / 0.076 / 0.37, infonce 0.18 / 0.077 / 0.33; small leaves <= 4.1e-3
#   float32 control (float32 params x (1 + 2^-9 N(0, 1)), computed in float32), median / worst:
#         grm global 0.071 / 0.19, largest leaf 0.12 / 0.53; seps global 0.083 / 0.37, largest
#         leaf 0.14 / 0.54
# Kernel on long token sets vs float64 (test_kernel_accumulates_in_float32):
# measured 1.8e-5 / 2.3e-5 (bf16 inputs, float32 accumulation; 8e-6 .. 6e-5 on other draws);
# a bf16 accumulator: 3.0e-3 / 2.8e-3.
KERNEL_TOL = 3e-4


# ----------------------------------------------------------------------------- helpers


def _config(name, dtype, kind="hinge"):
  c = (grm_vit if name == "grm" else seps_vit).get_config("tiny")
  c.model.dtype = dtype
  c.data.dense_max_len = 24
  c.loss.kind = kind
  return c


def _batch(config, seed, near_duplicates=False, shared_ids=False):
  """A `state_lib.sample_batch` filled with random images and captions (`tiny.random_inputs`).

  near_duplicates: one image repeated with noise 1e-3 (mostly below bf16's resolution, 2^-8
    relative) and one caption repeated. shared_ids: every row shows the same image (all
    pairs masked out of the negatives); else each row is its own image.
  """
  rng = np.random.default_rng(seed)
  lengths = [int(n) for n in rng.integers(3, config.data.max_len + 1, BATCH)]
  images, (ids, mask), (dense_ids, dense_mask) = tiny.random_inputs(
      config, seed, BATCH, lengths, [config.data.dense_max_len] * BATCH)
  if near_duplicates:
    images = images[:1] + 1e-3 * rng.normal(size=images.shape).astype(np.float32)
    ids, mask = np.repeat(ids[:1], BATCH, 0), np.repeat(mask[:1], BATCH, 0)
    dense_ids, dense_mask = np.repeat(dense_ids[:1], BATCH, 0), np.repeat(dense_mask[:1], BATCH, 0)
  batch = state_lib.sample_batch(config, BATCH)
  batch.update(image=images, input_ids=ids, attention_mask=mask, dense_ids=dense_ids,
               dense_mask=dense_mask)
  if shared_ids:
    batch["image_index"] = np.zeros(BATCH, np.int32)
  return batch


@functools.lru_cache(maxsize=None)
def _program(name, dtype):
  """Jitted f(params, batch, rng) -> (losses [2], jacobian, sims, aux): the hinge with hardest
  negatives (after the warm-up) and InfoNCE of one training forward, and both gradients."""
  model = models.build_model(_config(name, dtype).model)
  cfgs = [_config(name, dtype, kind) for kind in KINDS]

  def f(params, batch, rng):
    def values(p):
      rngs = dict(zip(("dropout", "gumbel", "noise"), jax.random.split(rng, 3)))
      sims, aux = model.apply({"params": p}, batch, train=True, rngs=rngs)
      out = jnp.stack([losses.total_loss(sims, aux, batch, c, warmup=False,
                                         log_temperature=LOG_TEMPERATURE)[0] for c in cfgs])
      return out, (out, sims, aux)
    jac, (out, sims, aux) = jax.jacrev(values, has_aux=True)(params)
    return out, jac, sims, aux

  return jax.jit(f, compiler_options=FAST)


@functools.lru_cache(maxsize=None)
def _params(name):
  """float32 initial params of the `:tiny` model (the float32 model's init)."""
  c = _config(name, "float32")
  model = models.build_model(c.model)
  return jax.jit(lambda: model.init({"params": jax.random.key(0)}, _batch(c, 0),
                                    train=False)["params"], compiler_options=FAST)()


def run(name, dtype, seed=0, params=None, **batch_kw):
  """(losses [hinge, infonce], grads (two per leaf), sims, aux) of the `:tiny` model."""
  params = _params(name) if params is None else params
  batch = _batch(_config(name, dtype), seed, **batch_kw)
  return _program(name, dtype)(params, batch, jax.random.key(seed + 100))


def grad_errors(g32, g16):
  """(global relative error, {leaf path: relative error} of leaves >= LEAF_MIN * G, largest
  error of the smaller leaves / G) between two gradient trees."""
  leaves32 = jax.tree_util.tree_flatten_with_path(g32)[0]
  leaves16 = jax.tree.leaves(g16)
  norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64))) for _, a in leaves32)))
  big, small, total = {}, 0.0, 0.0
  for (path, a), b in zip(leaves32, leaves16):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.linalg.norm(b - a))
    total += err ** 2
    if np.linalg.norm(a) >= LEAF_MIN * norm:
      big[jax.tree_util.keystr(path)] = err / float(np.linalg.norm(a))
    else:
      small = max(small, err / norm)
  return math.sqrt(total) / norm, big, small


def kind_grads(jac, i):
  return jax.tree.map(lambda a: a[i], jac)


def _finite(tree):
  return all(bool(np.isfinite(np.asarray(a, np.float32)).all()) for a in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name", ["grm", "seps"])
def test_bf16_model_params_are_float32(name):
  c16, c32 = _config(name, "bfloat16"), _config(name, "float32")
  init = lambda c: jax.eval_shape(lambda: models.build_model(c.model).init(
      {"params": jax.random.key(0)}, _batch(c, 0), train=False)["params"])
  p16, p32 = init(c16), init(c32)
  assert jax.tree.structure(p16) == jax.tree.structure(p32)
  assert {a.dtype for a in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}


# ----------------------------------------------------------------------------- bf16 vs float32


@pytest.mark.parametrize("name", ["grm", "seps"])
def test_bf16_loss_and_gradients_close_to_float32(name):
  l32, jac32, s32, _ = run(name, "float32")
  l16, jac16, s16, aux16 = run(name, "bfloat16")
  # Scores, aux losses, losses and gradients of the bf16 model are float32.
  assert {s.dtype for s in s16.values()} == {jnp.dtype(jnp.float32)}
  assert all(a.dtype == jnp.float32 for a in aux16.values())
  assert l16.dtype == jnp.float32
  assert {a.dtype for a in jax.tree.leaves(jac16)} == {jnp.dtype(jnp.float32)}
  # bf16 really ran: the scores differ.
  assert max(float(jnp.max(jnp.abs(s16[k] - s32[k]))) for k in s32) > 0
  for i, kind in enumerate(KINDS):
    rel = abs(float(l16[i]) - float(l32[i])) / abs(float(l32[i]))
    assert rel <= LOSS_TOL[name], (kind, rel)
    total, big, small = grad_errors(kind_grads(jac32, i), kind_grads(jac16, i))
    worst = max(big, key=big.get)
    assert big[worst] <= LEAF_TOL[name], (kind, worst, big[worst])
    assert small <= SMALL_LEAF_TOL, (kind, small)
    assert total <= GLOBAL_TOL[name], (kind, total)


# ----------------------------------------------------------------------------- finiteness


@pytest.mark.parametrize("shared_ids", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", ["grm", "seps"])
def test_losses_finite_on_near_duplicate_batch(name, dtype, shared_ids):
  """One image (plus 1e-3 noise) and one caption in every row (rows differ by the noise, dropout
  and GRM's keep samples only). Distinct ids: every negative scores about like the positive
  (hardest-negative near-ties). Shared ids: every off-diagonal pair is masked out (InfoNCE rows
  with one finite logit, no hinge term left)."""
  out, jac, sims, aux = run(name, dtype, near_duplicates=True, shared_ids=shared_ids)
  assert _finite(out) and _finite(jac) and _finite(sims) and _finite(aux), (out, aux)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_losses_on_tied_scores_are_finite_float32(dtype):
  """The losses alone on exactly tied scores (bf16 rounds near-duplicates to ties), with and
  without shared-image masking: float32 values, finite gradients."""
  b = 6
  base = jnp.full((b, b), 0.7, jnp.float32).at[1, 2].set(0.70001)  # a tie in bf16 only
  for ids in (jnp.arange(b), jnp.zeros(b, jnp.int32), jnp.array([0, 0, 1, 1, 2, 2])):
    sims = base.astype(dtype)
    fns = {
        "hardest": lambda s: losses.vse_hinge(s, ids, margin=0.2, hardest=True),
        "all": lambda s: losses.vse_hinge(s, ids, margin=0.2, hardest=False),
        "infonce": lambda s: losses.infonce(s, ids, jnp.asarray(LOG_TEMPERATURE)),
        "infonce_t": lambda s: losses.infonce(s, ids, jnp.asarray(-20.0, dtype)),
    }
    for kind, fn in fns.items():
      value, grad = jax.value_and_grad(fn)(sims)
      assert value.dtype == jnp.float32 and grad.dtype == dtype, kind
      assert np.isfinite(float(value)) and _finite(grad), (kind, ids)
    # every score tied (bf16) and every row its own image: hinge = margin per query and direction
    if dtype == jnp.bfloat16 and len(set(ids.tolist())) == b:
      assert float(fns["hardest"](sims)) == pytest.approx(2 * b * 0.2, rel=1e-6)


# ----------------------------------------------------------------------------- kernel


def _reference(x, xm, y, ym):
  """float64 "both"-direction scores straight from the definition."""
  out = np.zeros((len(x), len(y)))
  for i in range(len(x)):
    for j in range(len(y)):
      a, b = x[i][xm[i]].astype(np.float64), y[j][ym[j]].astype(np.float64)
      a /= np.linalg.norm(a, axis=1, keepdims=True)
      b /= np.linalg.norm(b, axis=1, keepdims=True)
      cos = a @ b.T
      out[i, j] = 0.5 * (cos.max(1).mean() + cos.max(0).mean())
  return out


@pytest.mark.parametrize("length,width", [(512, 64), (1024, 32)])
def test_kernel_accumulates_in_float32(length, width):
  """Long token sets, scores ~0.5: with bf16 inputs and float32 accumulation the kernel stays
  within KERNEL_TOL of float64; the same tile accumulating in bf16 (its cosines and means
  rounded to bf16: errors up to 2^-9 at 0.5) does not."""
  rng = np.random.default_rng(length)
  x = (rng.normal(size=(2, length, width)) + 0.5).astype(np.float32)  # common part: cos ~0.2
  y = (rng.normal(size=(2, length, width)) + 0.5).astype(np.float32)
  xm, ym = np.ones((2, length), bool), np.ones((2, length), bool)
  xm[0, length // 2:] = False
  ref = _reference(x, xm, y, ym)
  got = similarity.token_similarity(jnp.asarray(x, jnp.bfloat16), xm, jnp.asarray(y, jnp.bfloat16),
                                    ym, compute_dtype=jnp.bfloat16, chunk=1)
  assert got.dtype == jnp.float32
  err = np.abs(np.asarray(got, np.float64) - ref).max()
  assert 0 < err <= KERNEL_TOL, err
  # The tolerance is one a bf16 accumulator breaks: the kernel's tile with acc_dtype=bf16.
  xn = similarity.l2_normalize(jnp.asarray(x)).astype(jnp.bfloat16)
  yn = similarity.l2_normalize(jnp.asarray(y)).astype(jnp.bfloat16)
  tile = similarity._tile_scores  # pylint: disable=protected-access
  bad = tile(xn, (jnp.asarray(xm),), yn, (jnp.asarray(ym),), direction="both", precision=None,
             acc_dtype=jnp.bfloat16)[0]
  assert np.abs(np.asarray(bad, np.float64) - ref).max() > 3 * KERNEL_TOL


# ----------------------------------------------------------------------------- GRM adapters


def test_saliency_adapter_logits_are_float32():
  """bf16 adapters compute their two logits in float32: with a large common logit offset (which
  log_softmax ignores and nothing in training pins), bf16 logits would be rounded to steps of
  0.5 and the keep probability with them."""
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.normal(size=(2, 9, 32)), jnp.float32)
  valid = jnp.ones((2, 9), bool)
  params = grm_heads.SaliencyAdapter().init(jax.random.key(0), tokens, valid,
                                            train=False)["params"]
  params = jax.tree.map(lambda a: a, params)  # a mutable copy
  params["fc2"]["bias"] = jnp.asarray([100.0, 100.0])  # logits ~100: bf16 spacing 0.5
  prob = {dt: grm_heads.SaliencyAdapter(dtype=dt).apply({"params": params}, tokens, valid,
                                                        train=False)["prob"]
          for dt in (jnp.float32, jnp.bfloat16)}
  assert prob[jnp.bfloat16].dtype == jnp.float32
  # Measured 1.0e-3 (the bf16 hidden layer); with bf16 logits 0.12 (logit steps of 0.5).
  np.testing.assert_allclose(np.asarray(prob[jnp.bfloat16]), np.asarray(prob[jnp.float32]),
                             atol=1e-2)


def test_aux_losses_reduce_in_float32():
  """GRM's auxiliary losses cast bf16 inputs up before their reductions: equal to the float32
  losses of the same (bf16-valued) inputs."""
  rng = np.random.default_rng(1)
  bf = lambda *s: jnp.asarray(rng.normal(size=s), jnp.bfloat16)
  means, tokens, logvar = bf(4, 3, 64), bf(4, 256, 64), bf(4, 3, 64)
  keep = jnp.asarray(rng.random((4, 256)) < 0.5)
  attn = jax.nn.softmax(bf(4, 256, 3).astype(jnp.float32), axis=1).astype(jnp.bfloat16)
  up = lambda a: a.astype(jnp.float32)
  pairs = [(losses.recon_loss(means, tokens, keep), losses.recon_loss(up(means), up(tokens), keep)),
           (losses.kl_loss(logvar), losses.kl_loss(up(logvar))),
           (losses.entropy_loss(attn), losses.entropy_loss(up(attn))),
           (losses.entropy_floor_loss(attn, 5.0), losses.entropy_floor_loss(up(attn), 5.0))]
  for got, want in pairs:
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
