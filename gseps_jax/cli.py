"""Command-line plumbing shared by train, evaluate, export, retrieve and prepare.

One behaviour for every entry point:
  * a user's mistake (missing file, typo'd config field, unknown variant, invalid value, foreign
    or damaged checkpoint, data not prepared, ...) prints ONE line `error: <message>` on stderr
    and exits with status 2, without a traceback; anything unexpected keeps its traceback;
  * the console is quiet: our warnings (resume, damaged checkpoint, stopping) as brief
    `warning: ...` lines, the progress bar, the evaluation lines and the final table; the INFO
    chatter of orbax / absl / tfds / jax only with `--verbosity=0` (INFO) or `1` (DEBUG)
    (absl's verbosity scale: -1 = warnings, the default);
  * every path a user gives is resolved once, here (`resolve_config_paths`,
    `fileio.resolve_path`): relative paths become absolute, `gs://` URLs stay as they are.

Every entry point parses absl flags (ml_collections `--config` where it takes a config) and calls
`run_absl(main)` instead of `app.run(main)`: absl parses flags before `main`, and ml_collections
loads `--config` files lazily, so their errors are caught at parse time here. Subcommands
(`retrieve index|query|explain`) are absl's first positional argument, checked by
`subcommand_args`; `main(argv)` called in-process parses into a fresh flag set
(`parse_in_process`). The one exception is launch/tpu.py (stdlib argparse: it runs on a
workstation where only gcloud is installed).
"""

import logging
import os
import re
import sys
import types
from typing import Callable, NamedTuple, Sequence

EXIT_USER_ERROR = 2
# Our loggers: shown at WARNING by default (INFO with --verbosity>=0).
OWN_LOGGERS = ("gseps_jax", "configs", "__main__")
# Third-party loggers that are chatty at INFO (orbax and tfds log through absl's logger).
THIRD_PARTY_LOGGERS = ("absl", "orbax", "jax", "tensorflow_datasets", "etils", "grain", "fsspec",
                       "urllib3", "matplotlib", "PIL", "transformers")
# Config fields that hold paths (resolved to absolute at the command line).
CONFIG_PATH_FIELDS = ("data.data_dir", "data.manual_dir", "data.image_dir", "data.tokenizer_dir",
                      "data.text_cache_dir", "model.vision_hf_dir", "model.text_hf_dir")
# Exception types raised for user mistakes, looked up by name in modules already imported (a
# module that is not imported cannot have raised; looking them up imports nothing heavy).
_USER_ERROR_NAMES = (
    ("gseps_jax.checkpoint", "CheckpointMismatchError"),
    ("gseps_jax.checkpoint", "CheckpointDamagedError"),
    ("gseps_jax.checkpoint", "NonFiniteStateError"),
    ("gseps_jax.trainer", "SetupError"),
    ("gseps_jax.trainer", "NonFiniteLossError"),
    ("gseps_jax.data.prepare", "NotPreparedError"),
    ("gseps_jax.data.karpathy", "DataFormatError"),
    ("gseps_jax.interop.common", "ExportError"),
    ("gseps_jax.search.index", "IndexMismatchError"),
    ("configs.common", "ConfigError"),
)
_BASE_USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                     PermissionError)


class UserError(Exception):
  """A mistake at the command line, reported as one line (raised by the CLIs themselves)."""


def user_errors(extra: Sequence[type] = ()) -> tuple[type, ...]:
  """The exception types reported as `error: <message>` (exit 2) instead of a traceback."""
  types = list(_BASE_USER_ERRORS) + [UserError] + list(extra)
  for module, name in _USER_ERROR_NAMES:
    t = getattr(sys.modules.get(module), name, None)
    if isinstance(t, type) and issubclass(t, BaseException):
      types.append(t)
  return tuple(types)


def message(e: BaseException) -> str:
  """The text of an exception without its repr quoting (KeyError quotes its argument)."""
  if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
    return e.args[0]
  return str(e) or type(e).__name__


def fail(msg: str) -> None:
  """Prints `error: <msg>` on stderr and exits with status 2."""
  sys.stdout.flush()
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


class _Brief(logging.Formatter):
  """`warning: message` for the default console; time and logger name when verbose."""

  def __init__(self, verbose: bool):
    super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else None)
    self.verbose = verbose

  def format(self, record):
    if self.verbose:
      return super().format(record)
    return f"{record.levelname.lower()}: {record.getMessage()}"


_verbosity = -1  # of this run, set by setup_logging


