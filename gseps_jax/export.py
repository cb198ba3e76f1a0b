r"""Checkpoint conversion: our orbax checkpoints -> PyTorch (HF directories / official SEPS `.pth`)
and official SEPS `.pth` -> our orbax checkpoints.

  # HF transformers encoders + heads + a self-contained PyTorch scorer (GRM or SEPS):
  python -m gseps_jax.export --checkpoint=runs/grm_vit --out=exports/grm_vit --format=hf
  # The authors' checkpoint layout (SEPS/LAPS only), loadable by their evaluation code:
  python -m gseps_jax.export --checkpoint=runs/seps_vit/checkpoints/1000 --out=exp --format=official
  # The other way: an official `model_best.pth` -> a workdir that train/evaluate can use:
  python -m gseps_jax.export --from_official=model_best.pth --config=configs/seps_vit.py \
      --out=runs/seps_from_official

Formats (`--format`):
  hf        `OUT/vision_encoder/` and `OUT/text_encoder/` (HF `config.json` + `model.safetensors`,
            loadable with `ViTModel/SwinModel/BertModel.from_pretrained`; the text directory also
            holds the tokenizer: vocab.txt, tokenizer.json, tokenizer_config.json),
            `OUT/heads.safetensors` (projections and heads, PyTorch layouts), `OUT/gseps_torch.py`
            (a copy of `gseps_jax/torch_export/gseps_torch.py`: the eval-mode GRM/SEPS scorer in
            PyTorch and `load(OUT)`), `OUT/metadata.json` and `OUT/README.md`.
  official  `OUT/model_best.pth` = `{'model': state_dict, 'opt': argparse.Namespace, 'epoch',
            'best_rsum', 'Eiters'}`, the dict the official `train.py` saves and
            `lib/evaluation.evalrank` loads (`torch.load(path)['opt']`, `VSEModel(opt)`,
            `load_state_dict(checkpoint['model'], strict=False)`).
  both      the hf export with `model_best.pth` beside it.

The conversions themselves live in `gseps_jax/interop/` (HF: `hf.py`, `hf_export.py`; the
official layout: `official_seps.py`); this module restores checkpoints and writes the results.

Every output is written into a temporary sibling directory and renamed into place when complete,
so an interrupted export leaves nothing at `--out`. An existing `--out` is an error unless
`--overwrite`.

Not carried across formats: the HF poolers (`pooler.*`) of the official checkpoint (our encoders
return tokens; SEPS never uses the pooler; the official loader's `strict=False` keeps freshly
initialised ones) and the optimiser state (an imported checkpoint starts with a fresh one).
"""

import logging
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import fileio
from gseps_jax import models
from gseps_jax import optim
from gseps_jax import sharding
from gseps_jax import state as state_lib
from gseps_jax.interop import common
from gseps_jax.interop import hf_export
from gseps_jax.interop import official_seps

log = logging.getLogger(__name__)

FORMATS = ("hf", "official", "both")


def restore(checkpoint) -> tuple[Any, dict, int, dict]:
  """(config, params as numpy, step, meta) of `WORKDIR` or `WORKDIR/checkpoints/STEP`.

  Restores onto one CPU device whatever mesh wrote the checkpoint (export is a host job).

  Raises:
    FileNotFoundError: the path does not exist or holds no checkpoint.
    ExportError: the config's model type is not exportable.
  """
  _check_exists(checkpoint)
  config, _, meta = ckpt_lib.load_config_from_checkpoint(checkpoint)
  common.check_model_type(config)
  cpu_mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.local_devices(backend="cpu")[:1])
  config, _, params, step = state_lib.restore_params(checkpoint, cpu_mesh, config)
  return config, jax.tree.map(np.asarray, jax.device_get(params)), step, meta


def _check_exists(checkpoint) -> None:
  if not epath.Path(checkpoint).exists():
    raise FileNotFoundError(f"Checkpoint path {checkpoint} does not exist; pass a training "
                            f"workdir or WORKDIR/checkpoints/STEP.")


def _require_official_checkpoint(checkpoint) -> None:
  """`official_seps.require_official` on the checkpoint's saved config, before any array is
  read."""
  _check_exists(checkpoint)
  official_seps.require_official(ckpt_lib.load_config_from_checkpoint(checkpoint)[0])


def export_hf(checkpoint, out, *, overwrite: bool = False,
              tokenizer_dir: Optional[str] = None) -> Path:
  """Checkpoint -> hf export directory `out` (see the module docstring). Returns `out`."""
  config, params, step, _ = restore(checkpoint)
  with fileio.atomic_dir(out, overwrite) as tmp:
    hf_export.write_hf(config, params, step, tmp, tokenizer_dir=tokenizer_dir)
  return Path(out)  # local-path-ok: the hf export is a local HF directory


def export_official(checkpoint, out, *, overwrite: bool = False) -> Path:
  """Checkpoint (SEPS/LAPS) -> `out/model_best.pth` in the official layout. Returns the .pth."""
  _require_official_checkpoint(checkpoint)
  config, params, step, meta = restore(checkpoint)
  with fileio.atomic_dir(out, overwrite) as tmp:
    official_seps.write_official(config, params, step, tmp, meta)
  return Path(out) / common.OFFICIAL_FILE  # local-path-ok: torch.save wrote a local file


