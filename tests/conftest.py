"""Shared test setup: one persistent XLA compilation cache for the whole run (also used by the
subprocesses the tests start), and small configs/datasets built once per session. Nothing here
or in any test reads outside the repository (tests/test_fixtures.py checks it)."""

import os
import pathlib
import tempfile

_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gseps_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests are compile-bound on 2 cores: XLA's cheap CPU settings roughly halve compile time.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_XLA).strip()

REPO = pathlib.Path(__file__).resolve().parents[1]


# -- fixtures shared by the data tests (test_data_pipeline.py, test_device_augment.py) ----------
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

SYN = dict(num_train=24, num_dev=4, num_test=7, image_size=32, seed=1)


@pytest.fixture(scope="session")
def tok():
  """The installed all-MiniLM-L6-v2 tokenizer (read only)."""
  from gseps_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  return tokenizer.load_tokenizer(tokenizer.installed_minilm_dir())


@pytest.fixture(scope="session")
def data(tmp_path_factory):
  """A small synthetic_regions dataset (config.data dict), built once per session, read only."""
  from gseps_jax.data import prepare  # pylint: disable=g-import-not-at-top
  cfg = {"name": "synthetic_regions", "data_dir": str(tmp_path_factory.mktemp("syn")),
         "synthetic": dict(SYN)}
  prepare.ensure_prepared(cfg)
  return cfg
