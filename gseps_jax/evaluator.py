"""The retrieval evaluator: encode a split once, score every image x caption pair on the mesh.

`Evaluator(config, model, mesh, split=...).run(params) -> metrics` is what both
`python -m gseps_jax.evaluate` (evaluate.py) and the training loop (trainer.py) call. Images and
captions are encoded in batches sharded over the mesh; the model's tiled scorer (`model.score`)
runs under `jax.jit(shard_map)`, each device scoring its rows of images against every caption;
R@1/5/10, median/mean rank and rSum come from `metrics.py`. Nothing here asks which model it is:
the model says whether it needs dense captions (`model.uses_dense`), how to drop them
(`model.sparse_only()`) and which options its scorer takes (`model.score_options`).
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax import shard_map
from jax.sharding import PartitionSpec as P

from gseps_jax import metrics as metrics_lib
from gseps_jax import sharding
from gseps_jax.data import device_augment

PROTOCOLS = ("flickr1k", "coco1k", "coco5k", "all", "full")


def format_table(m: dict, title: str = "") -> str:
  cols = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
  head = " | ".join(f"{c:>7}" for c in cols)
  row = " | ".join(f"{m[c]:7.2f}" for c in cols)
  lines = [title, head, row] if title else [head, row]
  return "\n".join(lines)


def _gather(x):
  """Per-process-sharded features -> the full host array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def keep_ratios(img, txt) -> dict:
  """GRM's evaluation keep ratios: kept / valid tokens over the split, for features carrying
  'key_mask' and 'ori_mask' (keep_ratio_img, keep_ratio_txt); {} for other models."""
  out = {}
  for name, f in (("img", img), ("txt", txt)):
    if isinstance(f, dict) and "key_mask" in f and "ori_mask" in f:
      valid = np.asarray(f["ori_mask"], bool)
      out[f"keep_ratio_{name}"] = float(
          np.sum(np.asarray(f["key_mask"], bool) & valid) / max(int(valid.sum()), 1))
  return out


