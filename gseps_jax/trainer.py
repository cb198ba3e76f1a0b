"""The training loop behind `python -m gseps_jax.train`.

`train_and_evaluate(config, workdir)` runs the same on 1 CPU, a multi-GPU host and a TPU pod
slice: parameters are created directly in their shardings (`jit(init, out_shardings=...)`), the
step is compiled once with input/output shardings and a donated state, each process feeds its own
slice of every global batch, and orbax checkpoints (async; on preemption signals; at the end) make
a restarted command continue exactly where the last checkpoint left off, including the data order.
"""

import functools
import json
import logging
import math
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import evaluator as evaluator_lib
from gseps_jax import fileio
from gseps_jax import losses
from gseps_jax import metrics_log
from gseps_jax import models
from gseps_jax import optim
from gseps_jax import sharding
from gseps_jax import state as state_lib
from gseps_jax.data import device_augment

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  pass


def _device_images(batch, config):
  """A batch of uint8 canvases + crop boxes + flips (`data.device_augment`) -> normalised images
  (`data/device_augment.py`); a batch of images as it is (config.data is read only if needed)."""
  if "crop_box" not in batch:
    return batch
  return device_augment.images_from_batch(batch, config.data)


def loss_fn(params, batch, rng, step, *, model, config, steps_per_epoch):
  """Scalar loss and metrics for one batch (pure; `step` is a traced int)."""
  batch = _device_images(batch, config)
  sims, aux = model.apply({"params": params}, batch, train=True,
                          rngs=state_lib.train_rngs(rng))
  return _total_loss(sims, aux, batch, step, params, config, steps_per_epoch)


def _total_loss(sims, aux, batch, step, params, config, steps_per_epoch):
  epoch_f = step / steps_per_epoch
  warmup = epoch_f < config.loss.warmup_epochs
  # Official recipe: during the warm-up epoch the all-negative loss of batch i is scaled by
  # i / n_batches (the first batch weighs 0).
  warmup_scale = jnp.minimum(1.0, (step % steps_per_epoch) / steps_per_epoch)
  return losses.total_loss(sims, aux, batch, config, params=params, warmup=warmup,
                           warmup_scale=warmup_scale)


def _chunks(x, k: int):
  """`[B, ...]` -> `[k, B/k, ...]`, chunk c = rows c, c+k, c+2k, ... With rows sharded in
  contiguous blocks over the devices, every chunk is spread evenly over them (B/k divisible by
  the device count), so splitting and merging move no data between devices."""
  return x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)


def _unchunk(x):
  """Inverse of `_chunks`: `[k, B/k, ...]` -> `[B, ...]` in the original row order."""
  return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def cached_value_and_grad(params, batch, rng, step, *, model, config, steps_per_epoch,
                          num_chunks: int):
  """(loss, metrics), grads of `loss_fn` with the encoders run in `num_chunks` chunks: the
  contrastive loss still sees every pair of the whole batch (GradCache, Gao et al. 2021).

  1. The encoders (`model.towers`) run chunk by chunk with no activations kept: the token sets
     of the whole batch (small next to the encoders' activations).
  2. The head and loss run on the whole batch: the gradient w.r.t. the head's parameters and
     w.r.t. the token sets.
  3. Each chunk's encoders run again under `jax.vjp`, pulled back with that chunk's token-set
     gradient; the parameter gradients add up.
  Peak activation memory is one chunk's encoders instead of the batch's. Dropout masks are drawn
  per chunk (rng folded with the chunk index), so with dropout on the gradient is that of other,
  equally random masks; without dropout it equals the full-batch gradient (tests/test_train.py).
  """
  k = num_chunks
  rngs = state_lib.train_rngs(rng)
  chunks = jax.tree.map(lambda x: _chunks(x, k), batch)
  index = jnp.arange(k)

  def towers(p, chunk, i):
    return model.apply({"params": p}, chunk, train=True,
                       rngs={"dropout": jax.random.fold_in(rngs["dropout"], i)}, method="towers")

  reps = jax.tree.map(_unchunk, jax.lax.map(lambda a: towers(params, *a), (chunks, index)))

  def head_loss(p, r):
    sims, aux = model.apply({"params": p}, r, batch, train=True, method="head", rngs=rngs)
    return _total_loss(sims, aux, batch, step, p, config, steps_per_epoch)

  (loss, metrics), (grads, rep_grads) = jax.value_and_grad(
      head_loss, argnums=(0, 1), has_aux=True)(params, reps)

  def pull_back(acc, a):
    chunk, g, i = a
    _, vjp = jax.vjp(lambda p: towers(p, chunk, i), params)
    return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

  grads, _ = jax.lax.scan(pull_back, grads,
                          (chunks, jax.tree.map(lambda x: _chunks(x, k), rep_grads), index))
  return (loss, metrics), grads


