"""Smoke test of benchmarks/roofline.py's cost-analysis path at tiny sizes (no timing).

Checks that XLA's FLOP counts are positive and scale with the batch as the formulas say: the
pair-grid kernel is quadratic in the batch (every image x every caption), a train step of a tiny
model grows with the batch, and the official-loop FLOP formula matches a hand count.
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


@pytest.fixture(scope="module")
def tiny_train_costs():
  vision, text = roofline.reduced_encoders(width=32, layers=1, image_size=32, heads=2)
  text = dict(text, vocab_size=128, max_position_embeddings=32)
  out = {}
  for b in (4, 8):
    cfg = roofline.train_config("grm", vision, text, batch=b, cap_len=8, dense_len=8)
    cfg.model.embed_dim = 16
    cfg.model.grm.phi_width = 8
    cfg.model.grm.num_regions = 2
    out[b] = roofline.train_step_cost(cfg)
  return out


def test_train_step_flops_grow_with_batch(tiny_train_costs):
  c4, c8 = tiny_train_costs[4], tiny_train_costs[8]
  assert c4["flops"] > 0 and c4["params"] > 0
  # Encoders are linear in B, the in-batch kernel quadratic, the optimizer constant: the ratio
  # must lie strictly between "optimizer only" (1) and "kernel only" (4), and above linear-minus
  # the constant part.
  ratio = c8["flops"] / c4["flops"]
  assert 1.5 < ratio < 4.0, ratio


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
