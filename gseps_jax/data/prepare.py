r"""Builds the tfds datasets (array_record, no TensorFlow); `ensure_prepared` for the trainer.

  python -m gseps_jax.data.prepare --dataset=synthetic_regions --data_dir=data_cache/tfds \
      [--num_train=5000 --num_dev=200 --num_test=500 --image_size=64 --seed=0]
  python -m gseps_jax.data.prepare --dataset=flickr30k_karpathy --manual_dir=seps/data/f30k \
      --image_dir=flickr30k-images --data_dir=data_cache/tfds

A second run finds the prepared dataset and says so without rebuilding.
"""

from __future__ import annotations

import os
import shlex

import tensorflow_datasets as tfds
from etils import epath

from gseps_jax.data import karpathy, synthetic

# Static table (no registry lookups by string at run time).
BUILDERS = {
    "flickr30k_karpathy": karpathy.Flickr30kKarpathy,
    "coco_karpathy": karpathy.CocoKarpathy,
    "synthetic_regions": synthetic.SyntheticRegions,
}
REAL_DATASETS = ("flickr30k_karpathy", "coco_karpathy")
FILE_FORMAT = "array_record"  # the only tfds format readable without TensorFlow


class NotPreparedError(RuntimeError):
  """A real dataset has not been built into data_dir yet."""


def _get(cfg, key, default=None):
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def data_dir_str(path) -> str:
  """A user's data_dir as the string tfds takes: `gs://` (any URL) kept as is, `~` expanded.

  Through etils.epath, never pathlib: `os.fspath(pathlib.Path("gs://b/x"))` is "gs:/b/x", a local
  relative folder named "gs:"."""
  return os.fspath(epath.Path(path).expanduser())


def make_builder(data_config) -> tfds.core.DatasetBuilder:
  """The (possibly not yet prepared) builder for `config.data`."""
  name = _get(data_config, "name")
  if name not in BUILDERS:
    raise ValueError(f"Unknown dataset {name!r}; config.data.name must be one of "
                     f"{sorted(BUILDERS)}.")
  data_dir = data_dir_str(_get(data_config, "data_dir"))
  if name == "synthetic_regions":
    syn = _get(data_config, "synthetic", {}) or {}
    config = synthetic.SyntheticRegions.make_config(
        num_train=_get(syn, "num_train", 5000), num_dev=_get(syn, "num_dev", 200),
        num_test=_get(syn, "num_test", 500), image_size=_get(syn, "image_size", 64),
        seed=_get(syn, "seed", 0))
    return synthetic.SyntheticRegions(config=config, data_dir=data_dir, file_format=FILE_FORMAT)
  image_dir = _get(data_config, "image_dir", "") or None
  return BUILDERS[name](image_dir=image_dir, data_dir=data_dir, file_format=FILE_FORMAT)


def prepare_command(data_config) -> str:
  """The exact shell command that builds `config.data`."""
  name = _get(data_config, "name")
  parts = ["python", "-m", "gseps_jax.data.prepare", f"--dataset={name}"]
  if name in REAL_DATASETS:
    parts += [f"--manual_dir={_get(data_config, 'manual_dir', '') or 'CAPTION_DIR'}",
              f"--image_dir={_get(data_config, 'image_dir', '') or 'IMAGE_DIR'}"]
  else:
    syn = _get(data_config, "synthetic", {}) or {}
    for key in ("num_train", "num_dev", "num_test", "image_size", "seed"):
      if _get(syn, key) is not None:
        parts.append(f"--{key}={_get(syn, key)}")
  parts.append(f"--data_dir={_get(data_config, 'data_dir')}")
  return " ".join(shlex.quote(p) for p in parts)


def prepare(data_config, *, verbose: bool = True) -> tuple[tfds.core.DatasetBuilder, bool]:
  """Builds the dataset unless already prepared -> (builder, whether it built now)."""
  builder = make_builder(data_config)
  if builder.is_prepared():
    if verbose:
      print(f"{builder.name} is already prepared at {builder.data_dir}; nothing to do.")
    return builder, False
  name = _get(data_config, "name")
  download_config = None
  if name in REAL_DATASETS:
    manual_dir = _get(data_config, "manual_dir", "")
    if not manual_dir or not epath.Path(manual_dir).is_dir():
      raise karpathy.DataFormatError(
          f"Missing caption folder {manual_dir!r}: pass --manual_dir=DIR pointing at the SEPS "
          f"caption folder for {name}.")
    download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  builder.download_and_prepare(download_config=download_config, file_format=FILE_FORMAT)
  if verbose:
    print(f"Prepared {builder.name} at {builder.data_dir}: "
          + ", ".join(f"{s} {v.num_examples}" for s, v in builder.info.splits.items()))
  return builder, True


