"""One fixed batch through the tiny model's real train step on whatever devices and processes this
process is part of; process 0 writes OUT/<mesh name>.npz with

  grad/<param path>   the gradient of the loss (before clipping and the optimiser), gathered
  param/<param path>  the parameters after STEPS steps of the trainer's optimiser
  loss, grad_norm     per step, as the compiled train step reports them

  python tests/_grad_worker.py MODEL OUT '{"one": {"data": 1, "fsdp": 1, "devices": 1},
                                         "eight": {"data": 4, "fsdp": 2}}' [STEPS] [pipeline]
                                         [batch=N] [nodropout]

Each named mesh (over the first `devices` devices, default all) is run in turn in this process,
on the same code, and written to OUT/<name>.npz by process 0. A mesh entry may also set
`encoder_chunk` (train.encoder_chunk: contrastive gradient caching) for its run; `nodropout`
turns dropout off in every run (chunked and full-batch dropout masks differ by design).

The batch is a fixed random one, or with `pipeline` the first batch of the tiny generated dataset
as the training data loader gives it (each process reads only its own slice).

The learning rate is large (1e-2 for every parameter, backbone included; no weight decay, no
clipping) so that every leaf moves by ~lr per step: a wrong sharded gradient changes parameters
by far more than reduction-order noise. Used by tests/test_train_sharded.py (8 fake devices in one
process) and tests/test_train.py (two cooperating processes).
"""

import faulthandler
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from gseps_jax import distributed  # pylint: disable=g-import-not-at-top

BATCH = 8
LR = 1e-2


def fixed_batch(config):
  """The same global batch on every process (a pure function of the config's shapes)."""
  from gseps_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  batch = state_lib.sample_batch(config, batch_size=BATCH)
  batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
  batch["input_ids"] = rng.integers(1000, 5000, size=batch["input_ids"].shape).astype(np.int32)
  batch["dense_ids"] = rng.integers(1000, 5000, size=batch["dense_ids"].shape).astype(np.int32)
  batch["attention_mask"][:, 10:] = 0
  batch["attention_mask"][1::2, 6:] = 0  # varied caption lengths
  return batch


def compare(ref, got) -> list[str]:
  """Why run `got` does not train like the reference run `ref` (both loaded npz); [] if it does.

  * loss and grad_norm of every step: relative 1e-5 (fp32 reductions in another order);
  * the gradient, leaf by leaf: |g - g_ref| / |g_ref| < 1e-4 (L2 over the leaf; measured <= 1e-6),
    with a floor of 1e-4 x the global gradient norm for leaves whose exact gradient is 0 (a bias
    under a softmax: attention key biases, the SEPS aggregation's last bias);
  * the parameters after the steps: every leaf with a non-zero gradient moved by at least lr/2
    in the reference, and agrees within lr/100 on at least 98% of its elements (99.5% over all
    parameters); zero-gradient leaves are only bounded (Adam turns their noise into ~lr steps).
    Adam divides by |g|, so elements whose
    gradient is ~0 at some step carry the reduction-order noise (measured: <= 0.6% of a leaf's
    elements, up to 0.4 lr); a wrong update or a wrongly sharded optimiser state moves most
    elements by ~lr.
  A gradient summed instead of averaged over the batch or the devices, a missing or doubled
  shard, or a wrong all-reduce fails the first two checks (Adam alone would hide a scale error).
  """
  bad = []
  for key in ("loss", "grad_norm"):
    if not np.allclose(got[key], ref[key], rtol=1e-5, atol=0):
      bad.append(f"{key} per step {got[key].tolist()} != reference {ref[key].tolist()}")
  grads = sorted(k for k in ref.files if k.startswith("grad/"))
  if sorted(k for k in got.files if k.startswith("grad/")) != grads:
    return bad + ["different parameter trees"]
  floor = 1e-4 * float(np.sqrt(sum(np.sum(ref[k].astype(np.float64) ** 2) for k in grads)))
  off_total = size_total = 0
  for k in grads:
    g, r = got[k].astype(np.float64), ref[k].astype(np.float64)
    rel = np.linalg.norm(g - r) / max(np.linalg.norm(r), floor)
    if not rel < 1e-4:
      bad.append(f"{k}: relative error {rel:.2e} (|g| {np.linalg.norm(g):.3e}, reference "
                 f"{np.linalg.norm(r):.3e})")
    name = k[len("grad/"):]
    p, q, init = got[f"param/{name}"], ref[f"param/{name}"], ref[f"init/{name}"]
    moved = float(np.max(np.abs(q - init)))
    if np.linalg.norm(r) > floor and moved < LR / 2:
      bad.append(f"param/{name} moved only {moved:.2e} (lr {LR}): the test would not see it")
    if np.linalg.norm(r) <= floor:  # exact gradient 0: Adam turns the noise into steps of ~lr
      if float(np.max(np.abs(p - q))) > 2.5 * LR * len(ref["loss"]):
        bad.append(f"param/{name} (zero gradient) moved apart by "
                   f"{float(np.max(np.abs(p - q))):.2e}")
      continue
    off = int(np.sum(np.abs(p - q) > LR / 100))
    off_total, size_total = off_total + off, size_total + q.size
    if off > 0.02 * q.size:
      bad.append(f"param/{name}: {off} of {q.size} elements differ by more than lr/100 (max "
                 f"{float(np.max(np.abs(p - q))):.2e})")
  if off_total > 0.005 * size_total:
    bad.append(f"{off_total} of {size_total} parameters differ by more than lr/100")
  return bad


