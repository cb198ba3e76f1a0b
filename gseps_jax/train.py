r"""Train GRM / SEPS / LAPS: `python -m gseps_jax.train --config=configs/grm_vit.py --workdir=DIR`.

Any config field can be overridden (`--config.train.batch_size=64`); a typo is an error.
Variants: `--config=configs/grm_vit.py:tiny` (also `:demo`, `:384`). Re-running the same
command resumes from the newest checkpoint in `--workdir`. Paths (the workdir and the config's
data/weight folders) may be relative, absolute or `gs://`. `--verbosity=0` shows the INFO logs of
orbax, tfds and JAX (quiet by default).

Multi-host: on a TPU pod slice or under SLURM, JAX discovers the other processes itself; on other
clusters set GSEPS_COORDINATOR=host:port, GSEPS_NUM_PROCESSES and GSEPS_PROCESS_ID (or the flags
below). Every process runs this same command.
"""

from absl import flags
from ml_collections import config_flags

from gseps_jax import cli
from gseps_jax import fileio

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, "
                               "metrics and results.")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process CPU/GPU "
                             "without SLURM).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}: flags are written --name=value.")
  from configs import common  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  cli.resolve_config_paths(config)
  common.validate(config)  # before JAX starts: one sentence, not an error after compiling
  workdir = fileio.resolve_path(_WORKDIR.value)
  cli.quiet_data_progress()
  # JAX is imported only now: a mistake above is reported without waiting for it.
  from gseps_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize(coordinator=_COORD.value, num_processes=_NPROC.value,
                               process_id=_PID.value)
  from gseps_jax import trainer  # pylint: disable=g-import-not-at-top
  trainer.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  cli.run_absl(main, required=("config", "workdir"))