def value_and_grad(params, batch, rng, step, *, model, config, steps_per_epoch):
  """(loss, metrics), grads of one batch: plain, or with `train.encoder_chunk` > 1 through
  `cached_value_and_grad`. A batch of uint8 canvases + crop boxes + flips (`data.device_augment`)
  is augmented here first (`data/device_augment.py`: in the jitted step, batch sharded)."""
  batch = _device_images(batch, config)
  k = int(config.train.get("encoder_chunk", 0))
  if k > 1:
    return cached_value_and_grad(params, batch, rng, step, model=model, config=config,
                                 steps_per_epoch=steps_per_epoch, num_chunks=k)
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, model=model, config=config, steps_per_epoch=steps_per_epoch),
      has_aux=True)
  return grad_fn(params, batch, rng, step)


def train_step(state: state_lib.TrainState, batch, rng, *, model, tx, config, steps_per_epoch):
  step_rng = jax.random.fold_in(rng, state.step)
  (loss, metrics), grads = value_and_grad(state.params, batch, step_rng, state.step, model=model,
                                          config=config, steps_per_epoch=steps_per_epoch)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # param_norm of the UPDATED trainable params: not finite when an update exploded them
  # (checked before every save; the loss only shows the damage one step later). Frozen leaves
  # are left out: they are never updated, and reading them cost the demo ~6 ms a step.
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(optim.trainable_leaves(params, config.optim)))
  return state_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_train_step(config, model, tx, mesh, state_shardings, steps_per_epoch):
  """`train_step` compiled once with in/out shardings and the state donated."""
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, config=config,
                        steps_per_epoch=steps_per_epoch),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,), compiler_options=sharding.compiler_options(config))


