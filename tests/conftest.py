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
