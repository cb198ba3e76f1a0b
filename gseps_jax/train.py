r"""Train GRM / SEPS / LAPS: `python -m gseps_jax.train --config=configs/grm_vit.py --workdir=DIR`.

Any config field can be overridden (`--config.train.batch_size=64`); a typo is an error.
Variants: `--config=configs/grm_vit.py:tiny` (also `:demo`, `:384`). Re-running the same
command resumes from the newest checkpoint in `--workdir`.

Multi-host: on a TPU pod slice or under SLURM, JAX discovers the other processes itself; on other
clusters set GSEPS_COORDINATOR=host:port, GSEPS_NUM_PROCESSES and GSEPS_PROCESS_ID (or the flags
below). Every process runs this same command.
"""

import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from gseps_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, "
                               "metrics and results.")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process CPU/GPU "
                             "without SLURM).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  distributed.maybe_initialize(coordinator=_COORD.value, num_processes=_NPROC.value,
                               process_id=_PID.value)
  from gseps_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from gseps_jax import trainer  # pylint: disable=g-import-not-at-top
  from gseps_jax.data import prepare  # pylint: disable=g-import-not-at-top
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (trainer.SetupError, prepare.NotPreparedError, checkpoint.CheckpointMismatchError,
          trainer.NonFiniteLossError) as e:
    # Expected, actionable failures: the message says what to do; no traceback.
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