def install_signal_handlers():
  """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""
  received = []

  def handler(signum, _):
    received.append(signum)
    log.warning("Received signal %d: saving a checkpoint and stopping.", signum)

  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, handler)
  return received


def _all_agree_to_stop(stop: bool) -> bool:
  """Stop when ANY process wants to (a signal or the time budget reaches hosts at different
  steps): every process must leave the loop at the same step or the next collective hangs."""
  if jax.process_count() == 1:
    return stop
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray(stop))))


def nan_advice(config) -> str:
  """What to change, for the config in use (its lr, clipping and loss)."""
  o = config.optim
  clip = o.get("clip_norm", 0) or 0
  lower = f"lower optim.lr (now {o.lr:g}, e.g. --config.optim.lr={o.lr / 10:g})"
  if clip <= 0 or clip >= 1e6:
    tips = [lower, "enable gradient clipping (--config.optim.clip_norm=2.0; now "
                   f"{'off' if clip <= 0 else f'{clip:g}, too large to act'})"]
  else:
    tips = [lower, f"tighten optim.clip_norm (now {clip:g}, e.g. {clip / 4:g})"]
  kind = config.loss.get("kind", "hinge")
  if (o.get("warmup_steps", 0) or 0) <= 0:
    tips.append("add a warm-up (--config.optim.warmup_steps=500)")
  if config.model.get("dtype", "float32") != "float32":
    tips.append(f"compute in float32 (model.dtype is {config.model.dtype})")
  if kind == "infonce":
    tips.append(f"raise loss.init_temperature (now {config.loss.get('init_temperature', 0):g})")
  return f"with the {kind} loss: " + ", or ".join(tips)


def _check_finite(step, metrics, config):
  """Raises NonFiniteLossError if the loss, or the norm of the parameters just updated, is not
  finite (an overflowing norm means exploded weights even when each value is still finite)."""
  loss = float(metrics["loss"])
  norm = float(metrics.get("param_norm", 0.0))
  if math.isfinite(loss) and math.isfinite(norm):
    return
  what = (f"Loss became {loss}" if not math.isfinite(loss) else
          f"The parameters exploded (global norm {norm})")
  raise NonFiniteLossError(
      f"{what} at step {step}; stopping without saving this state. The last good checkpoint "
      f"is kept; {nan_advice(config)}; then re-run the same command to resume.")


def _params_exploded(state) -> str | None:
  """Restore check: why the restored parameters are unusable (norm not finite), or None."""
  norm = float(jax.jit(optax.tree.norm)(state.params))
  return None if math.isfinite(norm) else f"parameter norm is {norm} (exploded weights)"


class SetupError(FileNotFoundError):
  """Data or pretrained weights the config needs are not on this machine."""


def preflight(config) -> None:
  """Checks, before anything is built, that the dataset is prepared and the pretrained weights
  the config asks for are present; raises ONE paragraph listing every missing piece with the
  command that provides it."""
  from gseps_jax.data import prepare  # pylint: disable=g-import-not-at-top
  problems = []
  m = config.model
  for key, name_key, what in (("vision_hf_dir", "vision_hf_name", "vision"),
                              ("text_hf_dir", "text_hf_name", "text")):
    d = m.get(key, "")
    hf_name = m.get(name_key, "")
    if (d and not (epath.Path(d) / "config.json").exists()) or (
        not d and m.get("require_pretrained", False)):
      where = f"{d!r} has no config.json" if d else "config.model." + key + " is empty"
      problems.append(
          f"pretrained {what} weights are missing ({where}): on a machine with internet run "
          f"`huggingface-cli download {hf_name} --local-dir weights/{hf_name.split('/')[-1]}` "
          f"(or any local HF dir with config.json + model.safetensors) and pass "
          f"--config.model.{key}=weights/{hf_name.split('/')[-1]}")
  if config.data.name in prepare.REAL_DATASETS and not prepare.make_builder(
      config.data).is_prepared():
    problems.append(
        f"the {config.data.name} dataset is not prepared in {config.data.data_dir}: get the "
        f"SEPS caption folder and the images, then run `{prepare.prepare_command(config.data)}`")
  if problems:
    raise SetupError(
        "Cannot start training: " + "; ".join(problems) + ". To train from random weights "
        "instead, pass --config.model.require_pretrained=False; for a run that needs nothing "
        "downloaded use --config=configs/grm_vit.py:demo.")


def _validate(config) -> None:
  """configs.common.validate (invalid values as one sentence, before anything is built); the
  repository's `configs` package is absent when gseps_jax is installed alone: nothing to check."""
  try:
    from configs import common  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  common.validate(config)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final metrics."""
  from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  _validate(config)
  preflight(config)
  pipeline.resolve_dense_max_len(config)  # 0 = full length: the concrete length, before saving
  workdir = fileio.absolute(workdir)
  is_main = jax.process_index() == 0
  ckpt_lib.check_workdir(workdir, config)  # another model's workdir: refuse before writing
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(workdir / "config.json", config.to_json_best_effort(indent=2))

  model = models.build_model(config.model)
  data = pipeline.TrainLoader.from_config(config, global_batch_size=config.train.batch_size,
                                         seed=config.seed, tokenizes_dense=model.tokenizes_dense,
                                         uses_dense=model.uses_dense)
  steps_per_epoch = data.steps_per_epoch
  total_steps = steps_per_epoch * config.train.num_epochs
  if config.train.max_steps > 0:
    total_steps = min(total_steps, config.train.max_steps)

  mesh = sharding.make_mesh(config.mesh)
  k = int(config.train.get("encoder_chunk", 0))
  if k > 1 and config.train.batch_size % (k * mesh.size):
    from configs import common  # pylint: disable=g-import-not-at-top
    raise common.ConfigError(
        f"config.train.batch_size = {config.train.batch_size} must be divisible by "
        f"train.encoder_chunk x devices = {k} x {mesh.size}: every encoder chunk is spread over "
        f"all devices. Change --config.train.batch_size or --config.train.encoder_chunk.")
  sample = state_lib.sample_batch(config)
  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)

  # The optimiser's labels need the param tree; build it abstractly first.
  tx, head_lr, _ = optim.make_optimizer(config.optim, steps_per_epoch,
                                        state_lib.abstract_params(model, sample),
                                        total_steps=total_steps)

  with jax.set_mesh(mesh):
    state, abstract, state_shardings = state_lib.create_train_state(
        config, model, tx, sample, mesh, init_rng, pretrained=state_lib.load_pretrained(config))
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                 best_metric="rsum" if config.checkpoint.keep_best else None)
    abstract = state_lib.with_shardings(abstract, state_shardings)
    try:
      restored = ckpt.restore(
          abstract, config, validate=_params_exploded, move_damaged=True,
          fresh_if_all_damaged=config.checkpoint.get("allow_restart_on_damage", False))
    except BaseException:
      ckpt.close()
      raise
    if restored is not None:
      state, saved_meta = restored
      data.set_state(saved_meta["data_state"])
      log.warning("Resumed from %s at step %d.", ckpt.directory, int(state.step))
    start_step = int(state.step)

    step_fn = jit_train_step(config, model, tx, mesh, state_shardings, steps_per_epoch)
    eval_every = config.train.eval_every if config.train.eval_every >= 0 else steps_per_epoch
    evaluator = (evaluator_lib.Evaluator(config, model, mesh, split=config.train.eval_on)
                 if eval_every > 0 else None)

    writer = metrics_log.MetricsWriter(workdir, resume_step=start_step)
    signals = install_signal_handlers()
    meta = {"config": config.to_dict(), "fingerprint": ckpt_lib.fingerprint(config)}
    t0 = time.time()
    last = {}
    progress = metrics_log.Progress(start_step, total_steps, is_main)
    try:
      for step in range(start_step, total_steps):
        local = next(data)
        batch = sharding.global_batch(local, mesh)
        state, metrics = step_fn(state, batch, train_rng)
        done = step + 1
        stop = _all_agree_to_stop(bool(signals) or (
            config.train.max_minutes > 0 and (time.time() - t0) / 60 > config.train.max_minutes))
        evaluate_now = (evaluator is not None and done % eval_every == 0 and
                        done != total_steps and not stop)
        save_now = (done % config.checkpoint.every_steps == 0 or evaluate_now or stop or
                    ckpt.reached_preemption(done))
        if (done % config.train.log_every == 0 or done == total_steps or
            done == start_step + 1 or save_now):
          # Never checkpoint a state whose loss is not finite.
          metrics = jax.device_get(metrics)
          _check_finite(done, metrics, config)
          metrics["lr"] = float(head_lr(done - 1))
          metrics["steps_per_s"] = (done - start_step) / (time.time() - t0)
          # Which images this process fed (cheap identity of the batch, for resume checks).
          metrics["batch_image_sum"] = float(np.sum(local["image_index"]))
          writer.write(done, metrics, "train/")
          progress.update(done, metrics)
          last = metrics
        eval_metrics = None
        if evaluate_now:
          eval_metrics = evaluator.run(state.params)
          writer.write(done, eval_metrics, f"{config.train.eval_on}/")
          progress.note(f"step {done} {config.train.eval_on} rsum {eval_metrics['rsum']:.1f}")
        if save_now:
          ckpt.save(done, state, dict(meta, data_state=data.get_state()),
                    metrics=eval_metrics and {"rsum": eval_metrics["rsum"]})
        if stop or ckpt.reached_preemption(done):
          log.warning("Stopping at step %d (%s); re-run the same command to resume.", done,
                      "signal" if signals else "time budget")
          break
    finally:
      progress.close()
      ckpt.wait()  # finish in-flight saves even when stopping on an error
    final_step = int(state.step)
    if final_step == total_steps and ckpt.latest_step() != final_step:
      ckpt.save(final_step, state, dict(meta, data_state=data.get_state()))
    ckpt.wait()
    results = {"step": final_step, "train": {k: float(v) for k, v in last.items()}}
    if config.train.final_eval_split and (
        final_step == total_steps or (config.train.max_minutes > 0 and not signals)):
      split = config.train.final_eval_split
      final_ev = evaluator_lib.Evaluator(config, model, mesh, split=split)
      final = final_ev.run(state.params)
      writer.write(final_step, final, f"{split}/")
      results[split] = final
      mode = final_ev.dense_mode if final_ev.uses_dense else None  # SEPS: always stated
      results["dense_mode"] = mode
      if is_main:  # written whole or not at all; a re-run replaces it
        fileio.atomic_write_text(workdir / "results.json", json.dumps(results, indent=2))
        print(evaluator_lib.format_table(final, title=f"{config.model.name} {split} "
                                    f"(step {final_step}"
                                    + (f", dense_mode={mode})" if mode else ")")))
    writer.close()
    ckpt.close()
    return results