def main():
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  model_name, out, meshes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  extra = sys.argv[4:]
  steps = int(extra[0]) if extra and extra[0].isdigit() else 2
  from_pipeline = "pipeline" in extra
  global BATCH
  BATCH = int(dict(a.split("=", 1) for a in extra if "=" in a).get("batch", BATCH))
  distributed.maybe_initialize()
  import jax  # pylint: disable=g-import-not-at-top
  import tiny  # pylint: disable=g-import-not-at-top
  from gseps_jax import models, optim, sharding, trainer  # pylint: disable=g-import-not-at-top
  from gseps_jax import state as state_lib  # pylint: disable=g-import-not-at-top

  config = tiny.tiny_config(model_name)
  config.fsdp_min_size = 0  # split every kernel whose first dim divides by fsdp
  config.optim.update(lr=LR, backbone_lr_mult=1.0, weight_decay=0.0, clip_norm=1e9,
                      warmup_steps=0)
  # No all-negative warm-up epoch: its first batch weighs 0 (i / n_batches), a zero gradient.
  config.loss.warmup_epochs = 0
  if "nodropout" in extra:
    for tower in (config.model.vision, config.model.text):
      tower.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = models.build_model(config.model)
  batch = fixed_batch(config)
  key = jax.random.key(0)  # the init key of every run compared
  abstract = state_lib.abstract_params(model, batch)
  steps_per_epoch = 4
  tx, _, _ = optim.make_optimizer(config.optim, steps_per_epoch, abstract)
  pid, n = jax.process_index(), jax.process_count()
  if from_pipeline:
    from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    tiny.ensure_data(config)
    m = models.build_model(config.model)
    loader = pipeline.TrainLoader.from_config(config, global_batch_size=BATCH, seed=0,
                                              tokenizes_dense=m.tokenizes_dense,
                                              uses_dense=m.uses_dense)
    local = dict(next(loader))
    loader.close()
    batch = {k: np.concatenate([v] * n) for k, v in local.items()}  # shapes only (init)
    from gseps_jax.data import device_augment  # pylint: disable=g-import-not-at-top
    batch = {k: np.asarray(v) for k, v in  # the images the model reads (uint8 canvas -> float)
             device_augment.images_from_batch(batch, config.data).items()}
  else:
    local = {k: v[pid * BATCH // n:(pid + 1) * BATCH // n] for k, v in batch.items()}

  splits = {}
  base_config = config
  for name, mesh_cfg in meshes.items():  # one after the other, in this process: the same code
    mesh_cfg = dict(mesh_cfg)
    config = base_config.copy_and_resolve_references()
    config.train.encoder_chunk = int(mesh_cfg.pop("encoder_chunk", 0))

    def grads_of(params, gb, rng, step):  # a new function per mesh: nothing cached across them
      return trainer.value_and_grad(params, gb, jax.random.fold_in(rng, step), step, model=model,
                                    config=config, steps_per_epoch=steps_per_epoch)[1]

    devices = mesh_cfg.pop("devices", None)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:devices] if devices else None)
    rep = sharding.replicated(mesh)
    with jax.set_mesh(mesh):
      state, _, shardings = state_lib.create_train_state(config, model, tx, batch, mesh, key)
      gb = sharding.global_batch(local, mesh)
      rng = jax.random.key(1)
      # The gradient the first train step sees (train_step folds the step into the key the same
      # way), gathered to every process.
      grads = jax.jit(grads_of, in_shardings=(shardings.params, sharding.batch_sharding(mesh),
                                              rep, rep), out_shardings=rep)(
                                                  state.params, gb, rng, state.step)
      init = jax.jit(lambda p: p, out_shardings=rep)(state.params)
      step_fn = trainer.jit_train_step(config, model, tx, mesh, shardings, steps_per_epoch)
      losses, norms = [], []
      for _ in range(steps):
        state, metrics = step_fn(state, gb, rng)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
      params = jax.jit(lambda p: p, out_shardings=rep)(state.params)
    arrays = {}
    for prefix, tree in (("grad", grads), ("init", init), ("param", params)):
      for path, x in jax.tree_util.tree_leaves_with_path(tree):
        arrays[f"{prefix}/{sharding.path_str(path)}"] = np.asarray(x)
    splits[name] = [sharding.path_str(p) for p, x in
                    jax.tree_util.tree_leaves_with_path(state.params)
                    if "fsdp" in str(x.sharding.spec)]
    if pid == 0:
      np.savez(os.path.join(out, f"{name}.npz"), loss=np.asarray(losses),
               grad_norm=np.asarray(norms), **arrays)
  print("RESULT " + json.dumps({"process_index": pid, "devices": jax.device_count(),
                                "split": splits}), flush=True)


if __name__ == "__main__":
  main()
