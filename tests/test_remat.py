"""`config.model.remat`: rematerialised encoder blocks keep the parameters and the numbers.

For tiny ViT / BERT / Swin encoders with dropout (and Swin's stochastic depth) active: the same
parameter tree for "none" / "blocks" / "dots", the same loss and gradients, and a `remat`
primitive in the gradient program only when asked for. Then the full models' trees, the
checkpoint fingerprint and the config check.
"""

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from gseps_jax.models import layers
from gseps_jax.models.encoders import encoder_from_config

MODES = ("none", "blocks", "dots")
# Dropout everywhere it exists, so the test sees that a recomputed block draws the same masks.
TINY = {
    "vit": dict(common.VIT_TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
    "bert": dict(common.BERT_TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
    # 32 px: an 8x8 map (plain and shifted 4x4 windows), then 4x4 (one window).
    "swin": dict(common.SWIN_TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 drop_path_rate=0.2),
}
# The name of jax.checkpoint's primitive in jaxprs: "remat2" in JAX 0.10 ("checkpoint" in some
# other versions).
REMAT_PRIMITIVES = ("remat2", "checkpoint", "remat")


def _inputs(name):
  rng = np.random.default_rng(0)
  if name == "bert":
    ids = jnp.asarray(rng.integers(0, 1000, size=(2, 8)), jnp.int32)
    mask = jnp.asarray(np.arange(8)[None] < np.array([[8], [5]]))
    return ids, mask
  size = 64 if name == "vit" else 32
  return (jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32),)


def _loss_fn(module, inputs):
  """params -> a scalar of the train-mode outputs (fixed dropout key and output weights)."""
  def loss(params):
    y = module.apply({"params": params}, *inputs, train=True,
                     rngs={"dropout": jax.random.key(7)})
    w = jax.random.normal(jax.random.key(3), y.shape[1:], jnp.float32)
    return jnp.mean(jnp.sin(y.astype(jnp.float32)) * w)
  return loss


def _has_remat(jaxpr) -> bool:
  """Whether `jaxpr` (a ClosedJaxpr or Jaxpr) or any jaxpr nested in it calls jax.checkpoint."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in REMAT_PRIMITIVES:
      return True
    for sub in jax_core.jaxprs_in_params(eqn.params):
      if _has_remat(sub):
        return True
  return False


def _flat_shapes(tree) -> dict[str, tuple]:
  """'/'-joined param path -> (shape, dtype) of a params (or ShapeDtypeStruct) tree."""
  return {"/".join(k.key for k in kp): (tuple(v.shape), v.dtype)
          for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_config_choices_agree_with_the_policies():
  assert common.REMAT_MODES == ("none", *layers.REMAT_POLICIES)
  assert common.base_config().model.remat == "none"


@pytest.fixture(scope="module", params=sorted(TINY))
def encoder_runs(request):
  """(name, {mode: (param tree (abstract), loss, grads, gradient jaxpr has remat)},
  (eval-mode sum, train-mode sum) of the outputs)."""
  name = request.param
  inputs = _inputs(name)
  params = encoder_from_config(TINY[name]).init(jax.random.key(0), *inputs)["params"]
  out = {}
  for mode in MODES:
    module = encoder_from_config(TINY[name], remat=mode)
    assert module.remat == mode
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    loss = _loss_fn(module, inputs)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    out[mode] = (shapes, value, grads, _has_remat(jaxpr))
  eval_loss = jax.jit(lambda p: encoder_from_config(TINY[name]).apply(
      {"params": p}, *inputs, train=False).sum())(params)
  train_loss = jax.jit(lambda p: encoder_from_config(TINY[name]).apply(
      {"params": p}, *inputs, train=True, rngs={"dropout": jax.random.key(7)}).sum())(params)
  return name, out, (eval_loss, train_loss)


def test_dropout_is_active_in_the_comparison(encoder_runs):
  _, _, (eval_loss, train_loss) = encoder_runs
  assert not np.isclose(float(eval_loss), float(train_loss), rtol=1e-4)


@pytest.mark.parametrize("mode", ["blocks", "dots"])
def test_same_param_tree(encoder_runs, mode):
  name, out, _ = encoder_runs
  tree, ref = out[mode][0], out["none"][0]
  assert jax.tree.structure(tree) == jax.tree.structure(ref)
  assert _flat_shapes(tree) == _flat_shapes(ref)
  # The HF names hf_import maps by (a lifted transform adds no level to the paths).
  block = {"vit": "encoder/layer_1/attention/attention/query/kernel",
           "bert": "encoder/layer_1/attention/self/query/kernel",
           "swin": "encoder/layers_1/blocks_1/attention/self/relative_position_bias_table"}[name]
  assert block in _flat_shapes(tree), sorted(_flat_shapes(tree))[:8]


@pytest.mark.parametrize("mode", ["blocks", "dots"])
def test_same_loss_and_gradients(encoder_runs, mode):
  _, out, _ = encoder_runs
  np.testing.assert_allclose(out[mode][1], out["none"][1], rtol=1e-5, atol=1e-6)
  flat, ref = jax.tree.leaves(out[mode][2]), jax.tree.leaves(out["none"][2])
  assert len(flat) == len(ref)
  for g, r in zip(flat, ref):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
  assert any(np.abs(r).max() > 0 for r in ref)


def test_remat_changes_the_gradient_program(encoder_runs):
  _, out, _ = encoder_runs
  assert not out["none"][3]
  assert out["blocks"][3] and out["dots"][3]


def test_unknown_remat_is_refused():
  with pytest.raises(ValueError, match="Unknown remat 'bogus'"):
    encoder_from_config(common.VIT_TINY, remat="bogus")


@pytest.mark.parametrize("family", ["grm_vit", "seps_vit"])
def test_full_model_param_tree_and_fingerprint_do_not_depend_on_remat(family):
  import importlib  # pylint: disable=g-import-not-at-top
  from gseps_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from gseps_jax import models  # pylint: disable=g-import-not-at-top
  from gseps_jax.interop import common as interop_common  # pylint: disable=g-import-not-at-top
  mod = importlib.import_module(f"configs.{family}")
  trees, prints = {}, {}
  for mode in ("none", "blocks"):
    c = mod.get_config("tiny")
    c.model.remat = mode
    model = models.build_model(c.model)
    trees[mode] = _flat_shapes(interop_common.abstract_params(c, model))
    prints[mode] = ckpt_lib.fingerprint(c)
  assert trees["blocks"] == trees["none"]
  assert any(p.startswith("vision_encoder/encoder/layer_1/") for p in trees["none"])
  assert prints["blocks"] == prints["none"]
  # A config saved before model.remat existed still builds (remat off).
  c = mod.get_config("tiny")
  del c.model["remat"]
  model = models.build_model(c.model)
  assert _flat_shapes(interop_common.abstract_params(c, model)) == trees["none"]


def test_validate_rejects_unknown_remat():
  from configs import grm_vit  # pylint: disable=g-import-not-at-top
  c = grm_vit.get_config("tiny")
  for mode in MODES:
    c.model.remat = mode
    common.validate(c)
  c.model.remat = "bogus"
  with pytest.raises(common.ConfigError, match=r"config\.model\.remat = 'bogus' is invalid"):
    common.validate(c)
