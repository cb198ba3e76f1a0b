"""The index directory: images encoded once (`build_index`), read back (`load_index`) and checked
against the checkpoint that queries it (`check_index`: model, preprocessing, weights)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import fileio
from gseps_jax import models
from gseps_jax.search import encoder
from gseps_jax.search import sources

INDEX_FORMAT = "gseps_jax.index/1"
# Config entries besides the fingerprint that change what an image's features are.
PREPROCESS_KEYS = ("data.image_size", "data.mean", "data.std")
# Relative tolerance of the weight summary: loose enough for another platform's reduction order,
# far tighter than one optimiser step moves a leaf's norm.
WEIGHTS_RTOL = 1e-4


class IndexMismatchError(ValueError):
  """An index is queried with a checkpoint (model, preprocessing or weights) it was not built by."""


def _get(cfg, dotted: str):
  node = cfg
  for k in dotted.split("."):
    if node is None or k not in node:
      return None
    node = node[k]
  return node.to_dict() if hasattr(node, "to_dict") else node


def _plain(x):
  return json.loads(json.dumps(x, default=list))


def weights_summary(params) -> list[list[float]]:
  """`[[size, sum, l2], ...]` per parameter leaf (sorted path order): identifies trained weights
  cheaply (one small reduction per leaf) without storing them."""
  leaves = jax.tree.leaves(params)
  stats = jax.jit(lambda ls: [jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                         jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))])
                              for x in ls])(leaves)
  stats = jax.device_get(stats)
  return [[int(np.size(x)), float(s[0]), float(s[1])] for x, s in zip(leaves, stats)]


def _weights_match(a: Sequence, b: Sequence) -> bool:
  if len(a) != len(b):
    return False
  for (na, sa, la), (nb, sb, lb) in zip(a, b):
    if na != nb or abs(la - lb) > WEIGHTS_RTOL * max(abs(lb), 1e-12):
      return False
    # |sum| <= l2 * sqrt(size): compare sums on that scale (they may cancel to ~0).
    if abs(sa - sb) > WEIGHTS_RTOL * (lb * math.sqrt(nb) + 1e-12):
      return False
  return True


@dataclasses.dataclass(frozen=True)
class Index:
  """A loaded index: `meta` (index.json) and host feature trees (.npy, memory-mapped if local)."""
  path: epath.Path
  meta: dict
  images: dict
  dense: dict | None
  captions: dict | None

  @property
  def names(self) -> list[str]:
    return [im["name"] for im in self.meta["images"]]

  @property
  def caption_texts(self) -> list[str] | None:
    """The dataset captions in order (caption j belongs to image j // captions_per_image)."""
    return self.meta.get("captions")


def _save_tree(directory: epath.Path, prefix: str, tree: dict) -> list[str]:
  files = []
  for key, value in sorted(tree.items()):
    name = f"{prefix}.{key}.npy"
    with (directory / name).open("wb") as f:
      np.save(f, np.asarray(value))
    files.append(name)
  return files


def _load_tree(directory: epath.Path, files: Sequence[str], prefix: str) -> dict:
  out = {}
  for name in files:
    p = directory / name
    if not p.is_file():
      raise FileNotFoundError(f"Index {directory} is incomplete: {name} is missing.")
    # Memory-map local indexes (only pages that are touched get read); a gs:// file cannot be
    # mapped, so it is read whole.
    out[name[len(prefix) + 1:-len(".npy")]] = (
        np.load(io.BytesIO(p.read_bytes())) if fileio.is_remote(p) else np.load(p, mmap_mode="r"))
  return out


def _image_batches(source: sources.ImageSource, retriever: encoder.Retriever,
                   batch_size: int) -> Iterable[tuple[np.ndarray, list[dict]]]:
  for start in range(0, len(source), batch_size):
    idx = list(range(start, min(len(source), start + batch_size)))
    records = source.read(idx)
    images = np.stack([retriever.preprocess(r["image"], source.names[i] or source.paths[i])
                       for i, r in zip(idx, records)])
    yield images, records


def dense_mode_for(config, source: sources.ImageSource) -> tuple[str, str]:
  """(dense mode, note) for indexing `source` with `config`'s model."""
  if not models.build_model(config.model).uses_dense:
    return "none", "The model has no dense-caption branch."
  if source.dense_available:
    return "honest", ("SEPS dense branch on: each image's own dense caption guides its "
                      "selection (honest mode).")
  return "sparse_only", (
      "This SEPS model has a dense-caption branch but the images have no dense captions (pass "
      "--dense=FILE.jsonl for a folder): scores use the sparse (query caption) branch only, so "
      "rankings differ from the two-branch model's.")


def build_index(retriever: encoder.Retriever, source: sources.ImageSource, out, *,
                checkpoint: str = "", step: int | None = None,
                overwrite: bool = False) -> epath.Path:
  """Encodes `source` once and writes the index directory `out` (may be `gs://`) atomically.

  Returns:
    The index directory.
  """
  config = retriever.config
  out = fileio.absolute(out)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists; pass --overwrite to replace it.")
  mode, note = dense_mode_for(config, source)
  feats, dense_texts, captions = [], [], []
  for images, records in _image_batches(source, retriever, retriever.batch_size):
    feats.append(retriever.encode_images(images))
    dense_texts += [r["dense"] for r in records]
    if source.is_dataset:
      captions += [c for r in records for c in r["captions"]]
  image_feats = encoder.concat(feats)
  dense_feats = retriever.encode_texts(dense_texts, dense=True) if mode == "honest" else None
  caption_feats = retriever.encode_texts(captions) if captions else None
  cpi = len(captions) // len(source) if captions else None

  with fileio.atomic_dir(out, overwrite=overwrite) as tmp:
    files = {"image": _save_tree(tmp, "image", image_feats)}
    if dense_feats is not None:
      files["dense"] = _save_tree(tmp, "dense", dense_feats)
    if caption_feats is not None:
      files["caption"] = _save_tree(tmp, "caption", caption_feats)
    meta = {
        "format": INDEX_FORMAT,
        "model": config.model.name,
        "fingerprint": ckpt_lib.fingerprint(config),
        "preprocess": {k: _plain(_get(config, k)) for k in PREPROCESS_KEYS},
        "checkpoint": str(fileio.absolute(checkpoint)) if checkpoint else "",
        "checkpoint_step": step,
        "weights": weights_summary(retriever.params),
        "source": source.description,
        "num_images": len(source),
        "images": [{"name": n, "path": p} for n, p in zip(source.names, source.paths)],
        "dense_mode": mode,
        "dense_note": note,
        "captions": captions or None,
        "captions_per_image": cpi,
        "files": files,
        "config": json.loads(config.to_json_best_effort()),
    }
    fileio.atomic_write_text(tmp / "index.json", json.dumps(meta, indent=1))
  return out


def load_index(path) -> Index:
  path = epath.Path(path)
  meta_file = path / "index.json"
  if not meta_file.is_file():
    raise FileNotFoundError(f"{path} is not an index (no index.json); build one with "
                            f"`python -m gseps_jax.retrieve index ...`.")
  meta = json.loads(meta_file.read_text())
  if meta.get("format") != INDEX_FORMAT:
    raise ValueError(f"{meta_file} has format {meta.get('format')!r}; this code reads "
                     f"{INDEX_FORMAT!r}. Rebuild the index.")
  files = meta["files"]
  return Index(path=path, meta=meta, images=_load_tree(path, files["image"], "image"),
               dense=_load_tree(path, files["dense"], "dense") if "dense" in files else None,
               captions=(_load_tree(path, files["caption"], "caption")
                         if "caption" in files else None))


def check_index(index: Index, config, params=None, *, checkpoint: str = "") -> None:
  """Raises IndexMismatchError unless `index` was built by this model, preprocessing and weights."""
  meta = index.meta
  rebuild = (f"Query it with the checkpoint it was built from ({meta.get('checkpoint') or '?'}, "
             f"step {meta.get('checkpoint_step')}), or rebuild it: python -m gseps_jax.retrieve "
             f"index --checkpoint={checkpoint or 'CKPT'} --images={meta.get('source')} "
             f"--out={index.path} --overwrite")
  mine = ckpt_lib.fingerprint(config)
  diffs = [k for k in ckpt_lib.FINGERPRINT_KEYS if meta["fingerprint"].get(k) != mine.get(k)]
  if diffs:
    detail = "; ".join(f"{k}: index={meta['fingerprint'].get(k)!r} vs checkpoint={mine.get(k)!r}"
                       for k in diffs[:3])
    raise IndexMismatchError(f"Index {index.path} was built with a different model than "
                             f"checkpoint {checkpoint or '(given)'} ({detail}). {rebuild}")
  pre = {k: _plain(_get(config, k)) for k in PREPROCESS_KEYS}
  diffs = [k for k in PREPROCESS_KEYS if meta["preprocess"].get(k) != pre[k]]
  if diffs:
    raise IndexMismatchError(
        f"Index {index.path} preprocessed images differently ("
        + "; ".join(f"{k}: index={meta['preprocess'].get(k)!r} vs checkpoint={pre[k]!r}"
                    for k in diffs) + f"). {rebuild}")
  if params is not None and not _weights_match(meta["weights"], weights_summary(params)):
    raise IndexMismatchError(
        f"Index {index.path} was encoded with other weights than checkpoint "
        f"{checkpoint or '(given)'} (same model, different parameter values): its features "
        f"would be scored against a different model. {rebuild}")