def ensure_prepared(data_config) -> tfds.core.DatasetBuilder:
  """A prepared builder for `config.data`. Builds synthetic_regions if absent; for a real dataset
  that is not built yet, raises NotPreparedError with the command that builds it."""
  builder = make_builder(data_config)
  if builder.is_prepared():
    return builder
  name = _get(data_config, "name")
  if name == "synthetic_regions":
    return prepare(data_config, verbose=True)[0]
  manual = _get(data_config, "manual_dir", "") or "(config.data.manual_dir is empty)"
  images = _get(data_config, "image_dir", "") or "(config.data.image_dir is empty)"
  raise NotPreparedError(
      f"The {name} dataset is not prepared: no tfds data at {builder.data_dir}. It is built once "
      f"from the SEPS caption folder (config.data.manual_dir = {manual}: {{split}}_caps.txt, "
      f"{{split}}_ids.txt, id_mapping.json and the dense *.jsonl files) and the image folder "
      f"(config.data.image_dir = {images}). Download both, then run:\n  "
      f"{prepare_command(data_config)}\nand start again with the same config.data.data_dir.")


PROG = "python -m gseps_jax.data.prepare"


def define_flags(fv) -> None:
  """The command line's flags, defined in `fv` (absl's FLAGS on the command line; a fresh set
  for each in-process `main`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("dataset", None, sorted(BUILDERS), "The dataset to build.", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "tfds data dir (local path or gs://).", flag_values=fv)
  flags.DEFINE_string("manual_dir", "", "SEPS caption folder (real datasets).", flag_values=fv)
  flags.DEFINE_string("image_dir", "", "Image folder (real datasets).", flag_values=fv)
  for name, default, what in (("num_train", 5000, "training"), ("num_dev", 200, "dev"),
                              ("num_test", 500, "test")):
    flags.DEFINE_integer(name, default, f"synthetic_regions: number of {what} images.",
                         flag_values=fv)
  flags.DEFINE_integer("image_size", 64, "synthetic_regions: image side in pixels.",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "synthetic_regions: generation seed.", flag_values=fv)


REQUIRED = ("dataset", "data_dir")


def run(argv, fv, *, console: bool = False) -> None:
  """Builds the dataset the parsed flags `fv` describe. Paths may be relative, absolute or
  `gs://`."""
  from gseps_jax import cli  # pylint: disable=g-import-not-at-top
  from gseps_jax import fileio  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {list(argv[1:])}: flags are written --name=value.")
  if console:
    cli.quiet_data_progress()
  prepare({
      "name": fv.dataset, "data_dir": fileio.resolve_path(fv.data_dir),
      "manual_dir": fileio.resolve_path(fv.manual_dir),
      "image_dir": fileio.resolve_path(fv.image_dir),
      "synthetic": {"num_train": fv.num_train, "num_dev": fv.num_dev, "num_test": fv.num_test,
                    "image_size": fv.image_size, "seed": fv.seed},
  })


# This module's ValueErrors are all about the arguments (unknown dataset, sizes).
USER_ERRORS = (karpathy.DataFormatError, ValueError)


def main(argv) -> int:
  """The command line in-process (flags parsed into a fresh set, `cli.parse_in_process`) ->
  exit status (2: a user's mistake, printed as one `error:` line)."""
  from gseps_jax import cli  # pylint: disable=g-import-not-at-top

  def parse_and_run(argv):
    fv, rest = cli.parse_in_process(define_flags, argv, prog=PROG, required=REQUIRED)
    run(rest, fv)
    return 0

  return cli.run(parse_and_run, argv, user_errors_extra=USER_ERRORS)


if __name__ == "__main__":
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  from gseps_jax import cli as _cli  # pylint: disable=g-import-not-at-top
  define_flags(_flags.FLAGS)
  _cli.run_absl(lambda argv: run(argv, _flags.FLAGS, console=True), required=REQUIRED,
                user_errors_extra=USER_ERRORS)
