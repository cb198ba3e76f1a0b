"""maybe_initialize: the decision table (pure), and two real CPU processes that initialise through
GSEPS_* variables and compute across processes (a global sum and retrieval metrics)."""

import json
import os
import sys
import textwrap

import numpy as np
import pytest

import multiproc
from gseps_jax import digest, distributed, metrics

SLURM = dict(SLURM_JOB_ID="42", SLURM_STEP_NODELIST="gpu[01-02]", SLURM_NTASKS="16",
             SLURM_PROCID="3", SLURM_LOCALID="3")


@pytest.mark.parametrize("env,mode,kwargs", [
    ({}, "single", {}),
    ({"GSEPS_COORDINATOR": "h0:1234", "GSEPS_NUM_PROCESSES": "4", "GSEPS_PROCESS_ID": "2"},
     "explicit", {"coordinator_address": "h0:1234", "num_processes": 4, "process_id": 2}),
    (dict(SLURM, GSEPS_COORDINATOR="gpu01:5555"), "explicit",
     {"coordinator_address": "gpu01:5555"}),
    (SLURM, "slurm", {}),
    (dict(SLURM, SLURM_NTASKS="1"), "single", {}),
    (dict(SLURM, SLURM_STEP_NUM_TASKS="1"), "single", {}),  # the batch step of a 16-task job
    ({"SLURM_JOB_ID": "42", "SLURM_NTASKS": "8"}, "single", {}),  # sbatch shell, no srun step
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"}, "tpu", {}),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, "single", {}),
    ({"GSEPS_DISTRIBUTED": "auto"}, "auto", {}),
    (dict(SLURM, GSEPS_DISTRIBUTED="0"), "disabled", {}),
])
def test_plan(env, mode, kwargs):
  plan = distributed.plan_initialization(env=env)
  assert (plan.mode, dict(plan.kwargs)) == (mode, kwargs)
  assert plan.initializes == (mode not in ("single", "disabled"))


def test_arguments_override_environment():
  plan = distributed.plan_initialization(
      "a:1", 2, 1, env={"GSEPS_COORDINATOR": "b:2", "GSEPS_NUM_PROCESSES": "9"})
  assert dict(plan.kwargs) == {"coordinator_address": "a:1", "num_processes": 2, "process_id": 1}


@pytest.mark.parametrize("env,match", [
    ({"GSEPS_NUM_PROCESSES": "2", "GSEPS_PROCESS_ID": "0"}, "without a coordinator"),
    ({"GSEPS_COORDINATOR": "h0:1"}, "needs num_processes"),
    ({"GSEPS_COORDINATOR": "h0", "GSEPS_NUM_PROCESSES": "2", "GSEPS_PROCESS_ID": "0"},
     "host:port"),
    ({"GSEPS_COORDINATOR": "h0:1", "GSEPS_NUM_PROCESSES": "2", "GSEPS_PROCESS_ID": "2"},
     r"not in \[0, 2\)"),
    ({"GSEPS_NUM_PROCESSES": "two"}, "must be an integer"),
    ({"GSEPS_DISTRIBUTED": "maybe"}, "GSEPS_DISTRIBUTED"),
])
def test_plan_errors(env, match):
  with pytest.raises(ValueError, match=match):
    distributed.plan_initialization(env=env)


def test_single_process_is_a_noop_in_this_process(monkeypatch):
  for k in list(os.environ):
    if k.startswith(("GSEPS_", "SLURM_", "TPU_")):
      monkeypatch.delenv(k)
  assert distributed.maybe_initialize().mode == "single"
  import jax
  assert not jax.distributed.is_initialized()


_WORKER = textwrap.dedent("""
    import faulthandler, json, logging, signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.INFO)
    from gseps_jax import distributed
    plan = distributed.maybe_initialize()
    again = distributed.maybe_initialize()
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from gseps_jax import digest as digest_lib, metrics

    pid, n = jax.process_index(), jax.process_count()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    # Each process contributes its own rows: process p holds values p * 100 + [0, 1, 2, 3].
    local = np.arange(4, dtype=np.float32) + 100 * pid
    x = jax.make_array_from_process_local_data(sharding, local, (4 * n,))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    # Retrieval metrics on a row-sharded score matrix spread over both processes.
    sims = np.random.default_rng(0).standard_normal((8, 40)).astype(np.float32)
    s = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data", None)), sims[4 * pid:4 * pid + 4], (8, 40))
    m = metrics.retrieval_metrics(s, 5)
    # Checkpoint digest of arrays spread over both processes (rows) and replicated on both.
    rep = jax.device_put(np.arange(6, dtype=np.int32), NamedSharding(mesh, P()))
    digest, bad = digest_lib.state_digest({"x": x, "s": s, "rep": rep})
    print("RESULT" + json.dumps(dict(mode=plan.mode, again=again.mode, pid=pid, n=n,
                                     local_devices=jax.local_device_count(),
                                     global_devices=jax.device_count(),
                                     total=float(total), rsum=m["rsum"], i2t_meanr=m["i2t_meanr"],
                                     digest=digest, bad=bad,
                                     cache_dir=jax.config.jax_compilation_cache_dir,
                                     cache_on=jax.config.jax_enable_compilation_cache)))
""")



def test_two_processes_initialise_and_compute_together(tmp_path):
  port = multiproc.free_port()
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
  envs = [dict(base, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               GSEPS_COORDINATOR=f"localhost:{port}", GSEPS_NUM_PROCESSES="2",
               GSEPS_PROCESS_ID=str(pid)) for pid in range(2)]
  cmd = [sys.executable, "-c", _WORKER]
  done = multiproc.run_processes([cmd, cmd], envs, tmp_path, timeout=180)
  results = []
  for d in done:
    assert "Initialising jax.distributed (explicit coordinator" in d.stderr
    results.append(json.loads([l for l in d.stdout.splitlines() if l.startswith("RESULT")][0][6:]))
  assert sorted(r["pid"] for r in results) == [0, 1]
  sims = np.random.default_rng(0).standard_normal((8, 40)).astype(np.float32)
  want = metrics.retrieval_metrics(sims, 5)
  for r in results:
    assert (r["mode"], r["again"], r["n"]) == ("explicit", "already", 2)
    assert (r["local_devices"], r["global_devices"]) == (2, 4)
    assert r["total"] == sum(range(4)) + sum(range(100, 104))  # 412: both processes' data
    assert (r["rsum"], r["i2t_meanr"]) == (want["rsum"], want["i2t_meanr"])
    # Each process digests its own shards; the sums, added over processes, equal the digest of
    # the whole arrays in one process.
    whole = np.concatenate([np.arange(4, dtype=np.float32) + 100 * p for p in range(2)])
    assert r["digest"] == digest.state_digest(
        {"x": whole, "s": sims, "rep": np.arange(6, dtype=np.int32)})[0]
    assert r["bad"] == []
    # conftest sets a persistent cache dir; multi-process CPU must not use it (it can hang).
    assert r["cache_dir"] and not r["cache_on"]
