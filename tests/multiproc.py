"""Runs several cooperating processes (a jax.distributed job on one machine) for a test.

Each process writes stdout/stderr to its own file, never to a pipe: a pipe that nobody drains
fills at 64 KiB and blocks its writer, and a process blocked in `write` never reaches the next
collective, so its peers wait for it forever. When one process fails, the others are given a
short grace period (they are usually stuck in a collective with the dead peer) and then stopped.
When the deadline passes, every live process is sent SIGUSR1 first: workers that registered
`faulthandler` for it print all their threads' Python stacks, which the failure message shows.
"""

import dataclasses
import pathlib
import signal
import socket
import subprocess
import time


@dataclasses.dataclass
class Finished:
  returncode: int
  stdout: str
  stderr: str


def free_port() -> int:
  """A TCP port that was free a moment ago (for the job's coordinator)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _tail(text, n=4000):
  return text[-n:]


def run_processes(commands, envs, logdir, timeout=420.0, grace=60.0, cwd=None):
  """Starts `commands[i]` with `envs[i]` at once; returns a `Finished` per process.

  Raises AssertionError naming each process's exit status and stderr tail (with its stacks when
  it had to be stopped) if any process fails or the job overruns `timeout` seconds.
  """
  logdir = pathlib.Path(logdir)
  logdir.mkdir(parents=True, exist_ok=True)
  procs, files = [], []
  for i, (cmd, env) in enumerate(zip(commands, envs)):
    out, err = open(logdir / f"proc{i}.out", "w"), open(logdir / f"proc{i}.err", "w")
    files.append((out, err))
    procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=cwd))
  start = time.monotonic()
  deadline = start + timeout
  why = None
  while any(p.poll() is None for p in procs):
    now = time.monotonic()
    failed = [p for p in procs if p.poll() not in (None, 0)]
    if failed and deadline > now + grace:
      deadline = now + grace  # the others are likely waiting on the failed peer
    if now > deadline:
      why = (f"stopped after {now - start:.0f} s" + (" (a peer had failed)" if failed else
                                                      f" (timeout {timeout:.0f} s)"))
      break
    time.sleep(0.5)
  if why:
    live = [p for p in procs if p.poll() is None]
    for p in live:
      p.send_signal(signal.SIGUSR1)  # stack dump (faulthandler) before the kill
    time.sleep(3)
    for p in live:
      p.kill()
  for p in procs:
    p.wait()
  for out, err in files:
    out.close()
    err.close()
  results = [Finished(p.returncode, (logdir / f"proc{i}.out").read_text(),
                      (logdir / f"proc{i}.err").read_text()) for i, p in enumerate(procs)]
  if why or any(r.returncode for r in results):
    report = "\n".join(f"--- process {i}: exit {r.returncode}; stderr tail:\n{_tail(r.stderr)}"
                       for i, r in enumerate(results))
    raise AssertionError(f"multi-process job failed ({why or 'non-zero exit'}); logs in "
                         f"{logdir}\n{report}")
  return results
