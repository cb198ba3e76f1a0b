"""Shared layers: exact GELU against PyTorch, the hashed dropout mask's statistics and sharding."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gseps_jax.models import layers


def test_gelu_matches_torch_exact_gelu():
  x = np.linspace(-12, 12, 20001, dtype=np.float32)
  ours = np.asarray(jax.jit(layers.gelu)(jnp.asarray(x)))
  ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
  np.testing.assert_allclose(ours, np.asarray(jax.nn.gelu(x, approximate=False)), atol=1e-6)
  # The derivative too (the train step differentiates it): d/dx = Phi(x) + x phi(x).
  g = np.asarray(jax.vmap(jax.grad(layers.gelu))(jnp.asarray(x)))
  t = torch.from_numpy(x).requires_grad_()
  torch.nn.functional.gelu(t).sum().backward()
  np.testing.assert_allclose(g, t.grad.numpy(), atol=2e-6)


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1])
def test_keep_mask_rate_and_independence(keep):
  n = 1 << 20
  m = np.asarray(jax.jit(lambda k: layers.keep_mask(k, keep, (n,)))(jax.random.key(3)))
  sigma = np.sqrt(keep * (1 - keep) / n)
  assert abs(m.mean() - keep) < 5 * sigma, m.mean()
  # Neighbouring positions are uncorrelated (the hash is of the flat position).
  a, b = m[:-1].astype(np.float64), m[1:].astype(np.float64)
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(n)
  # A different key gives an independent mask; the same key the same mask.
  m2 = np.asarray(layers.keep_mask(jax.random.key(4), keep, (n,)))
  assert abs(np.corrcoef(m.astype(np.float64), m2.astype(np.float64))[0, 1]) < 5 / np.sqrt(n)
  np.testing.assert_array_equal(m, np.asarray(layers.keep_mask(jax.random.key(3), keep, (n,))))


def test_keep_mask_shape_edges_and_errors():
  k = jax.random.key(0)
  assert layers.keep_mask(k, 0.7, (4, 5, 6)).shape == (4, 5, 6)
  assert bool(jnp.all(layers.keep_mask(k, 1.0, (100,))))
  assert not bool(jnp.any(layers.keep_mask(k, 0.0, (100,))))
  # Mask of a [4, 5, 6] array == the flat mask reshaped (positions are row-major).
  np.testing.assert_array_equal(np.asarray(layers.keep_mask(k, 0.5, (4, 5, 6))),
                                np.asarray(layers.keep_mask(k, 0.5, (120,))).reshape(4, 5, 6))
  with pytest.raises(ValueError, match="keep_prob"):
    layers.keep_mask(k, 1.5, (3,))


def test_dropout_values_gradient_and_module():
  x = jax.random.normal(jax.random.key(1), (64, 33))
  rng = jax.random.key(7)
  y = layers.dropout(x, 0.25, rng)
  keep = np.asarray(layers.keep_mask(rng, 0.75, x.shape))
  np.testing.assert_allclose(np.asarray(y), np.where(keep, np.asarray(x) / 0.75, 0.0), rtol=1e-6)
  g = jax.grad(lambda x: layers.dropout(x, 0.25, rng).sum())(x)
  np.testing.assert_allclose(np.asarray(g), keep / 0.75, rtol=1e-6)
  assert layers.dropout(x, 0.25, None) is x and layers.dropout(x, 0.0, rng) is x
  mod = layers.Dropout(0.25)
  np.testing.assert_array_equal(np.asarray(mod.apply({}, x, deterministic=True)), np.asarray(x))
  out = mod.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  frac = float(jnp.mean(out == 0))
  assert 0.15 < frac < 0.35, frac


_SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gseps_jax.models import layers
assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
x = jnp.ones((16, 12, 10))
f = lambda x, k: layers.dropout(x, 0.3, k)
one = np.asarray(jax.jit(f)(x, jax.random.key(5)))
xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
many = jax.jit(f, out_shardings=NamedSharding(mesh, P("data", "model")))(xs, jax.random.key(5))
assert len(many.sharding.device_set) == 8
np.testing.assert_array_equal(np.asarray(many), one)
print("OK")
"""


def test_mask_is_the_same_sharded_over_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, env=env,
                        timeout=300, check=False)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
