r"""Search with a trained checkpoint: `python -m gseps_jax.retrieve index | query | explain`.

  # Encode a folder of images (or a split of the checkpoint's dataset) once:
  python -m gseps_jax.retrieve index --checkpoint=runs/grm --images=photos/ --out=idx
  python -m gseps_jax.retrieve index --checkpoint=runs/grm --images=dataset:test --out=idx_test
  # Text -> images (top-k table, or --json), image -> captions:
  python -m gseps_jax.retrieve query --index=idx --text="a red circle left of a blue square" --k=5
  python -m gseps_jax.retrieve query --index=idx_test --image=photo.png --json
  python -m gseps_jax.retrieve query --index=idx --image=photo.png --captions=captions.txt
  # What the model selects (figure; or an HTML report for a file of "image<TAB>text" lines):
  python -m gseps_jax.retrieve explain --checkpoint=runs/grm --image=x.png --text="..." --out=x.png
  python -m gseps_jax.retrieve explain --checkpoint=runs/grm --queries=q.tsv --html=report.html

Index directory (`index` writes it into a temporary sibling directory and renames it, so a killed
run never leaves a half-written index):
  index.json            format, model name, full config, fingerprint, checkpoint path and step, a
                        summary of the weights, image names/paths, dense mode, feature file names.
  image.<leaf>.npy      `encode_images` output, leading axis = image (GRM: every level's token set
                        and mask: ori, ori_mask, key_mask, unc, unc_mask; SEPS: tokens).
  dense.<leaf>.npy      SEPS with a dense branch: each image's dense caption encoded ([Ni, Ld, D]).
  caption.<leaf>.npy    dataset indexes: the split's captions encoded (5 per image, in order), so
                        image queries rank them without re-encoding.

Dense captions (SEPS with a dense branch). Scores are honest-mode (`evaluate.py`): the dense caption
describes the CANDIDATE image. A dataset index uses the split's dense captions; a folder needs
`--dense=FILE.jsonl` (lines `{"image": "<file name>", "dense_caption": "..."}`), otherwise the
index is marked `dense_mode: "sparse_only"` and every score uses the sparse (query caption) branch
alone: rankings are then not those of the two-branch model, and the metadata says so.

Mismatches are errors, never silent: an index queried with a checkpoint of another model
(fingerprint), other preprocessing (image size / normalisation) or other weights (per-leaf norms)
raises `IndexMismatchError` naming what differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import fileio

INDEX_FORMAT = "gseps_jax.index/1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DATASET_PREFIX = "dataset:"
# Config entries besides the fingerprint that change what an image's features are.
PREPROCESS_KEYS = ("data.image_size", "data.mean", "data.std")
# Relative tolerance of the weight summary: loose enough for another platform's reduction order,
# far tighter than one optimiser step moves a leaf's norm.
WEIGHTS_RTOL = 1e-4


class IndexMismatchError(ValueError):
  """An index is queried with a checkpoint (model, preprocessing or weights) it was not built by."""


# ---------------------------------------------------------------------------------------------
# Small helpers.


def _get(cfg, dotted: str):
  node = cfg
  for k in dotted.split("."):
    if node is None or k not in node:
      return None
    node = node[k]
  return node.to_dict() if hasattr(node, "to_dict") else node


def _plain(x):
  return json.loads(json.dumps(x, default=list))


def uses_dense(config) -> bool:
  """Whether the model has a dense-caption branch (SEPS with `use_dense`; LAPS and GRM do not)."""
  return config.model.name == "seps" and bool(config.model.seps.get("use_dense", False))


def bucket(n: int, cap: int) -> int:
  """Padded batch size for `n` items: the next power of two, at most `cap`.

  Padding to a few sizes keeps the number of compiled programs small (log2(cap) + 1) while never
  spending more than 2x the compute on padding.
  """
  if n < 1:
    raise ValueError(f"Need at least one item, got {n}.")
  return min(cap, 1 << (n - 1).bit_length())


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) == n:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def _concat(trees: list) -> Any:
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *trees)


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


# ---------------------------------------------------------------------------------------------
# Image sources: a folder of files or a split of the checkpoint's dataset.


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """Images in a fixed order.

  Attributes:
    description: what was asked for (a folder path or `dataset:SPLIT`).
    names: display name per image (file name relative to the folder, or the dataset image id).
    paths: file path per image ("" for dataset records).
    read: `indices -> list of records` with 'image' (encoded bytes), 'captions' (list[str] or
      None) and 'dense' (str or None).
    dense_available: every image has a dense caption.
  """
  description: str
  names: list[str]
  paths: list[str]
  read: Callable[[Sequence[int]], list[dict]]
  dense_available: bool
  is_dataset: bool

  def __len__(self) -> int:
    return len(self.names)


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _read_dense_file(path, names: list[str]) -> dict[str, str]:
  """`{"image": name, "dense_caption": text}` lines -> name -> text (every image, no extras)."""
  out = {}
  with io.StringIO(fileio.read_utf8(path), newline=None) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        out[str(row["image"])] = str(row["dense_caption"])
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{lineno}: expected a JSON object with 'image' and "
                         f"'dense_caption', got {line.strip()[:80]!r} ({e}).") from e
  missing = [n for n in names if n not in out]
  unknown = sorted(set(out) - set(names))
  if missing or unknown:
    raise ValueError(
        f"--dense={path} must give one dense caption per image of the folder (keys = file names "
        f"relative to the folder): {len(missing)} images have none (e.g. {missing[:3]}), "
        f"{len(unknown)} entries name no image (e.g. {unknown[:3]}).")
  return out


def folder_source(folder, dense_file=None) -> ImageSource:
  """Every image file under `folder` (recursive, sorted by relative path)."""
  folder = Path(folder)  # local-path-ok: image folders the user passes are local
  if not folder.is_dir():
    raise FileNotFoundError(f"--images={folder} is neither a directory nor "
                            f"'{DATASET_PREFIX}SPLIT'.")
  files = sorted(p for p in folder.rglob("*")
                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
  if not files:
    raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}.")
  names = [p.relative_to(folder).as_posix() for p in files]
  dense = _read_dense_file(dense_file, names) if dense_file else None

  def read(indices):
    return [{"image": files[i].read_bytes(), "captions": None,
             "dense": dense[names[i]] if dense else None} for i in indices]

  return ImageSource(str(folder), names, [str(p.resolve()) for p in files], read,
                     dense_available=dense is not None, is_dataset=False)


def dataset_source(config, split: str) -> ImageSource:
  """The checkpoint config's dataset split, in dataset order (as `evaluate.py` sees it)."""
  from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  source = pipeline.open_split(config.data, split)
  n = len(source)
  if n == 0:
    raise ValueError(f"Split {split!r} of {config.data.name} is empty.")
  # One metadata pass (ids, dense flags); image bytes are read again batch by batch when encoding.
  names, has_dense = [], True
  for start in range(0, n, 256):
    batch = range(start, min(n, start + 256))
    for r in pipeline.read_records(source, batch):
      names.append(_text(r["image_id"]))
      has_dense &= bool(r.get("has_dense", True)) and bool(_text(r.get("dense_caption", "")))

  def read(indices):
    return [{"image": r["image"], "captions": [_text(c) for c in r["captions"]],
             "dense": _text(r["dense_caption"])}
            for r in pipeline.read_records(source, indices)]

  return ImageSource(f"{DATASET_PREFIX}{split}", names, [""] * n, read,
                     dense_available=has_dense, is_dataset=True)


