"""Multi-process (multi-host) initialisation: `jax.distributed.initialize` when, and only when,
this process is one of several.

Call `maybe_initialize()` first thing in a CLI's `main`, before any JAX computation (JAX refuses
to initialise the distributed runtime after the backend has started).

How "several processes" is decided, first match wins (`plan_initialization`, a pure function):
1. Explicit arguments (`coordinator`, `num_processes`, `process_id`), else the environment variables
   `GSEPS_COORDINATOR` ("host:port"), `GSEPS_NUM_PROCESSES`, `GSEPS_PROCESS_ID`: all three are
   passed to `jax.distributed.initialize`. A coordinator alone is allowed inside SLURM, where JAX
   fills in the process count and id from `SLURM_NTASKS` / `SLURM_PROCID`.
2. `GSEPS_DISTRIBUTED`: "auto" (or 1/true) forces `jax.distributed.initialize()` with no
   arguments, i.e. JAX's own cluster detection (Cloud TPU VM metadata, SLURM, Open MPI, k8s). The
   TPU pod launcher sets it, because a TPU VM's shell environment does not reveal that the slice
   has several hosts (JAX asks the metadata server). "0"/"off"/false disables everything.
3. SLURM step with more than one task (`SLURM_STEP_NUM_TASKS`, else `SLURM_NTASKS`, > 1, plus the
   variables JAX's SLURM detection reads): `jax.distributed.initialize()`; JAX takes the
   coordinator from the first node of `SLURM_STEP_NODELIST` and pins one GPU per task via
   `SLURM_LOCALID`.
4. Cloud TPU env with several workers (`TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` listing
   more than one host, as on GKE and in some TPU VM images): `jax.distributed.initialize()`.
5. Otherwise a single process: nothing is done.

Idempotent: when the distributed runtime is already up, `maybe_initialize` only reports it.
"""

import dataclasses
import logging
import os
from typing import Mapping, Optional

import jax

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "auto", "on")
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class InitPlan:
  """What `maybe_initialize` will do.

  Attributes:
    mode: "single" (no-op), "explicit" (arguments / GSEPS_* variables), "auto" (forced JAX
      cluster detection), "slurm", "tpu", "disabled".
    kwargs: keyword arguments for `jax.distributed.initialize` (empty for JAX auto-detection).
    reason: one line for the log.
  """
  mode: str
  kwargs: Mapping[str, object]
  reason: str

  @property
  def initializes(self) -> bool:
    return self.mode not in ("single", "disabled")