class Evaluator:
  """Encodes a split once and scores all image x caption pairs on the mesh.

  `run(params) -> dict` is what both the CLI and the training loop call.
  """

  def __init__(self, config, model, mesh, *, split: str, protocol: str | None = None,
               dense_mode: str | None = None, chunk: int | None = None, batch_size=None):
    from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    self.config, self.model, self.mesh = config, model, mesh
    self.split = split
    self.protocol = protocol or config.eval.protocol
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {self.protocol!r}.")
    self.dense_mode = dense_mode or config.eval.dense_mode
    self.chunk = chunk or config.eval.chunk
    self.batch_size = batch_size or config.eval.batch_size
    self.source = pipeline.open_split(config.data, split)
    self.tok = pipeline.tokenizer_from_config(config)
    self.pp = pipeline.Preprocess.from_config(config.data, dense=model.tokenizes_dense)
    self.num_workers = config.data.get("num_workers", 0)
    self.num_images = len(self.source)
    self.captions_per_image = 5
    self.num_captions = self.num_images * self.captions_per_image
    ndev = mesh.devices.size
    self.batch_size = -(-self.batch_size // ndev) * ndev  # whole batches per device
    self.uses_dense = model.uses_dense
    if self.uses_dense and split == "dev" and not config.eval.get("dev_use_dense", True):
      # Flickr30K/COCO ship no dense captions for dev: select models on the sparse branch
      # (same parameters, dense branch off), as the SEPS configs document.
      model = model.sparse_only()
      self.model = model
      self.uses_dense = False
    # A frozen pretrained text tower: its features come from the split's cache (built once).
    from gseps_jax.data import text_cache  # pylint: disable=g-import-not-at-top
    self.text_cache = text_cache.for_split(config, self.source, split, tok=self.tok)
    self.dense_cache = (text_cache.for_split(config, self.source, split, kind="dense",
                                             tok=self.tok) if self.uses_dense else None)
    opts = sharding.compiler_options(config)
    aug = device_augment.image_options(config.data)

    def encode_images(variables, image, *canvas_fields):  # canvas fields: device augmentation
      if canvas_fields:
        image = device_augment.augment(image, *canvas_fields, **aug)
      return model.apply(variables, image, method="encode_images")
    self._encode_img = jax.jit(encode_images, compiler_options=opts)
    self._image_keys = ["image"] + (list(device_augment.AUGMENT_KEYS) if self.pp.device_augment
                                    else [])
    self._encode_txt = jax.jit(functools.partial(model.apply, method="encode_texts"),
                               compiler_options=opts)
    self._scorers = {}  # dense_mode -> jitted scorer

  # -- encoding -------------------------------------------------------------------------------
  def _encode(self, params, batches, jobs, n):
    """Runs each `(fn, keys)` job over this process's slices of the global batches; returns one
    host feature tree [n, ...] per job, in dataset order on every process (positions are
    contiguous, so the padding is only at the end)."""
    bs = sharding.batch_sharding(self.mesh)
    out = [[] for _ in jobs]
    for batch in batches:
      for acc, (fn, keys) in zip(out, jobs):
        arrays = [jax.make_array_from_process_local_data(bs, np.asarray(batch[k])) for k in keys]
        acc.append(jax.tree.map(_gather, fn({"params": params}, *arrays)))
    return [jax.tree.map(lambda *xs: np.concatenate(xs, axis=0)[:n], *acc) for acc in out]

  def encode(self, params):
    """Host features (images, captions, dense captions or None), each in dataset order."""
    from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    kw = dict(global_batch_size=self.batch_size, num_workers=self.num_workers)
    jobs = [(self._encode_img, self._image_keys)]
    if self.uses_dense:
      jobs.append((self._encode_txt, ["dense_ids", "dense_mask"]
                   + (["dense_hidden"] if self.dense_cache is not None else [])))
    img_out = self._encode(params, pipeline.eval_image_batches(
        self.source, self.tok, self.pp, dense_cache=self.dense_cache, **kw), jobs,
                           self.num_images)
    (txt,) = self._encode(params, pipeline.eval_caption_batches(
        self.source, self.tok, self.pp, text_cache=self.text_cache, **kw),
                          [(self._encode_txt, ["input_ids", "attention_mask"]
                            + (["text_hidden"] if self.text_cache is not None else []))],
                          self.num_captions)
    return img_out[0], txt, (img_out[1] if self.uses_dense else None)

  # -- scoring --------------------------------------------------------------------------------
  def _make_scorer(self, mode):
    """jit(shard_map): each device scores its rows of images against every caption."""
    rows = P(sharding.BATCH_AXES)
    parity = self.uses_dense and mode == "parity"
    dense_spec = P() if parity else rows
    model, chunk = self.model, self.chunk

    def local(params, img, txt, dense, caption_image):
      kw = model.score_options(mode, caption_image if parity else None)
      return model.apply({"params": params}, img, txt, dense, chunk=chunk, method="score", **kw)

    def scorer(params, img, txt, dense, caption_image):
      f = shard_map(local, mesh=self.mesh,
                    in_specs=(P(), rows, P(), dense_spec, P()),
                    out_specs=rows, check_vma=False)
      return f(params, img, txt, dense, caption_image)

    return jax.jit(scorer, compiler_options=sharding.compiler_options(self.config))

  def scores(self, params, feats=None, *, dense_mode=None) -> jax.Array:
    """[n_images, n_captions] scores as a jax.Array whose rows are sharded over the mesh
    (`dense_mode`: default the evaluator's)."""
    mode = dense_mode or self.dense_mode
    img, txt, dense = feats if feats is not None else self.encode(params)
    ni = self.num_images
    ndev = self.mesh.devices.size
    img = jax.tree.map(lambda a: sharding.pad_rows_to_multiple(a, ndev), img)
    if dense is not None and not (mode == "parity"):
      dense = jax.tree.map(lambda a: sharding.pad_rows_to_multiple(a, ndev), dense)
    caption_image = np.arange(self.num_captions, dtype=np.int32) // self.captions_per_image
    if mode not in self._scorers:
      self._scorers[mode] = self._make_scorer(mode)
    sims = self._scorers[mode](params, img, txt, dense, caption_image)
    return sims[:ni]

  def leak_audit(self, params, *, seed: int = 0) -> dict:
    """Dense-caption leak audit: every dense mode scored with the dense captions as indexed and
    with them permuted among the images (`dense_derangement(seed)`: no image keeps its own).

    Parity pairs each caption with its ground-truth image's dense caption, so shuffling shows
    how much of its score comes from that answer; honest guides image i by dense_i, so shuffling
    shows how much the image-side description helps. The captions and images are encoded once;
    the permutation moves the encoded dense captions (each is encoded on its own, so this equals
    permuting the texts).

    Returns:
      {"seed", "derangement": True, "<mode>": {"unshuffled": metrics, "shuffled": metrics,
       "rsum_drop": unshuffled - shuffled rSum, "max_abs_score_change": max |S - S_shuffled|}
       for mode in parity, honest}.
    """
    if not self.uses_dense:
      raise ValueError(
          "--dense_shuffle needs a SEPS model with a dense branch evaluated on a split with "
          f"dense captions (model {self.config.model.name!r}, split {self.split!r}; dev has "
          "none unless config.eval.dev_use_dense).")
    feats = self.encode(params)
    img, txt, dense = feats
    perm = dense_derangement(self.num_images, seed)
    shuffled = (img, txt, jax.tree.map(lambda a: np.asarray(a)[perm], dense))
    out = {"seed": int(seed), "derangement": True}
    for mode in ("parity", "honest"):
      sims = {name: self.scores(params, f, dense_mode=mode)
              for name, f in (("unshuffled", feats), ("shuffled", shuffled))}
      res = {name: self._metrics(s) for name, s in sims.items()}
      res["rsum_drop"] = _rsum(res["unshuffled"]) - _rsum(res["shuffled"])
      res["max_abs_score_change"] = float(jnp.max(jnp.abs(sims["unshuffled"] - sims["shuffled"])))
      out[mode] = res
    return out

  def _metrics(self, sims) -> dict:
    cpi = self.captions_per_image
    if self.protocol in ("flickr1k", "coco5k", "full"):
      out = metrics_lib.retrieval_metrics(sims, cpi)
    elif self.protocol == "coco1k":
      out = metrics_lib.coco_1k_folds(sims, cpi)
    else:  # all
      out = {f"5k_{k}": v for k, v in metrics_lib.retrieval_metrics(sims, cpi).items()}
      out.update(metrics_lib.coco_1k_folds(sims, cpi))
    return {k: float(v) for k, v in out.items()}

  def run(self, params, *, save_scores: str | None = None) -> dict:
    t0 = time.time()
    feats = self.encode(params)
    t1 = time.time()
    sims = self.scores(params, feats)
    sims.block_until_ready()
    t2 = time.time()
    out = self._metrics(sims)
    out.update(keep_ratios(feats[0], feats[1]))
    out.update(encode_seconds=t1 - t0, score_seconds=t2 - t1, num_images=self.num_images,
               num_captions=self.num_captions)
    if save_scores and jax.process_index() == 0:
      with epath.Path(save_scores).open("wb") as f:
        np.save(f, _gather(sims))
    return out


def dense_derangement(n: int, seed: int) -> np.ndarray:
  """`[n]` permutation without fixed points (n >= 2): one n-cycle through a seeded random order,
  so image order[k] gets the dense caption of image order[k + 1]."""
  if n < 2:
    raise ValueError(f"--dense_shuffle needs at least 2 images, got {n}.")
  order = np.random.default_rng([int(seed), 0x5EB5]).permutation(n)
  perm = np.empty(n, np.int64)
  perm[order] = np.roll(order, -1)
  return perm


def _rsum(m: dict) -> float:
  return m["rsum"] if "rsum" in m else m["5k_rsum"]


def format_audit(audit: dict) -> str:
  """The leak audit as a table: rSum per dense mode, unshuffled / shuffled / drop."""
  lines = [f"dense-caption leak audit (dense captions permuted among images, seed "
           f"{audit['seed']})", f"{'dense_mode':>10} | {'rsum':>7} | {'shuffled':>8} | "
           f"{'drop':>7}"]
  for mode in ("parity", "honest"):
    r = audit[mode]
    lines.append(f"{mode:>10} | {_rsum(r['unshuffled']):7.2f} | {_rsum(r['shuffled']):8.2f} | "
                 f"{r['rsum_drop']:7.2f}")
  return "\n".join(lines)