def export(checkpoint, out, *, format: str = "hf", overwrite: bool = False,  # pylint: disable=redefined-builtin
           tokenizer_dir: Optional[str] = None) -> Path:
  """The CLI's dispatcher: `format` in FORMATS. Returns `out`."""
  if format not in FORMATS:
    raise common.ExportError(f"--format must be one of {FORMATS}, got {format!r}.")
  if format == "hf":
    return export_hf(checkpoint, out, overwrite=overwrite, tokenizer_dir=tokenizer_dir)
  if format == "official":
    return export_official(checkpoint, out, overwrite=overwrite).parent
  _require_official_checkpoint(checkpoint)
  config, params, step, meta = restore(checkpoint)
  with fileio.atomic_dir(out, overwrite) as tmp:
    official_seps.write_official(config, params, step, tmp, meta)
    hf_export.write_hf(config, params, step, tmp, tokenizer_dir=tokenizer_dir)
  return Path(out)  # local-path-ok: HF / torch exports are local directories


def import_official(pth, config, out, *, overwrite: bool = False,
                    trust_pickle: bool = False) -> epath.Path:
  """Official SEPS `.pth` -> a workdir `out` (epath: may be gs://) with a checkpoint at step 0.

  The train state has the imported params, step 0 and a fresh optimiser state (the official
  `.pth` has none); the meta holds the config, its fingerprint and, under `'official'`, the
  `.pth`'s epoch / best_rsum / Eiters / opt. `train` and `evaluate` use `out` as a workdir.

  Raises:
    ExportError: the config is not SEPS, or the state dict does not match it (every missing,
      unexpected and mis-shaped tensor listed).
  """
  name = common.check_model_type(config)
  if not models.MODELS[name].official_layout:
    raise common.ExportError(f"--from_official needs a SEPS/LAPS config (the official layout is "
                             f"the SEPS code's); got model {config.model.name!r}.")
  sd, extras = official_seps.load_official(pth, trust_pickle=trust_pickle)
  try:
    params = official_seps.params_from_official(sd, config)
  except ValueError as e:
    raise common.ExportError(f"{pth}: {e}") from e
  common.check_params(params, common.abstract_params(config), f"Imported {pth}")
  tx, _, _ = optim.make_optimizer(config.optim, 1, params)
  params = jax.tree.map(jnp.asarray, params)
  # One jitted init instead of op-by-op dispatch over every leaf.
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=jax.jit(tx.init)(params))
  meta = {"config": config.to_dict(), "fingerprint": ckpt_lib.fingerprint(config),
          "official": dict(official_seps.extras_summary(extras), source=str(fileio.absolute(pth)))}
  with fileio.atomic_dir(out, overwrite) as tmp:
    (tmp / "config.json").write_text(config.to_json_best_effort(indent=2))
    ckpt = ckpt_lib.Checkpointer(tmp, best_metric=None, async_save=False)
    try:
      ckpt.save(0, state, meta)
      ckpt.wait()
    finally:
      ckpt.close()
  return epath.Path(out)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("checkpoint", None, "Training workdir or WORKDIR/checkpoints/STEP.")
  flags.DEFINE_string("out", None, "Output directory (written atomically).")
  flags.DEFINE_enum("format", "hf", FORMATS, "hf | official (SEPS/LAPS) | both.")
  flags.DEFINE_string("from_official", None, "Official SEPS .pth to import (needs --config).")
  config_flags.DEFINE_config_file("config", None, "Config of the official checkpoint "
                                  "(e.g. configs/seps_vit.py or configs/seps_vit.py:384).",
                                  lock_config=True)
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
  flags.DEFINE_bool("trust_pickle", False, "Load the .pth with weights_only=False.")
  flags.DEFINE_string("tokenizer_dir", None, "Tokenizer to ship (default: the config's).")
  return flags.FLAGS


def main(argv):
  """Checks and resolves the command line, then exports or imports. Expected failures (bad
  paths, mismatched state dicts, an --out that would replace its own inputs) print one line
  (`cli.run_absl`)."""
  from gseps_jax import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}: flags are written --name=value.")
  f = FLAGS
  if not f.out:
    raise cli.UserError("--out is required (the folder to write).")
  out = fileio.resolve_path(f.out)
  if f.from_official:
    if f.config is None:
      raise cli.UserError("--from_official needs --config (the model's config file).")
    from configs import common as config_common  # pylint: disable=g-import-not-at-top
    cli.resolve_config_paths(f.config)
    config_common.validate(f.config)
    pth = fileio.resolve_path(f.from_official)
    if f.overwrite:
      fileio.check_out_not_source(out, ("--from_official file", pth))
    path = import_official(pth, f.config, out, overwrite=f.overwrite,
                           trust_pickle=f.trust_pickle)
    print(f"Imported {f.from_official} -> {path} (step 0).")
    return
  if not f.checkpoint:
    raise cli.UserError("Pass --checkpoint (export) or --from_official (import).")
  checkpoint = fileio.resolve_path(f.checkpoint)
  tokenizer_dir = fileio.resolve_path(f.tokenizer_dir)
  workdir, _ = ckpt_lib.resolve(checkpoint)
  if f.overwrite:  # replacing --out must never delete what the export is made from
    fileio.check_out_not_source(out, ("--checkpoint workdir", workdir),
                                ("--tokenizer_dir", tokenizer_dir))
  path = export(checkpoint, out, format=f.format, overwrite=f.overwrite,
                tokenizer_dir=tokenizer_dir)
  print(f"Exported {f.checkpoint} ({f.format}) -> {path}")


if __name__ == "__main__":
  from gseps_jax import cli as _cli  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  _cli.run_absl(main, user_errors_extra=(common.ExportError,))