def setup_logging(verbosity: int = -1) -> None:
  """Console logging for a CLI run (absl's scale: -1 warnings [default], 0 info, >=1 debug).

  Replaces absl's handler (one long prefix per line) by a brief one and sets our loggers and the
  third-party ones to the level asked for.
  """
  global _verbosity
  _verbosity = verbosity
  level = (logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0
           else logging.DEBUG)
  root = logging.getLogger()
  for h in list(root.handlers):
    root.removeHandler(h)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(_Brief(verbose=verbosity >= 0))
  root.addHandler(handler)
  root.setLevel(level)
  for name in OWN_LOGGERS + THIRD_PARTY_LOGGERS:
    logging.getLogger(name).setLevel(level)
  if verbosity < 0:
    # transformers warns at import that PyTorch is absent (the core install has none).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # orbax and tfds report routine events (async save timings, custom data configurations) as
    # absl WARNINGs: noise for a user; shown again from --verbosity=0.
    logging.getLogger("absl").setLevel(logging.ERROR)


def quiet_data_progress() -> None:
  """Turns tfds's dataset-building progress bars off unless the run is verbose. Called by the
  commands that may build a dataset, after their arguments are checked (importing tfds takes
  seconds, a config mistake should not wait for it)."""
  if _verbosity < 0:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()


def resolve_config_paths(config) -> None:
  """Makes every path field of `config` (`CONFIG_PATH_FIELDS`) absolute, in place; `gs://` and
  empty fields are left as they are. Works on a locked ConfigDict (values may change)."""
  from gseps_jax import fileio  # pylint: disable=g-import-not-at-top
  for dotted in CONFIG_PATH_FIELDS:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
      node = node.get(key) if hasattr(node, "get") else None
    if node is None or not hasattr(node, "get") or last not in node:
      continue
    value = node[last]
    if isinstance(value, str) and value:
      node[last] = fileio.resolve_path(value)


def _config_arg(argv: Sequence[str], name: str) -> str | None:
  """The value of `--name=...` / `--name ...` in argv (the last one), else None."""
  value = None
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


_DID_YOU_MEAN = re.compile(r"""Did you mean ["'](\w+)["'] instead of ["'](\w+)["']""")


