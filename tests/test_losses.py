"""Losses against hand-computed values and a NumPy InfoNCE."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gseps_jax import losses

# Rows = images, columns = captions, positives on the diagonal (0.9, 0.8, 0.4).
SIMS = jnp.array([[0.90, 0.50, 0.10],
                  [0.30, 0.80, 0.75],
                  [0.35, 0.60, 0.40]])
# Violations relu(0.2 + s_neg - s_pos), computed by hand:
#   image queries (rows):      row 1: caption 2 -> 0.15; row 2: caption 0 -> 0.15, caption 1 -> 0.40
#   caption queries (columns): column 2: image 1 -> 0.55; everything else <= 0
# hardest: 0.15 + 0.40 + 0.55 = 1.10; all negatives: 0.15 + 0.15 + 0.40 + 0.55 = 1.25.
IDS = jnp.array([0, 1, 2])
# Images 1 and 2 the same picture: (1,2) and (2,1) are no negatives; what is left is row 2's
# caption 0 (0.15), in both modes.
SHARED_IDS = jnp.array([0, 1, 1])
HINGE_CFG = ml_collections.ConfigDict(dict(kind="hinge", margin=0.2))


@pytest.mark.parametrize("ids,hardest,expected", [
    (IDS, True, 1.10), (IDS, False, 1.25), (SHARED_IDS, True, 0.15), (SHARED_IDS, False, 0.15)])
def test_vse_hinge_by_hand(ids, hardest, expected):
  got = losses.vse_hinge(SIMS, ids, margin=0.2, hardest=hardest)
  assert float(got) == pytest.approx(expected, abs=1e-6)


def test_hinge_is_summed_not_averaged():
  # Two copies of the 3x3 case on the diagonal, cross-block scores far below: twice the loss.
  big = jnp.full((6, 6), -5.0).at[:3, :3].set(SIMS).at[3:, 3:].set(SIMS)
  ids = jnp.arange(6)
  assert float(losses.vse_hinge(big, ids, margin=0.2, hardest=True)) == pytest.approx(2.2)


def test_hinge_with_warmup_static_and_traced():
  warm = losses.hinge_with_warmup(SIMS, IDS, margin=0.2, warmup=True, warmup_scale=0.5)
  hard = losses.hinge_with_warmup(SIMS, IDS, margin=0.2, warmup=False, warmup_scale=0.5)
  assert float(warm) == pytest.approx(0.625) and float(hard) == pytest.approx(1.10)
  f = jax.jit(lambda w, s: losses.hinge_with_warmup(SIMS, IDS, margin=0.2, warmup=w,
                                                    warmup_scale=s))
  assert float(f(jnp.array(True), jnp.array(0.5))) == pytest.approx(0.625)
  assert float(f(jnp.array(False), jnp.array(0.5))) == pytest.approx(1.10)


def numpy_infonce(s, ids, t):
  s = np.asarray(s, np.float64) / t
  n = len(s)
  rows, cols = [], []
  for i in range(n):
    neg = [j for j in range(n) if j == i or ids[j] != ids[i]]
    rows.append(np.log(np.exp(s[i, neg]).sum()) - s[i, i])
    cols.append(np.log(np.exp(s[neg, i]).sum()) - s[i, i])
  return 0.5 * (np.mean(rows) + np.mean(cols))


def test_infonce_by_hand_and_numpy():
  two = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  # Each row and column: log(e^1 + e^0) - 1 = log(1 + e^-1).
  got = losses.infonce(two, jnp.arange(2), jnp.log(1.0))
  assert float(got) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
  s = np.random.default_rng(0).normal(size=(5, 5))
  ids = np.array([0, 1, 1, 2, 3])
  got = losses.infonce(jnp.asarray(s, jnp.float32), jnp.asarray(ids), jnp.log(0.1))
  assert float(got) == pytest.approx(numpy_infonce(s, ids, 0.1), rel=1e-5)


def test_aux_losses_by_hand():
  means = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])  # mean over regions: (0.5, 0.5)
  tokens = jnp.array([[[2.0, 0.0], [9.0, 9.0], [0.0, 4.0]]])
  keep = jnp.array([[True, False, True]])  # kept mean (1, 2)
  expected = 1 - 1.5 / (math.sqrt(0.5) * math.sqrt(5))
  assert float(losses.recon_loss(means, tokens, keep)) == pytest.approx(expected, rel=1e-5)
  assert float(losses.kl_loss(jnp.zeros((2, 3, 4)))) == pytest.approx(0.0)
  assert float(losses.kl_loss(jnp.full((1, 1, 2), math.log(2.0)))) == pytest.approx(
      0.5 * (2 - math.log(2) - 1), rel=1e-6)
  uniform_and_onehot = jnp.array([[[0.25, 1.0], [0.25, 0.0], [0.25, 0.0], [0.25, 0.0]]])
  np.testing.assert_allclose(losses.column_entropy(uniform_and_onehot), [[math.log(4), 0.0]],
                             atol=1e-6)
  assert float(losses.entropy_loss(uniform_and_onehot)) == pytest.approx(-math.log(4) / 2,
                                                                         rel=1e-6)


def test_entropy_floor_only_stops_collapse_onto_one_patch():
  # columns: uniform over 4 (entropy log 4), one-hot (0), half/half (log 2)
  attn = jnp.array([[[0.25, 1.0, 0.5], [0.25, 0.0, 0.5], [0.25, 0.0, 0.0], [0.25, 0.0, 0.0]]])
  floor = 1.0
  expected = (0.0 + 1.0 + (1.0 - math.log(2))) / 3  # a spread column costs nothing
  assert float(losses.entropy_floor_loss(attn, floor)) == pytest.approx(expected, rel=1e-5)
  assert float(losses.entropy_floor_loss(attn, None)) == pytest.approx(
      float(losses.entropy_loss(attn)))
  # the gradient never pushes a column that is above the floor towards uniform
  g = jax.grad(lambda a: losses.entropy_floor_loss(a, floor))(attn)
  assert float(jnp.abs(g[..., 0]).max()) == 0.0


def test_weighted_recon_mean_and_grm_weight_fields():
  means = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  tokens = jnp.array([[[2.0, 0.0], [9.0, 9.0], [0.0, 4.0]]])
  weights = jnp.array([[1.0, 0.0, 1.0]])
  assert float(losses.recon_loss(means, tokens, weights)) == pytest.approx(
      float(losses.recon_loss(means, tokens, weights > 0)), rel=1e-6)
  head = dict(aux_weights=dict(recon=0.1), keep_ratio_weight=2.0, region_div_weight=0.5)
  assert losses.head_aux_weights(head) == {"recon": 0.1, "keep": 2.0, "div": 0.5}
  config = ml_collections.ConfigDict(dict(
      loss=dict(kind="hinge", margin=0.2), model=dict(name="grm", grm=dict(
          level_weights=dict(ori=1.0), aux_weights=dict(recon=0.0), keep_ratio_weight=2.0))))
  aux = {"recon": jnp.array(5.0), "keep": jnp.array(0.25)}
  loss, _ = losses.total_loss({"ori": SIMS}, aux, {"image_index": IDS}, config)
  assert float(loss) == pytest.approx(1.10 + 2.0 * 0.25, rel=1e-6)


def test_total_loss_combines_levels_and_weighted_aux():
  sims = {"ori": SIMS, "key": SIMS.T}
  aux = {"recon": jnp.array(2.0), "kl": jnp.array(3.0), "keep_ratio_img": jnp.array(0.5)}
  batch = {"image_index": IDS}
  loss, metrics = losses.total_loss(sims, aux, batch, HINGE_CFG,
                                    level_weights={"ori": 0.4, "key": 0.6},
                                    aux_weights={"recon": 0.1, "kl": 0.01})
  l_key = float(losses.vse_hinge(SIMS.T, IDS, margin=0.2, hardest=True))
  assert float(loss) == pytest.approx(0.4 * 1.10 + 0.6 * l_key + 0.2 + 0.03, rel=1e-6)
  assert float(metrics["loss_ori"]) == pytest.approx(1.10)
  assert float(metrics["keep_ratio_img"]) == 0.5  # reported, not added
  assert float(metrics["loss"]) == pytest.approx(float(loss))


def test_total_loss_seps_style_and_warmup():
  loss, metrics = losses.total_loss({"seps": SIMS}, {"ratio_loss": jnp.array(7.0)},
                                    {"image_index": IDS}, HINGE_CFG, warmup=True,
                                    warmup_scale=0.5)
  assert float(loss) == pytest.approx(0.625)  # the ratio term is a metric only
  assert float(metrics["ratio_loss"]) == 7.0


def test_total_loss_from_full_config_with_model_temperature():
  config = ml_collections.ConfigDict(dict(
      loss=dict(kind="infonce", margin=0.2),
      model=dict(name="grm", grm=dict(level_weights=dict(ori=1.0), aux_weights=dict(kl=0.5)))))
  params = {"log_temperature": jnp.log(0.1), "other": jnp.ones(3)}
  loss, metrics = losses.total_loss({"ori": SIMS}, {"kl": jnp.array(1.0)},
                                    {"image_index": IDS}, config, params=params)
  expected = numpy_infonce(np.asarray(SIMS), np.asarray(IDS), 0.1) + 0.5
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["temperature"]) == pytest.approx(0.1)


def test_total_loss_clear_errors():
  batch = {"image_index": IDS}
  with pytest.raises(ValueError, match="no level weight"):
    losses.total_loss({"ori": SIMS, "unc": SIMS}, {}, batch, HINGE_CFG,
                      level_weights={"ori": 1.0})
  with pytest.raises(ValueError, match="not produced"):
    losses.total_loss({"ori": SIMS}, {}, batch, HINGE_CFG, aux_weights={"recon": 1.0})
  with pytest.raises(ValueError, match="log_temperature"):
    losses.total_loss({"ori": SIMS}, {}, batch, dict(kind="infonce", margin=0.2))
  with pytest.raises(ValueError, match="square"):
    losses.vse_hinge(SIMS[:2], IDS)