def open_images(spec: str, config, dense_file=None) -> ImageSource:
  """`DIR` or `dataset:SPLIT` -> ImageSource."""
  if spec.startswith(DATASET_PREFIX):
    if dense_file:
      raise ValueError("--dense is for image folders; a dataset index uses the split's own dense "
                       "captions.")
    return dataset_source(config, spec[len(DATASET_PREFIX):])
  return folder_source(spec, dense_file)


# ---------------------------------------------------------------------------------------------
# Encoding and scoring.


class Retriever:
  """Jitted encoders and scorer for one restored model.

  Every batch is padded to `bucket(n, batch_size)` rows, so a session compiles at most
  log2(batch_size) + 1 programs per function whatever the query sizes.

  Attributes:
    config, model, params: as `trainer.restore_params` returns them.
    tok: the config's tokenizer; pp: its `pipeline.Preprocess`.
  """

  def __init__(self, config, model, params, *, batch_size: int | None = None,
               chunk: int | None = None):
    from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    self.config, self.model, self.params = config, model, params
    self.batch_size = int(batch_size or config.eval.batch_size)
    self.chunk = int(chunk or config.eval.chunk)
    self.tok = pipeline.tokenizer_from_config(config)
    self.pp = pipeline.Preprocess.from_config(config.data)
    self._encode_images = jax.jit(functools.partial(model.apply, method="encode_images"))
    self._encode_texts = jax.jit(functools.partial(model.apply, method="encode_texts"))
    self._scorers: dict[str, Callable] = {}

  # -- images ---------------------------------------------------------------------------------
  def preprocess(self, data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes -> `[S, S, 3]` float32 exactly as evaluation preprocesses them."""
    from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.eval_image(data, self.pp, name)

  def encode_images(self, images: np.ndarray) -> dict:
    """`[N, S, S, 3]` normalised images -> host feature tree, leading axis N."""
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = _pad_to(chunk, bucket(len(chunk), self.batch_size))
      feats = self._encode_images({"params": self.params}, padded)
      out.append(jax.tree.map(lambda a, n=len(chunk): np.asarray(a)[:n], feats))
    return _concat(out)

  # -- texts ----------------------------------------------------------------------------------
  def tokenize(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    return self.tok.encode_batch(list(texts), max_len)

  def encode_texts(self, texts: Sequence[str], *, dense: bool = False) -> dict:
    """Captions (or dense captions) -> host feature tree, leading axis len(texts)."""
    if not texts:
      raise ValueError("No texts to encode.")
    max_len = self.pp.dense_max_len if dense else self.pp.max_len
    ids, mask = self.tokenize(texts, max_len)
    out = []
    for start in range(0, len(texts), self.batch_size):
      i, m = ids[start:start + self.batch_size], mask[start:start + self.batch_size]
      n = bucket(len(i), self.batch_size)
      feats = self._encode_texts({"params": self.params}, _pad_to(i, n), _pad_to(m, n))
      out.append(jax.tree.map(lambda a, k=len(i): np.asarray(a)[:k], feats))
    return _concat(out)

  # -- scores ---------------------------------------------------------------------------------
  def _scorer(self, dense_mode: str) -> Callable:
    """dense_mode: 'none' (GRM / LAPS), 'honest' (per-image dense features) or 'sparse_only'
    (a SEPS model with a dense branch scored without it)."""
    if dense_mode not in self._scorers:
      model, kw = self.model, {}
      if self.config.model.name == "seps":
        if dense_mode == "sparse_only":
          model = model.clone(use_dense=False)  # same params: the head's weights are shared
        else:
          kw = {"dense_mode": "honest"}
      chunk = self.chunk

      def score(params, img, txt, dense):
        return model.apply({"params": params}, img, txt, dense, chunk=chunk, method="score",
                           **kw)

      self._scorers[dense_mode] = jax.jit(score)
    return self._scorers[dense_mode]

  def score(self, img_feats: dict, txt_feats: dict, dense_feats: dict | None = None, *,
            dense_mode: str = "none") -> np.ndarray:
    """`[Ni, Nc]` scores (row = image, column = caption); captions padded to a bucket size."""
    nc = len(jax.tree.leaves(txt_feats)[0])
    bs = self.batch_size
    n = bucket(nc, bs) if nc <= bs else -(-nc // bs) * bs
    txt = jax.tree.map(lambda a: _pad_to(np.asarray(a), n), txt_feats)
    dense = dense_feats if dense_mode == "honest" else None
    sims = self._scorer(dense_mode)(self.params, img_feats, txt, dense)
    return np.asarray(sims)[:, :nc]


# ---------------------------------------------------------------------------------------------
# The index.


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


def _image_batches(source: ImageSource, retriever: Retriever, batch_size: int
                   ) -> Iterable[tuple[np.ndarray, list[dict]]]:
  for start in range(0, len(source), batch_size):
    idx = list(range(start, min(len(source), start + batch_size)))
    records = source.read(idx)
    images = np.stack([retriever.preprocess(r["image"], source.names[i] or source.paths[i])
                       for i, r in zip(idx, records)])
    yield images, records


def dense_mode_for(config, source: ImageSource) -> tuple[str, str]:
  """(dense mode, note) for indexing `source` with `config`'s model."""
  if not uses_dense(config):
    return "none", "The model has no dense-caption branch."
  if source.dense_available:
    return "honest", ("SEPS dense branch on: each image's own dense caption guides its "
                      "selection (honest mode).")
  return "sparse_only", (
      "This SEPS model has a dense-caption branch but the images have no dense captions (pass "
      "--dense=FILE.jsonl for a folder): scores use the sparse (query caption) branch only, so "
      "rankings differ from the two-branch model's.")


def build_index(retriever: Retriever, source: ImageSource, out, *, checkpoint: str = "",
                step: int | None = None, overwrite: bool = False) -> epath.Path:
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
  image_feats = _concat(feats)
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


# ---------------------------------------------------------------------------------------------
# Queries.


def search_texts(retriever: Retriever, index: Index, texts: Sequence[str], k: int = 5
                 ) -> list[list[dict]]:
  """Text -> images. Returns per text the top-k hits `{rank, score, index, name, path}`."""
  txt = retriever.encode_texts(texts)
  sims = retriever.score(index.images, txt, index.dense, dense_mode=index.meta["dense_mode"])
  return [_top_k(sims[:, j], k, lambda i: {"name": index.meta["images"][i]["name"],
                                           "path": index.meta["images"][i]["path"]})
          for j in range(sims.shape[1])]


def search_image(retriever: Retriever, image: bytes, captions: Sequence[str], *, k: int = 5,
                 caption_feats: dict | None = None, dense_caption: str | None = None,
                 name: str = "query") -> tuple[list[dict], str]:
  """Image -> captions. Returns (top-k hits `{rank, score, index, caption}`, dense mode used).

  A SEPS model with a dense branch scores honestly with `dense_caption` (the query image's own
  dense caption) and with the sparse branch only when there is none.
  """
  img = retriever.encode_images(retriever.preprocess(image, name)[None])
  txt = caption_feats if caption_feats is not None else retriever.encode_texts(captions)
  mode, dense = "none", None
  if uses_dense(retriever.config):
    mode = "honest" if dense_caption else "sparse_only"
    if dense_caption:
      dense = retriever.encode_texts([dense_caption], dense=True)
  sims = retriever.score(img, txt, dense, dense_mode=mode)
  return _top_k(sims[0], k, lambda i: {"caption": captions[i]}), mode


def _top_k(scores: np.ndarray, k: int, describe) -> list[dict]:
  # Stable sort on -score: ties keep index order, so results are reproducible.
  order = np.argsort(-scores, kind="stable")[:k]
  return [dict(rank=r + 1, score=float(scores[i]), index=int(i), **describe(int(i)))
          for r, i in enumerate(order)]


def format_hits(hits: list[dict], label: str) -> str:
  """A plain-text table: rank, score, `label` column."""
  key = "caption" if label == "caption" else "name"
  width = max([len(label)] + [len(str(h[key])) for h in hits])
  lines = [f"{'rank':>4}  {'score':>9}  {label}", f"{'-' * 4}  {'-' * 9}  {'-' * width}"]
  lines += [f"{h['rank']:>4}  {h['score']:9.4f}  {h[key]}" for h in hits]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.


def _restore(checkpoint: str, data_dir: str | None = None):
  from gseps_jax import trainer  # pylint: disable=g-import-not-at-top
  config, _, _ = ckpt_lib.load_config_from_checkpoint(checkpoint)
  if data_dir:
    config.data.data_dir = data_dir
  return trainer.restore_params(checkpoint, config=config)


def _read_lines(path) -> list[str]:
  lines = [ln.rstrip("\n") for ln in fileio.read_utf8(path).splitlines()]
  lines = [ln for ln in lines if ln.strip()]
  if not lines:
    raise ValueError(f"{path} has no non-empty lines.")
  return lines


def cmd_index(args) -> int:
  config, model, params, step = _restore(args.checkpoint, args.data_dir)
  if args.overwrite:  # replacing --out must never delete what the index is built from
    fileio.check_out_not_source(
        args.out, ("--checkpoint workdir", ckpt_lib.resolve(args.checkpoint)[0]),
        ("--images folder", None if args.images.startswith(DATASET_PREFIX) else args.images),
        ("--dense file", args.dense), ("data_dir", config.data.get("data_dir")))
  retriever = Retriever(config, model, params, batch_size=args.batch_size)
  source = open_images(args.images, config, args.dense)
  out = build_index(retriever, source, args.out, checkpoint=args.checkpoint, step=step,
                    overwrite=args.overwrite)
  meta = json.loads((out / "index.json").read_text())
  print(f"Indexed {meta['num_images']} images from {source.description} with {config.model.name} "
        f"(step {step}) -> {out} [dense_mode={meta['dense_mode']}]")
  if meta["dense_mode"] == "sparse_only":
    print("Note: " + meta["dense_note"])
  return 0


def cmd_query(args) -> int:
  if bool(args.text) == bool(args.image):
    raise ValueError("query needs exactly one of --text or --image.")
  index = load_index(args.index)
  checkpoint = args.checkpoint or index.meta.get("checkpoint")
  if not checkpoint:
    raise ValueError(f"Index {args.index} records no checkpoint; pass --checkpoint.")
  # Model and preprocessing are checked from the checkpoint's JSON meta before any weights load.
  config, _, _ = ckpt_lib.load_config_from_checkpoint(checkpoint)
  check_index(index, config, checkpoint=checkpoint)
  config, model, params, step = _restore(checkpoint)
  check_index(index, config, params, checkpoint=checkpoint)
  retriever = Retriever(config, model, params)
  if args.text:
    hits = search_texts(retriever, index, [args.text], k=args.k)[0]
    result = {"query": {"text": args.text}, "direction": "text_to_image",
              "dense_mode": index.meta["dense_mode"], "hits": hits}
    label = "image"
  else:
    if args.captions:
      captions, caption_feats = _read_lines(args.captions), None
    elif index.caption_texts:
      captions, caption_feats = index.caption_texts, index.captions
    else:
      raise ValueError(f"--image needs captions to rank: pass --captions=FILE (one per line); "
                       f"index {args.index} was built from a folder and has none.")
    image = Path(args.image).read_bytes()  # local-path-ok: a query image the user passes
    hits, mode = search_image(retriever, image, captions, k=args.k,
                              caption_feats=caption_feats, dense_caption=args.dense_caption,
                              name=args.image)
    result = {"query": {"image": args.image}, "direction": "image_to_text", "dense_mode": mode,
              "hits": hits}
    label = "caption"
  result.update(model=config.model.name, checkpoint=str(checkpoint), checkpoint_step=step,
                index=str(index.path))
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    q = args.text if args.text else args.image
    print(f"{config.model.name} step {step}, top {len(hits)} for {q!r} "
          f"(dense_mode={result['dense_mode']}):")
    print(format_hits(hits, label))
  return 0


def cmd_explain(args) -> int:
  from gseps_jax import explain as explain_lib  # pylint: disable=g-import-not-at-top
  config, model, params, step = _restore(args.checkpoint)
  explainer = explain_lib.Explainer(config, model, params)
  if args.queries:
    if not args.html:
      raise ValueError("--queries writes an HTML report: pass --html=REPORT.html.")
    queries = []
    for ln in _read_lines(args.queries):
      if "\t" not in ln:
        raise ValueError(f"{args.queries}: expected 'image_path<TAB>text', got {ln[:80]!r}.")
      img, text = ln.split("\t", 1)
      queries.append((img, text))
    out = explain_lib.html_report(explainer, queries, args.html,
                                  title=f"{config.model.name} step {step}")
    print(f"Wrote {out} ({len(queries)} queries).")
    return 0
  if not (args.image and args.text and args.out):
    raise ValueError("explain needs --image, --text and --out (or --queries and --html).")
  fileio.check_out_not_source(args.out, ("--image", args.image))
  out, _ = explainer(args.image, args.text, out=args.out, dense_caption=args.dense_caption)
  print(f"Wrote {out}.")
  if args.html:
    explain_lib.html_report(explainer, [(args.image, args.text)], args.html,
                            title=f"{config.model.name} step {step}")
    print(f"Wrote {args.html}.")
  return 0


def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m gseps_jax.retrieve",
                              description=__doc__.split("\n", 1)[0])
  sub = p.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("-v", "--verbosity", type=int, default=-1,
                      help="-1 warnings (default), 0 INFO logs of orbax/JAX too, 1 debug.")
  ix = sub.add_parser("index", help="Encode images once into an index directory.",
                      parents=[common])
  ix.add_argument("--checkpoint", required=True,
                  help="Training workdir or WORKDIR/checkpoints/STEP.")
  ix.add_argument("--images", required=True, help="A folder of image files, or dataset:SPLIT.")
  ix.add_argument("--out", required=True, help="Index directory to write.")
  ix.add_argument("--dense", default=None, help="JSONL of per-image dense captions (folders).")
  ix.add_argument("--batch_size", type=int, default=None, help="Default: config eval.batch_size.")
  ix.add_argument("--data_dir", default=None, help="Override config.data.data_dir.")
  ix.add_argument("--overwrite", action="store_true", help="Replace an existing index.")
  ix.set_defaults(fn=cmd_index)
  q = sub.add_parser("query", help="Text -> images or image -> captions.", parents=[common])
  q.add_argument("--index", required=True)
  q.add_argument("--checkpoint", default=None, help="Default: the one recorded in the index.")
  q.add_argument("--text", default=None)
  q.add_argument("--image", default=None)
  q.add_argument("--captions", default=None, help="Captions to rank for --image, one per line.")
  q.add_argument("--dense_caption", default=None, help="SEPS: the query image's dense caption.")
  q.add_argument("--k", type=int, default=5)
  q.add_argument("--json", action="store_true", help="Machine-readable output.")
  q.set_defaults(fn=cmd_query)
  e = sub.add_parser("explain", help="Figure of what the model selects for (image, text).",
                     parents=[common])
  e.add_argument("--checkpoint", required=True)
  e.add_argument("--image", default=None)
  e.add_argument("--text", default=None)
  e.add_argument("--dense_caption", default=None, help="SEPS: the image's dense caption.")
  e.add_argument("--out", default=None, help="PNG to write.")
  e.add_argument("--queries", default=None, help="File of 'image_path<TAB>text' lines.")
  e.add_argument("--html", default=None, help="Self-contained HTML report to write.")
  e.set_defaults(fn=cmd_explain)
  return p


# Arguments that name files or folders (resolved once, before any command runs).
PATH_ARGS = ("checkpoint", "out", "dense", "data_dir", "index", "image", "captions", "html",
             "queries")


def _dispatch(args) -> int:
  if getattr(args, "k", 1) < 1:
    raise ValueError(f"--k must be >= 1, got {args.k}.")
  for name in PATH_ARGS:
    if getattr(args, name, None):
      setattr(args, name, fileio.resolve_path(getattr(args, name)))
  images = getattr(args, "images", None)
  if images and not images.startswith(DATASET_PREFIX):
    args.images = fileio.resolve_path(images)
  return args.fn(args)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses `argv` and runs the command; errors propagate (the console entry is `_cli`)."""
  return _dispatch(make_parser().parse_args(argv))


def _cli() -> None:
  from gseps_jax import cli  # pylint: disable=g-import-not-at-top
  args = make_parser().parse_args()
  cli.setup_logging(args.verbosity)
  if args.command == "index":
    cli.quiet_data_progress()
  # Every error this module raises for a user's input is a ValueError (IndexMismatchError too).
  sys.exit(cli.run(_dispatch, args, user_errors_extra=(IndexMismatchError, ValueError)))


if __name__ == "__main__":
  _cli()