def _parse_error_message(e: BaseException, argv: Sequence[str],
                         config_flags_names: Sequence[str]) -> str | None:
  """One line for an error raised while parsing flags or loading a `--config`, else None."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  text = message(e)
  while isinstance(e, (KeyError, AttributeError)) and e.args and isinstance(
      e.args[0], BaseException):  # ml_collections wraps the KeyError in an AttributeError
    e = e.args[0]
    text = message(e)
  m = _DID_YOU_MEAN.search(text)
  if m and isinstance(e, (KeyError, AttributeError)):
    good, bad = m.group(1), m.group(2)
    for a in argv:
      for name in config_flags_names:
        if a.startswith(f"--{name}.") and re.search(rf"\.{re.escape(bad)}(=|$|\.)", a):
          flag = a.split("=", 1)[0]
          return (f"did you mean '{good}'? {flag} names no config field ('{bad}' is not a "
                  f"field; check the spelling).")
    return f"did you mean '{good}'? '{bad}' is not a config field."
  if isinstance(e, flags.Error):
    if "Error whilst parsing config file" in text:  # ml_collections put a traceback in it
      return f"{text.split(': Error whilst', 1)[0]}: {text.strip().splitlines()[-1]}"
    return text.replace("\n", " ")
  for name in config_flags_names:
    arg = _config_arg(argv, name)
    if arg is None:
      continue
    path = arg.split(":", 1)[0]
    if isinstance(e, OSError) and "Failed loading config file" in text:
      from gseps_jax import fileio  # pylint: disable=g-import-not-at-top
      where = fileio.resolve_path(path)
      if not os.path.exists(where):  # local-path-ok: config files are local Python modules
        return (f"config file {path} not found (--{name}={arg}; looked for {where}): pass the "
                f"path of a file in configs/, e.g. --{name}=configs/grm_vit.py:tiny.")
      return f"cannot load config file {path} (--{name}={arg}): {text.splitlines()[-1].strip()}"
  if isinstance(e, (KeyError, ValueError)):
    return text.replace("\n", " ")
  return None


def parse_flags(argv: Sequence[str], *, flag_values=None, required: Sequence[str] = ()
                ) -> list[str]:
  """Parses `argv` (argv[0] = the program) into `flag_values` (default: absl's global FLAGS)
  -> the positional arguments, argv[0] first. A mistake raises `UserError` with one line.

  Also loads every `--config` file now (ml_collections loads them lazily, on first use inside
  `main`) and checks the `required` flags.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  # ml_collections' config flags (DEFINE_config_file / _dict / _dataclass) carry the overrides.
  config_names = [n for n, f in fv._flags().items()  # pylint: disable=protected-access
                  if hasattr(type(f), "override_values")]
  try:
    rest = fv(list(argv))
    for name in required:
      if fv[name].value is None:
        raise UserError(f"--{name} is required (see --help).")
    for name in config_names:
      value = fv[name].value  # loads the file, applies the overrides
      # A file that failed to load is a placeholder raising its IOError on first attribute use.
      hasattr(value, "lock")
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    text = _parse_error_message(e, argv, config_names)
    if text is None:
      raise
    raise UserError(text) from e
  return rest


def parse_absl_flags(argv: Sequence[str], required: Sequence[str] = ()) -> list[str]:
  """`parse_flags` into absl's global FLAGS, a mistake printed as one line (exit 2)."""
  try:
    return parse_flags(argv, required=required)
  except UserError as e:
    fail(message(e))


def parse_in_process(define_flags: Callable, argv: Sequence[str], *, prog: str,
                     required: Sequence[str] = ()):
  """For a CLI's `main(argv)` called in-process (tests, notebooks; `argv` without the program
  name): `define_flags(flag_values)` into a FRESH flag set, parsed -> (flag set, positional
  arguments, `prog` first). absl's global FLAGS is shared by every CLI module imported into the
  process and keeps the values of the previous parse; a fresh set keeps calls independent."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  define_flags(fv)
  return fv, parse_flags([prog, *argv], flag_values=fv, required=required)


class Subcommand(NamedTuple):
  """A subcommand (`python -m MODULE NAME --flag=...`): one-line help, the function it runs
  (`fn(args)`, args = a namespace of its flags' values) and the flags it takes."""
  help: str
  fn: Callable
  required: tuple[str, ...] = ()
  optional: tuple[str, ...] = ()


def subcommand_help(commands: dict[str, Subcommand]) -> str:
  """The `--help` text listing the subcommands and their flags (appended to a module doc)."""
  width = max(map(len, commands))
  lines = ["Subcommands (the first argument) and their flags:"]
  for name, c in commands.items():
    lines.append(f"  {name:<{width}}  {c.help}")
    for kind, names in (("required", c.required), ("optional", c.optional)):
      if names:
        lines.append(f"  {'':<{width}}  {kind}: " + " ".join(f"--{n}" for n in names))
  return "\n".join(lines) + "\n"


def subcommand_args(argv: Sequence[str], commands: dict[str, Subcommand], flag_values,
                    prog: str) -> tuple[str, types.SimpleNamespace]:
  """The subcommand `argv[1]` (absl's positional arguments after parsing) and a namespace of
  its flags' values. Every mistake is a `UserError` naming the fix: no or an unknown subcommand,
  a stray argument, a required flag missing, a flag of another subcommand."""
  names = ", ".join(commands)
  if len(argv) < 2:
    raise UserError(f"name a subcommand: {prog} {{{'|'.join(commands)}}} --flag=... "
                    "(see --help).")
  name, c = argv[1], commands.get(argv[1])
  if c is None:
    raise UserError(f"unknown subcommand {name!r}: expected one of {names} (see --help).")
  if len(argv) > 2:
    raise UserError(f"unexpected arguments {list(argv[2:])}: flags are written --name=value.")
  own = c.required + c.optional
  for other in dict.fromkeys(n for o in commands.values() for n in o.required + o.optional):
    if other not in own and flag_values[other].present:
      raise UserError(f"--{other} is not a flag of `{name}` (its flags: "
                      + " ".join(f"--{n}" for n in own) + ").")
  missing = [n for n in c.required if flag_values[n].value is None]
  if missing:
    raise UserError(f"`{name}` needs " + " ".join(f"--{n}" for n in missing) + " (see --help).")
  return name, types.SimpleNamespace(**{n: flag_values[n].value for n in own})


def run(fn: Callable, args, *, user_errors_extra: Sequence[type] = ()):
  """`fn(args)`, with a user's mistake printed as `error: <message>` on stderr and returned as
  exit status 2 (anything else propagates with its traceback). Console logging is not touched
  here: the `__main__` blocks call `setup_logging` (tests call the CLIs' `main` in-process)."""
  try:
    return fn(args)
  except user_errors(user_errors_extra) as e:
    sys.stdout.flush()
    print(f"error: {message(e).strip()}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def run_absl(main: Callable, *, required: Sequence[str] = (), user_errors_extra=()) -> None:
  """`absl.app.run(main)` with this module's error and logging behaviour (see the docstring).

  `--help` prints the flags (absl exits with status 1 after help).
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parser(argv):
    return parse_absl_flags(argv, required)

  def wrapped(argv):
    # absl turns an unset --verbosity into 0 (INFO) after parsing: unset means quiet here.
    verbosity = flags.FLAGS["verbosity"]
    setup_logging(verbosity.value if verbosity.present else -1)
    return run(main, argv, user_errors_extra=user_errors_extra)

  app.run(wrapped, flags_parser=parser)
