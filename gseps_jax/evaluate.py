r"""Retrieval evaluation: `python -m gseps_jax.evaluate --checkpoint=WORKDIR --protocol=flickr1k`.

Restores a checkpoint (`state.restore_params`) and runs the `evaluator.Evaluator` on a split:
every image and caption encoded once, all pairs scored on device with the model's tiled scorer
(GRM: three kernel calls on precomputed token sets; SEPS: caption-dependent selection per tile),
then R@1/5/10, median/mean rank and rSum. The same `Evaluator` runs inside the training loop.

Protocols: flickr1k (whole 1K test), full (every pair of the split, any size), coco1k (mean over
the 5 folds of 1,000 images), coco5k (whole 5K test), all (coco1k and coco5k). SEPS:
`--dense_mode=honest` (the dense caption describes the candidate image) or `parity` (the official
code's behaviour: the caption's own ground-truth dense caption — leaks the answer; reported as
such); default: the mode the checkpoint was trained with. `--dense_shuffle` (leak audit) also
scores both modes with the dense captions permuted among the images and reports the rSum drop next
to the unshuffled rSum.
"""

import json

import jax
from absl import flags
from etils import epath

from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import cli
from gseps_jax import evaluator as evaluator_lib
from gseps_jax import fileio
from gseps_jax import sharding
from gseps_jax import state as state_lib

_CKPT = flags.DEFINE_string("checkpoint", None, "Training workdir or WORKDIR/checkpoints/STEP.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
_PROTOCOL = flags.DEFINE_enum("protocol", None, evaluator_lib.PROTOCOLS, "Evaluation protocol "
                              "(default: the config's eval.protocol).")
_DENSE = flags.DEFINE_enum("dense_mode", None, ("honest", "parity"), "SEPS dense-caption "
                           "mode (default: the mode the model was trained with; parity = the "
                           "official, answer-leaking evaluation).")
_SHUFFLE = flags.DEFINE_bool("dense_shuffle", False, "SEPS leak audit: also score parity and "
                             "honest with the dense captions permuted among the images and "
                             "report the rSum drop next to the unshuffled numbers.")
_SHUFFLE_SEED = flags.DEFINE_integer("dense_shuffle_seed", 0, "Seed of the --dense_shuffle "
                                     "permutation (a derangement).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: CHECKPOINT workdir/eval_"
                           "<split>).")
_SAVE = flags.DEFINE_bool("save_scores", False, "Also write the score matrix as scores.npy.")
_CHUNK = flags.DEFINE_integer("chunk", None, "Pair tile size (default: config eval.chunk).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override config.data.data_dir.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "CPU only: split the CPU into this many XLA devices (e.g. the core count). "
    "The scorer's image rows then run on every device at once: XLA runs the SEPS/GRM scorers' "
    "small per-pair loops on one core per device. 0 = JAX's default (one CPU device).")


def evaluate_checkpoint(path, *, split="test", protocol=None, dense_mode=None, out=None,
                        save_scores=False, chunk=None, data_dir=None, dense_shuffle=False,
                        dense_shuffle_seed=0) -> dict:
  """Evaluates a checkpoint; `dense_mode=None` = the mode it was trained with (SEPS);
  `dense_shuffle` adds the leak audit (`Evaluator.leak_audit`) to results.json and the output."""
  config, step, _ = ckpt_lib.load_config_from_checkpoint(path)
  if data_dir:
    config.data.data_dir = data_dir
  mesh = sharding.make_mesh(config.mesh)
  config, model, params, step = state_lib.restore_params(path, mesh, config)
  trained_mode = model.trained_dense_mode  # None for a model without dense captions
  ev = evaluator_lib.Evaluator(config, model, mesh, split=split, protocol=protocol,
                              dense_mode=dense_mode or trained_mode,  # evaluated as trained
                              chunk=chunk)
  workdir, _ = ckpt_lib.resolve(path)
  out = epath.Path(out) if out else workdir / f"eval_{split}"
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
  m = ev.run(params, save_scores=str(out / "scores.npy") if save_scores else None)
  result = {"metrics": m, "protocol": ev.protocol, "split": split, "checkpoint_step": step,
            "model": config.model.name,
            "dense_mode": ev.dense_mode if ev.uses_dense else None,
            "trained_dense_mode": trained_mode if ev.uses_dense else None,
            "timings": {"encode_s": m["encode_seconds"], "score_s": m["score_seconds"]},
            "devices": jax.device_count()}
  if dense_shuffle:
    result["leak_audit"] = ev.leak_audit(params, seed=dense_shuffle_seed)
  if jax.process_index() == 0:
    fileio.atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    mode = f", dense_mode={ev.dense_mode}" if ev.uses_dense else ""
    table = m if "rsum" in m else {k[3:]: v for k, v in m.items()}
    print(evaluator_lib.format_table(
        table, title=f"{config.model.name} {split} {ev.protocol} (step {step}{mode})"))
    if dense_shuffle:
      print(evaluator_lib.format_audit(result["leak_audit"]))
    print(f"encode {m['encode_seconds']:.1f}s, score {m['score_seconds']:.1f}s -> "
          f"{out}/results.json")
  return result


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}: flags are written --name=value.")
  if _CHUNK.value is not None and _CHUNK.value < 1:
    raise cli.UserError(f"--chunk={_CHUNK.value} is invalid: expected a positive pair tile size.")
  if _SPLIT.value not in ("train", "dev", "test"):
    raise cli.UserError(f"--split={_SPLIT.value} is invalid: expected train, dev or test.")
  if _CPU_DEVICES.value < 0:
    raise cli.UserError(f"--cpu_devices={_CPU_DEVICES.value} is invalid: expected 0 (JAX's "
                        "default) or a number of CPU devices.")
  if _CPU_DEVICES.value > 0:  # before anything starts a JAX backend
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  # Paths resolved once here: orbax refuses relative ones.
  path, out = fileio.resolve_path(_CKPT.value), fileio.resolve_path(_OUT.value)
  data_dir = fileio.resolve_path(_DATA_DIR.value)
  workdir, _ = ckpt_lib.resolve(path)  # a missing checkpoint: one sentence, before JAX starts
  if out:
    config, _, _ = ckpt_lib.load_config_from_checkpoint(path)
    fileio.check_out_not_source(out, ("checkpoint folder", ckpt_lib.checkpoint_dir(workdir)),
                                ("data_dir", data_dir or config.data.get("data_dir")))
  cli.quiet_data_progress()
  from gseps_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize()
  evaluate_checkpoint(path, split=_SPLIT.value, protocol=_PROTOCOL.value,
                      dense_mode=_DENSE.value, out=out, save_scores=_SAVE.value,
                      chunk=_CHUNK.value, data_dir=data_dir, dense_shuffle=_SHUFFLE.value,
                      dense_shuffle_seed=_SHUFFLE_SEED.value)


if __name__ == "__main__":
  cli.run_absl(main, required=("checkpoint",))
