"""Runs `trainer.train_and_evaluate` on a tiny config in its own process (for tests that need a
fresh JAX: fake devices, several processes, signals). Prints `RESULT <json>` at the end.

  python tests/_train_worker.py WORKDIR MODEL '{"train.max_steps": 4}' [--sigterm_at=N]
      [--signal_at=N:SIGNUM] [--nan_at=N]

--sigterm_at=N sends this process a real SIGTERM while step N's batch is being fed (the trainer's
handler must checkpoint after step N and stop); --signal_at=N:SIGNUM the same with any signal
(e.g. 2 = SIGINT, Ctrl-C); --nan_at=N feeds a NaN image at step N (with device augmentation:
an empty image extent, which the augmentation turns into NaN pixels).
"""

import faulthandler
import json
import logging
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from gseps_jax import distributed  # pylint: disable=g-import-not-at-top


def main():
  # `kill -USR1 <pid>` prints every thread's Python stack to stderr (tests do it before killing
  # a worker that overran its time, so a hang shows where it was).
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  workdir, model, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  opts = dict(a.lstrip("-").split("=") for a in sys.argv[4:])
  logging.getLogger().setLevel(logging.INFO)
  distributed.maybe_initialize()
  import tiny  # pylint: disable=g-import-not-at-top
  from gseps_jax import sharding, trainer  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_config(model, **overrides)
  tiny.ensure_data(config)

  calls = {"n": 0}
  real = sharding.global_batch

  def hooked(local, mesh):
    calls["n"] += 1
    if calls["n"] == int(opts.get("sigterm_at", -1)):
      os.kill(os.getpid(), signal.SIGTERM)
    at, _, signum = opts.get("signal_at", "-1:0").partition(":")
    if calls["n"] == int(at):
      os.kill(os.getpid(), int(signum))
    if calls["n"] == int(opts.get("nan_at", -1)):
      if "image_wh" in local:  # uint8 canvases (device augmentation): an empty image extent
        local = dict(local, image_wh=np.zeros_like(local["image_wh"]))  # -> 0/0 weights = NaN
      else:
        local = dict(local, image=np.full_like(local["image"], np.nan))
    return real(local, mesh)

  sharding.global_batch = hooked
  try:
    result = trainer.train_and_evaluate(config, workdir)
  except trainer.NonFiniteLossError as e:
    result = {"error": str(e)}
  import jax  # pylint: disable=g-import-not-at-top
  result["process_index"] = jax.process_index()
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
