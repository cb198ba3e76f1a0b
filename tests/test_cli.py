"""The command lines as a user runs them (gseps_jax/cli.py and the five entry points).

The real CLIs run as subprocesses from a temporary working directory with RELATIVE paths (orbax
refuses relative paths; nothing tested a CLI that way, and README command 1 crashed at its first
checkpoint). Checked: a relative workdir trains past a checkpoint, writes results.json and can be
re-run; evaluate and export take relative --checkpoint/--out; `--overwrite` never replaces an
output that is, contains or lies inside one of its inputs; every user mistake is one `error:` line
on stderr with exit status 2 and no traceback; the console carries no third-party INFO logs.
README command 1 itself is parsed from README.md and run (shortened by overrides only).
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import ml_collections
import pytest

from tests import tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
GRM_CONFIG = str(REPO / "configs" / "grm_vit.py")
# The tiny set of tests/tiny.py (built once, shared with the other tests), as config overrides.
TINY_DATA = [f"--config.data.data_dir={tiny.DATA_DIR}", "--config.data.synthetic.num_train=32",
             "--config.data.synthetic.num_dev=8", "--config.data.synthetic.num_test=8"]
TRAIN = ["gseps_jax.train", f"--config={GRM_CONFIG}:tiny", "--workdir=run",
         "--config.checkpoint.every_steps=1"] + TINY_DATA
# What third-party INFO chatter looks like: absl's prefix (I1202 13:55:25.2 ... file.py:12]),
# our brief format at INFO, and the messages orbax / tfds print at INFO or WARNING.
NOISE = re.compile(r"^[IWE]\d{4} \d\d:|^info: |absl|orbax|Using custom data configuration|"
                   r"Load dataset info|Finished saving checkpoint|CheckpointManager", re.M)


def run_cli(module, *args, cwd, timeout=900):
  """`python -m module args...` in `cwd`, with the repository importable (and no cwd entry)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def assert_user_error(r, *words):
  """Exit status 2, exactly one line on stderr, `error: ...` with `words` in it, no traceback."""
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
  for w in words:
    assert w in lines[0], (w, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One tiny training run in a fresh directory, every path relative: (cwd, first run)."""
  tiny.ensure_data(tiny.tiny_config())
  cwd = tmp_path_factory.mktemp("cli")
  r = run_cli(*TRAIN, cwd=cwd)
  assert r.returncode == 0, r.stderr[-4000:]
  return cwd, r


def test_relative_workdir_trains_past_a_checkpoint_and_reruns(trained):
  cwd, first = trained
  work = cwd / "run"
  assert (work / "checkpoints" / "1").is_dir() and (work / "checkpoints" / "2").is_dir()
  results = json.loads((work / "results.json").read_text())
  assert results["step"] == 2 and "rsum" in results["test"]
  assert "rsum" in first.stdout  # the final table
  again = run_cli(*TRAIN, cwd=cwd)  # README: re-running the same command continues
  assert again.returncode == 0, again.stderr[-4000:]
  assert "Resumed" in again.stderr and "step 2" in again.stderr
  assert json.loads((work / "results.json").read_text())["step"] == 2
  assert not list(work.glob("*.tmp*"))


def test_console_is_quiet_by_default(trained):
  _, r = trained
  out = r.stdout + r.stderr
  assert not NOISE.search(out), NOISE.search(out).group(0)
  assert "train:" in r.stderr  # the progress bar


def test_evaluate_and_export_take_relative_paths(trained):
  cwd, _ = trained
  r = run_cli("gseps_jax.evaluate", "--checkpoint=run", "--out=eval_out", cwd=cwd)
  assert r.returncode == 0, r.stderr[-4000:]
  assert json.loads((cwd / "eval_out" / "results.json").read_text())["checkpoint_step"] == 2
  assert not NOISE.search(r.stdout + r.stderr)
  r = run_cli("gseps_jax.export", "--checkpoint=run/checkpoints/2", "--out=exported", cwd=cwd)
  assert r.returncode == 0, r.stderr[-4000:]
  assert json.loads((cwd / "exported" / "metadata.json").read_text())
  assert (cwd / "exported" / "vision_encoder" / "config.json").is_file()


def test_evaluate_on_two_cpu_devices_scores_the_same(trained):
  cwd, _ = trained
  res = {}
  for n in (0, 2):
    r = run_cli("gseps_jax.evaluate", "--checkpoint=run", f"--out=eval_dev{n}",
                f"--cpu_devices={n}", cwd=cwd)
    assert r.returncode == 0, r.stderr[-4000:]
    res[n] = json.loads((cwd / f"eval_dev{n}" / "results.json").read_text())
  assert res[0]["devices"] == 1 and res[2]["devices"] == 2
  for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum", "i2t_meanr", "t2i_meanr"):
    assert res[2]["metrics"][k] == pytest.approx(res[0]["metrics"][k]), k
  assert_user_error(run_cli("gseps_jax.evaluate", "--checkpoint=run", "--cpu_devices=-1",
                            cwd=cwd), "--cpu_devices=-1")


def _tree(root):
  return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1)
                for p in root.rglob("*"))


def test_overwrite_never_replaces_a_source(trained):
  cwd, _ = trained
  before = _tree(cwd / "run")
  r = run_cli("gseps_jax.export", "--checkpoint=run", "--out=run", "--overwrite", cwd=cwd)
  assert_user_error(r, "run", "is the --checkpoint workdir")
  r = run_cli("gseps_jax.evaluate", "--checkpoint=run", "--out=.", cwd=cwd)
  assert_user_error(r, "contains the checkpoint folder")
  assert _tree(cwd / "run") == before


def test_check_out_not_source(tmp_path):
  from gseps_jax import fileio
  src = tmp_path / "w"
  (src / "checkpoints").mkdir(parents=True)
  (tmp_path / "link").symlink_to(src)
  for out, how in ((src, "is"), (tmp_path, "contains"), (src / "checkpoints" / "x", "lies inside"),
                   (tmp_path / "link", "is")):
    with pytest.raises(FileExistsError, match=f"{how} the --checkpoint workdir"):
      fileio.check_out_not_source(out, ("--checkpoint workdir", src))
  fileio.check_out_not_source(tmp_path / "w2", ("--checkpoint workdir", src), None, ("x", ""))
  with pytest.raises(FileExistsError, match="lies inside the index gs://b/idx"):
    fileio.check_out_not_source("gs://b/idx/sub", ("index", "gs://b/idx/"))
  fileio.check_out_not_source("gs://b/idx2", ("index", "gs://b/idx"))


def test_resolve_path(tmp_path, monkeypatch):
  from gseps_jax import cli, fileio
  monkeypatch.chdir(tmp_path)
  assert fileio.resolve_path("runs/x") == str(tmp_path / "runs" / "x")
  assert fileio.resolve_path("gs://bucket/runs/x") == "gs://bucket/runs/x"
  assert fileio.resolve_path("~/x") == os.path.join(os.path.expanduser("~"), "x")
  assert fileio.resolve_path(None) is None and fileio.resolve_path("") == ""
  from configs import grm_vit
  c = grm_vit.get_config("tiny")
  c.data.manual_dir, c.model.text_hf_dir = "gs://b/caps", ""
  cli.resolve_config_paths(c)
  assert c.data.data_dir == str(tmp_path / "data_cache" / "tfds")
  assert c.data.manual_dir == "gs://b/caps" and c.model.text_hf_dir == ""
  # Every folder field of the shipped configs is resolved (a new *_dir field must be listed).
  from configs import seps_vit

  def dir_fields(node, prefix=""):
    for k, v in node.items():
      if hasattr(v, "items"):
        yield from dir_fields(v, f"{prefix}{k}.")
      elif k.endswith("_dir"):
        yield prefix + k

  for mod in (grm_vit, seps_vit):
    assert set(dir_fields(mod.get_config("tiny"))) <= set(cli.CONFIG_PATH_FIELDS)


def test_user_mistakes_are_one_line_without_traceback(tmp_path):
  cfg = f"--config={GRM_CONFIG}:tiny"
  # The "did you mean" hint comes first.
  line = assert_user_error(run_cli("gseps_jax.train", cfg, "--workdir=w",
                                   "--config.train.batch_sise=3", cwd=tmp_path), "batch_size")
  assert line.startswith("error: did you mean 'batch_size'")
  assert_user_error(run_cli("gseps_jax.train", f"--config={GRM_CONFIG}:tinyy", "--workdir=w",
                            cwd=tmp_path), "tinyy", "variant")
  assert_user_error(run_cli("gseps_jax.train", "--config=configs/nope.py:tiny", "--workdir=w",
                            cwd=tmp_path), "configs/nope.py", "not found")
  for field, value, expected in (("train.batch_size", "0", "positive"),
                                 ("checkpoint.every_steps", "0", "positive"),
                                 ("train.log_every", "0", "positive"),
                                 ("data.synthetic.num_train", "-5", "positive"),
                                 ("data.image_size", "-64", "positive")):
    assert_user_error(run_cli("gseps_jax.train", cfg, "--workdir=w", f"--config.{field}={value}",
                              cwd=tmp_path), f"config.{field} = {value}", expected)
  assert_user_error(run_cli("gseps_jax.train", cfg, cwd=tmp_path), "--workdir")
  assert not (tmp_path / "w").exists()  # nothing was started
  assert_user_error(run_cli("gseps_jax.evaluate", "--checkpoint=missing_run", cwd=tmp_path),
                    "missing_run", "does not exist")
  # Non-UTF-8 bytes in a caption file: the file and the line are named.
  caps = tmp_path / "caps"
  caps.mkdir()
  (tmp_path / "images").mkdir()
  (caps / "train_caps.txt").write_bytes(b"a dog\na cat\ncaf\xe9 au lait\nx\ny\n")
  (caps / "train_ids.txt").write_text("1\n1\n1\n1\n1\n")
  (caps / "id_mapping.json").write_text('{"1": "1.jpg"}')
  r = run_cli("gseps_jax.data.prepare", "--dataset=flickr30k_karpathy", "--manual_dir=caps",
              "--image_dir=images", "--data_dir=tfds", cwd=tmp_path)
  assert_user_error(r, "train_caps.txt line 3", "UTF-8")


def test_subcommand_cli_mistakes_and_help(tmp_path):
  """`retrieve` and `prepare` parse absl flags like the other CLIs: a subcommand's mistakes are
  one line (exit 2) naming the fix; --help lists the subcommands and the flags of each."""
  assert_user_error(run_cli("gseps_jax.retrieve", cwd=tmp_path), "index|query|explain")
  assert_user_error(run_cli("gseps_jax.retrieve", "serach", cwd=tmp_path), "unknown subcommand")
  assert_user_error(run_cli("gseps_jax.retrieve", "query", "--images=x", "--index=i",
                            cwd=tmp_path), "--images is not a flag of `query`")
  assert_user_error(run_cli("gseps_jax.retrieve", "index", "--checkpoint=c", cwd=tmp_path),
                    "`index` needs --images --out")
  assert_user_error(run_cli("gseps_jax.data.prepare", "--data_dir=d", cwd=tmp_path),
                    "--dataset is required")
  r = run_cli("gseps_jax.retrieve", "--help", cwd=tmp_path)
  assert "Traceback" not in r.stderr and "Subcommands" in r.stdout, r.stderr[-2000:]
  for line in ("required: --checkpoint --images --out", "required: --index", "--[no]json"):
    assert line in r.stdout, r.stdout


def test_in_process_mains_parse_into_a_fresh_flag_set():
  """Tests call `retrieve.main` / `prepare.main` repeatedly in one process: each call parses
  into its own flag set (a flag given once does not stick) and nothing lands in absl's FLAGS."""
  from absl import flags
  from gseps_jax import cli, retrieve
  from gseps_jax.data import prepare
  fv, rest = cli.parse_in_process(retrieve.define_flags, ["query", "--index=a", "--json",
                                                          "--k=3"], prog="p")
  assert rest == ["p", "query"] and fv.json and fv.k == 3
  fv, _ = cli.parse_in_process(retrieve.define_flags, ["query", "--index=a"], prog="p")
  assert not fv.json and fv.k == 5
  with pytest.raises(cli.UserError, match="--images is not a flag of `query`"):
    retrieve.main(["query", "--index=a", "--images=b"])
  with pytest.raises(cli.UserError, match="`query` needs --index"):
    retrieve.main(["query", "--json"])
  assert prepare.main(["--dataset=nope", "--data_dir=d"]) == 2
  assert "index" not in flags.FLAGS and "dataset" not in flags.FLAGS


def test_run_reports_user_errors_in_one_line_and_keeps_tracebacks_for_bugs(capsys):
  from gseps_jax import checkpoint, cli

  def boom(exc):
    raise exc

  assert checkpoint.CheckpointDamagedError in cli.user_errors()  # looked up by name
  assert cli.run(boom, checkpoint.CheckpointDamagedError("step 4 is damaged")) == 2
  assert cli.run(boom, FileNotFoundError("no such checkpoint")) == 2
  assert cli.run(boom, ValueError("bad --k"), user_errors_extra=(ValueError,)) == 2
  assert capsys.readouterr().err.splitlines() == [
      "error: step 4 is damaged", "error: no such checkpoint", "error: bad --k"]
  for bug in (RuntimeError("a bug"), ValueError("shapes (3,) and (4,)"), KeyError("x")):
    with pytest.raises(type(bug)):
      cli.run(boom, bug)
  assert cli.run(lambda a: a + 1, 1) == 2  # the function's own return value passes through


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
  from gseps_jax.data import karpathy
  dense = tmp_path / "f30k_train.jsonl"
  dense.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(karpathy.DataFormatError, match=r"f30k_train.jsonl line 2: not valid UTF-8"):
    karpathy.read_dense(dense, 2, tmp_path / "c.txt")


def test_validate_rejects_bad_values_and_accepts_every_shipped_config():
  from configs import common, grm_swin, grm_vit, laps_vit, seps_swin, seps_vit
  from gseps_jax import evaluator, models
  from gseps_jax.data import prepare
  assert common.EVAL_PROTOCOLS == evaluator.PROTOCOLS
  assert common.DATASETS == tuple(sorted(prepare.BUILDERS))
  assert common.MODEL_NAMES == tuple(sorted(models.MODELS))
  for mod in (grm_vit, grm_swin, seps_vit, seps_swin, laps_vit):
    for variant in (None, "tiny", "demo"):
      common.validate(mod.get_config(variant))
  for field, value in (("train.batch_size", 0), ("eval.chunk", -1), ("train.max_steps", 0),
                       ("train.eval_every", -2), ("optim.clip_norm", 0.0),
                       ("data.crop_scale", (0.9, 0.5)), ("eval.protocol", "coco"),
                       ("mesh.data", 0)):
    c = grm_vit.get_config("tiny")
    node = c
    *parents, last = field.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
    with pytest.raises(common.ConfigError, match=re.escape(f"config.{field} = {value!r}")):
      common.validate(c)
  # Cross-field: a ViT input side that is not a multiple of the patch (tiny: patch 16; demo: 8).
  c = grm_vit.get_config("tiny")
  c.data.image_size = 65
  with pytest.raises(common.ConfigError, match=r"data.image_size = 65 .*patch_size = 16, e.g. "
                     r"64 or 80; otherwise the image's last 1 px"):
    common.validate(c)
  c.data.image_size = 96  # another multiple: position embeddings are interpolated
  common.validate(c)
  vision = c.model.vision.to_dict()  # a (height, width) patch: each side must divide the size
  c.model.vision = ml_collections.ConfigDict(dict(vision, patch_size=(16, 10)))
  with pytest.raises(common.ConfigError, match=r"data.image_size = 96 .*patch_size = \(16, 10\) "
                     r"\(its width 10\), e.g. 90 or 100; otherwise the image's last 6 px "
                     r"\(columns\)"):
    common.validate(c)
  c.model.vision = ml_collections.ConfigDict(dict(vision, patch_size=(16, 8)))
  common.validate(c)
  c = seps_swin.get_config("tiny")
  c.data.image_size = 65  # Swin pads
  common.validate(c)


def _readme_command():
  """README command 1's `python -m gseps_jax.train ...` part as README.md writes it, without
  `python -m`: [module, args...]."""
  text = (REPO / "README.md").read_text()
  after = text.split("Train and evaluate the embedded demo", 1)[1]
  block = after.split("```bash", 1)[1].split("```", 1)[0]
  parts = [p.strip() for p in block.replace("\\\n", " ").split("&&")]
  (cmd,) = [p for p in parts if "gseps_jax.train" in p]
  argv = shlex.split(cmd)
  assert argv[:3] == ["python", "-m", "gseps_jax.train"], argv
  return argv[2:]


def test_readme_command_one_runs_from_a_fresh_directory_and_reruns(tmp_path):
  argv = _readme_command()
  workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
  assert not os.path.isabs(workdir)
  # A checkout's working directory: `configs/` is there (README paths are relative to it).
  (tmp_path / "configs").symlink_to(REPO / "configs")
  # Only shortening overrides: 3 steps of batch 8 past a checkpoint, on a small generated set
  # (built into the README's relative data_dir under tmp_path; its frozen MiniLM features are
  # computed for 80 + 40 captions instead of 25,000 + 2,500).
  shorten = ["--config.train.max_steps=3", "--config.checkpoint.every_steps=2",
             "--config.train.batch_size=8", "--config.data.synthetic.num_train=16",
             "--config.data.synthetic.num_dev=8", "--config.data.synthetic.num_test=8"]
  r = run_cli(*argv, *shorten, cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-4000:]
  results = tmp_path / workdir / "results.json"
  assert json.loads(results.read_text())["step"] == 3
  assert (tmp_path / workdir / "checkpoints" / "2").is_dir()
  again = run_cli(*argv, *shorten, cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-4000:]
  assert json.loads(results.read_text())["step"] == 3