def _int(name, value):
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def plan_initialization(coordinator: Optional[str] = None,
                        num_processes: Optional[int] = None,
                        process_id: Optional[int] = None,
                        env: Optional[Mapping[str, str]] = None) -> InitPlan:
  """Decides how to initialise, from arguments and an environment mapping (no side effects).

  Args:
    coordinator: "host:port" of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).
    env: environment (defaults to `os.environ`).

  Returns:
    The `InitPlan`.

  Raises:
    ValueError: inconsistent or malformed settings (e.g. a process count without a coordinator,
      or a process id out of range).
  """
  env = os.environ if env is None else env
  coordinator = coordinator or env.get("GSEPS_COORDINATOR") or None
  if num_processes is None and env.get("GSEPS_NUM_PROCESSES"):
    num_processes = _int("GSEPS_NUM_PROCESSES", env["GSEPS_NUM_PROCESSES"])
  if process_id is None and env.get("GSEPS_PROCESS_ID"):
    process_id = _int("GSEPS_PROCESS_ID", env["GSEPS_PROCESS_ID"])
  forced = env.get("GSEPS_DISTRIBUTED", "").strip().lower()
  if forced and forced not in _TRUE + _FALSE:
    raise ValueError(f"GSEPS_DISTRIBUTED must be one of {_TRUE + _FALSE}, got {forced!r}")
  if forced in _FALSE:
    return InitPlan("disabled", {}, "GSEPS_DISTRIBUTED disables multi-process initialisation")

  in_slurm = all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                                    "SLURM_PROCID", "SLURM_LOCALID"))
  if coordinator is not None or num_processes is not None or process_id is not None:
    if coordinator is None:
      raise ValueError("num_processes / process_id given without a coordinator address "
                       "(--coordinator or GSEPS_COORDINATOR=host:port)")
    if ":" not in coordinator:
      raise ValueError(f"coordinator must be 'host:port', got {coordinator!r}")
    if (num_processes is None or process_id is None) and not in_slurm:
      raise ValueError("a coordinator needs num_processes and process_id as well "
                       "(GSEPS_NUM_PROCESSES, GSEPS_PROCESS_ID), except inside a SLURM step")
    if num_processes is not None and num_processes < 1:
      raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if (num_processes is not None and process_id is not None
        and not 0 <= process_id < num_processes):
      raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    kwargs = {"coordinator_address": coordinator}
    if num_processes is not None:
      kwargs["num_processes"] = num_processes
    if process_id is not None:
      kwargs["process_id"] = process_id
    return InitPlan("explicit", kwargs, f"explicit coordinator {coordinator}")

  if forced in _TRUE:
    return InitPlan("auto", {}, "GSEPS_DISTRIBUTED asks for JAX cluster auto-detection")

  if in_slurm:
    ntasks = _int("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    if ntasks > 1:
      return InitPlan("slurm", {}, f"SLURM step with {ntasks} tasks")

  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  n_hosts = len([h for h in hosts.split(",") if h.strip()])
  if n_hosts > 1:
    return InitPlan("tpu", {}, f"Cloud TPU slice with {n_hosts} hosts")

  return InitPlan("single", {}, "single process (no coordinator, SLURM step or multi-host TPU)")


def maybe_initialize(coordinator: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> InitPlan:
  """Initialises JAX's distributed runtime if this is one of several processes.

  Args:
    coordinator: "host:port" (else `GSEPS_COORDINATOR`).
    num_processes: process count (else `GSEPS_NUM_PROCESSES`).
    process_id: this process's index (else `GSEPS_PROCESS_ID`).

  Returns:
    The `InitPlan` that was carried out; mode "already" when the runtime was already initialised.

  Raises:
    ValueError: see `plan_initialization`.
    RuntimeError: the JAX backend was started before this call (initialisation must come first).
  """
  if jax.distributed.is_initialized():
    plan = InitPlan("already", {}, "jax.distributed already initialised")
    logger.info("%s: process %d of %d", plan.reason, jax.process_index(), jax.process_count())
    return plan
  plan = plan_initialization(coordinator, num_processes, process_id)
  if not plan.initializes:
    logger.info("Not initialising jax.distributed: %s.", plan.reason)
    return plan
  logger.info("Initialising jax.distributed (%s) with %s.", plan.reason, dict(plan.kwargs) or
              "JAX cluster auto-detection")
  try:
    jax.distributed.initialize(**plan.kwargs)
  except RuntimeError as e:
    raise RuntimeError(
        f"jax.distributed.initialize failed ({plan.reason}): {e}. It must run before any JAX "
        "computation; call maybe_initialize() first in main().") from e
  logger.info("jax.distributed ready: process %d of %d, %d local / %d global devices.",
              jax.process_index(), jax.process_count(), jax.local_device_count(),
              jax.device_count())
  _no_persistent_cache_for_multiprocess_cpu()
  return plan


def _no_persistent_cache_for_multiprocess_cpu() -> None:
  """Turns the persistent compilation cache off for a multi-process job on CPU.

  With jax/jaxlib 0.10.2, a multi-process CPU train step (gloo collectives) that is loaded from
  the persistent cache, rather than compiled in the process, blocks forever in its first
  collective. Reproduced with this repo's tiny GRM step: two processes, the second run with the
  first run's cache hung in three of three trials; the same run with the cache off, or with only
  that one entry deleted, passes. Multi-process CPU is for tests and debugging, so compiling
  afresh costs little; GPU and TPU keep the cache.
  """
  if jax.process_count() > 1 and jax.default_backend() == "cpu" and (
      jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir):
    logger.warning("Multi-process CPU run: persistent compilation cache %s turned off (cached "
                   "CPU executables with cross-process collectives can hang in jax 0.10.2).",
                   jax.config.jax_compilation_cache_dir)
    jax.config.update("jax_enable_compilation_cache", False)
