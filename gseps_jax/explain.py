"""Pictures of what a model selects for one (image, caption): figures and self-contained HTML.

`explain(config, model, params, image, text, out=None)` returns (the PNG path, or the matplotlib
Figure when `out` is None) and the arrays it drew:

  image              `[S, S, 3] uint8` the image as the model sees it (resized, not normalised).
  grid               (h, w) patch grid of the vision encoder at this image size.
  kept_tokens        `[L] bool` kept image tokens. GRM: the saliency adapter's keep mask over all
                     tokens (CLS included for ViT), equal to `encode_images(...)['key_mask']`.
                     SEPS: the top-K patches chosen for THIS caption by the sparse branch (CLS is
                     always kept and not listed).
  kept_patches       `[h, w] bool` the same over the patch grid.
  words, word_positions   the caption's wordpieces and their token positions (no [CLS]/[SEP]).
  word_patch, word_patch_cos   per word the patch (row-major index) with the highest cosine
                     between the word token and the patch token, and that cosine.
  GRM only:  keep_prob `[h, w]`, region_attention `[K, h, w]` (Â over patches),
             region_attention_cls `[K]` (Â on CLS; zeros for Swin), region_sigma `[K]` (mean over
             dimensions of exp(0.5 log sigma^2)), text_kept `[n_words] bool` (text adapter).
  SEPS only: k, selection_score `[h, w]` (cos(x_n, mean x) + cos(x_n, caption mean)),
             dense_kept_patches `[h, w] bool` (selection guided by `dense_caption`) or None.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend change); a
figure is 2 rows x `num_columns(arrays)` panels of `PANEL_PX` pixels.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from gseps_jax.models import sdtps

DPI = 100
PANEL_IN = 3.0  # inches; PANEL_IN * DPI is an integer so the PNG size is exact
PANEL_PX = int(PANEL_IN * DPI)
MIN_COLUMNS = 4  # image, kept patches, word labels, word table


# ---------------------------------------------------------------------------------------------
# Model internals: `model.explain_image` / `model.explain_text` (eval mode) give the arrays; the
# model's `explain_kind` says which picture they make ('regions': GRM's saliency keep mask and
# region maps; 'selection': SEPS's top-K patch selection).


def seps_selection(img: dict, glo: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The SEPS head's patch selection (as `sdtps.sdtps_tokens`): score and top-k keep mask.

  Args:
    img: per-image cache of `SEPSHead.prepare_images` for Ni images (xn `[Ni, N, D]`,
      self_attn `[Ni, N]`).
    glo: `[Ni, D]` the guiding text's normalised mean (`prepare_texts(...)['glo']`).
    k: kept patches.

  Returns:
    score `[Ni, N]` = cos(x_n, mean x) + cos(x_n, text mean); keep `[Ni, N]` bool, the k highest
    (ties: lower index first, as `lax.top_k`).
  """
  score = img["self_attn"] + jnp.einsum("ind,id->in", img["xn"], glo,
                                        precision=jax.lax.Precision.HIGHEST)
  return score, sdtps.topk_keep(score, k)


def _normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------
# Inputs.


def image_bytes(image) -> tuple[bytes, str]:
  """A path, encoded bytes, PIL image or `[H, W, 3] uint8` array -> (encoded bytes, name).

  Arrays and PIL images are encoded losslessly (PNG), so every input goes through the same
  decode + resize + normalise path as evaluation (`pipeline.eval_image`).
  """
  if isinstance(image, (str, os.PathLike)):
    path = epath.Path(image)  # a local file or gs://
    if not path.is_file():
      raise FileNotFoundError(f"Image {path} does not exist.")
    return path.read_bytes(), str(path)
  if isinstance(image, (bytes, bytearray)):
    return bytes(image), "image bytes"
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"An image array must be [H, W, 3] uint8, got {image.shape} {image.dtype}.")
    image = Image.fromarray(image)
  if isinstance(image, Image.Image):
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), "PIL image"
  raise TypeError(f"Unsupported image type {type(image).__name__}: pass a path, bytes, a PIL "
                  f"image or a [H, W, 3] uint8 array.")


# ---------------------------------------------------------------------------------------------
# Explainer.


class Explainer:
  """Computes and draws the explanation arrays for one restored model (jitted once, reused)."""

  def __init__(self, config, model, params, tokenizer=None):
    from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    from gseps_jax.models import encoders  # pylint: disable=g-import-not-at-top
    self.config, self.model, self.params = config, model, params
    self.name = config.model.name  # titles only
    self.kind = getattr(model, "explain_kind", None)
    if self.kind not in _KIND_ARRAYS:
      raise ValueError(f"explain draws {sorted(_KIND_ARRAYS)} models; {self.name!r} declares "
                       f"explain_kind={self.kind!r}.")
    self.tok = tokenizer or pipeline.tokenizer_from_config(config)
    self.pp = pipeline.Preprocess.from_config(config.data)
    self.grid = tuple(int(g) for g in encoders.encoder_grid(config.model.vision,
                                                            self.pp.image_size))
    self._image_fn = jax.jit(functools.partial(model.apply, method="explain_image"))
    self._text_fn = jax.jit(functools.partial(model.apply, method="explain_text"))

  def text_parts(self, ids: np.ndarray, mask: np.ndarray) -> dict:
    """`model.explain_text` of tokenised texts `[N, L]` (on device)."""
    return self._text_fn({"params": self.params}, ids, mask)

  # -- arrays ---------------------------------------------------------------------------------
  def _words(self, ids: np.ndarray, mask: np.ndarray) -> tuple[list[str], np.ndarray]:
    special = {self.tok.cls_id, self.tok.sep_id, self.tok.pad_id}
    pos = np.array([i for i in range(len(ids)) if mask[i] and int(ids[i]) not in special], int)
    return [self.tok.backend.id_to_token(int(ids[i])) for i in pos], pos

  def arrays(self, image, text: str, *, dense_caption: str | None = None) -> dict:
    """The explanation arrays (module docstring) for one image and caption."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from gseps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    data, name = image_bytes(image)
    s = self.pp.image_size
    shown = np.asarray(pipeline.decode_image(data, name).resize((s, s), Image.BICUBIC))
    x = pipeline.eval_image(data, self.pp, name)[None]
    ids, mask = self.tok.encode_batch([text], self.pp.max_len)
    words, pos = self._words(ids[0], mask[0])
    if not len(pos):
      raise ValueError(f"The caption {text!r} has no word tokens.")
    gh, gw = self.grid
    img = jax.device_get(self._image_fn({"params": self.params}, x))
    txt = jax.device_get(self.text_parts(ids, mask))
    out = {"image": shown, "grid": (gh, gw), "text": text, "words": words,
           "word_positions": pos}
    arrays, patches, word_vecs = _KIND_ARRAYS[self.kind](self, img, txt, pos, dense_caption)
    out.update(arrays)
    cos = word_vecs @ patches.T  # [n_words, N]
    out["word_patch"] = np.argmax(cos, axis=-1)
    out["word_patch_cos"] = np.max(cos, axis=-1)
    return out

  # -- drawing --------------------------------------------------------------------------------
  def figure(self, arrays: dict):
    """A matplotlib Figure (Agg canvas) of `arrays`, `figure_size_px(arrays)` pixels."""
    return draw(arrays, self.name)

  def __call__(self, image, text: str, *, out=None, dense_caption: str | None = None):
    """(PNG path if `out` else Figure, arrays)."""
    arrays = self.arrays(image, text, dense_caption=dense_caption)
    fig = self.figure(arrays)
    if out is None:
      return fig, arrays
    return save_png(fig, out), arrays


def _region_arrays(ex: Explainer, img: dict, txt: dict, pos: np.ndarray, dense_caption):
  """GRM ('regions'): SA keep mask and probability, region maps and sigmas, GA keep mask.
  Returns (arrays, normalised patch tokens [N, E], normalised word tokens [n_words, E])."""
  del dense_caption  # GRM reads no dense captions
  gh, gw = ex.grid
  tokens = img["tokens"][0]  # [L, E]
  c = tokens.shape[0] - gh * gw
  keep = img["keep"][0].astype(bool)
  attn = img["attn"][0]  # [L, K]
  arrays = dict(
      kept_tokens=keep, kept_patches=keep[c:].reshape(gh, gw),
      keep_prob=img["keep_prob"][0, c:].reshape(gh, gw),
      region_attention=attn[c:].T.reshape(-1, gh, gw),
      region_attention_cls=attn[:c].sum(0) if c else np.zeros(attn.shape[1], attn.dtype),
      region_sigma=np.exp(0.5 * img["logvar"][0]).mean(-1),
      text_kept=txt["keep"][0][pos].astype(bool))
  return arrays, _normalize(tokens[c:]), _normalize(txt["tokens"][0][pos])


def _selection_arrays(ex: Explainer, img: dict, txt: dict, pos: np.ndarray, dense_caption):
  """SEPS ('selection'): the top-K patches for the caption (and for `dense_caption`) and the
  selection score. Returns (arrays, normalised patches [N, D], normalised words [n_words, D])."""
  gh, gw = ex.grid
  n = img["x"].shape[1]
  if n != gh * gw:
    raise ValueError(f"SEPS image tokens have {n} patches, expected a {gh}x{gw} grid.")
  k = sdtps.num_kept(n, ex.model.rho)
  score, keep = seps_selection(img, txt["glo"], k)
  arrays = dict(k=k, kept_tokens=np.asarray(keep[0]),
                kept_patches=np.asarray(keep[0]).reshape(gh, gw),
                selection_score=np.asarray(score[0]).reshape(gh, gw), dense_kept_patches=None)
  if dense_caption:
    d_ids, d_mask = ex.tok.encode_batch([dense_caption], ex.pp.dense_max_len)
    dense = jax.device_get(ex.text_parts(d_ids, d_mask))
    _, d_keep = seps_selection(img, dense["glo"], k)
    arrays["dense_kept_patches"] = np.asarray(d_keep[0]).reshape(gh, gw)
  return arrays, img["xn"][0], txt["words"][0][pos]


_KIND_ARRAYS = {"regions": _region_arrays, "selection": _selection_arrays}


def explain(config, model, params, image, text: str, *, out=None,
            dense_caption: str | None = None):
  """One-shot `Explainer(config, model, params)(image, text, out=out)`: (path or Figure, arrays).

  Use an `Explainer` directly for several queries (it compiles the encoders once).
  """
  return Explainer(config, model, params)(image, text, out=out, dense_caption=dense_caption)


# ---------------------------------------------------------------------------------------------
# Drawing (pure functions of the arrays).


def num_columns(arrays: dict) -> int:
  k = len(arrays["region_attention"]) if "region_attention" in arrays else 0
  return max(MIN_COLUMNS, k)


def figure_size_px(arrays: dict) -> tuple[int, int]:
  """(width, height) in pixels of the figure `draw` makes for `arrays`."""
  return num_columns(arrays) * PANEL_PX, 2 * PANEL_PX


def _overlay(ax, arrays, alpha_map=None, cmap=None, values=None, title=""):
  gh, gw = arrays["grid"]
  ext = (0, gw, gh, 0)
  ax.imshow(arrays["image"], extent=ext, interpolation="bilinear")
  if alpha_map is not None:  # darken where alpha_map is high
    rgba = np.zeros((gh, gw, 4), np.float32)
    rgba[..., 3] = alpha_map
    ax.imshow(rgba, extent=ext, interpolation="nearest")
  if values is not None:
    ax.imshow(values, extent=ext, interpolation="nearest", cmap=cmap, alpha=0.6)
  ax.set_xlim(0, gw)
  ax.set_ylim(gh, 0)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=9)


def _outline(ax, mask, color):
  from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top
  for r, c in zip(*np.nonzero(mask)):
    ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor=color, linewidth=1.2))


def draw(arrays: dict, model_name: str):
  """Figure of the arrays: row 0 image | kept patches | word labels | word table; row 1 the K
  region maps with sigma ('regions' arrays, GRM) or the selection score and dense-guided
  selection ('selection' arrays, SEPS). `model_name` titles the figure."""
  regions = "region_attention" in arrays
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  ncols = num_columns(arrays)
  fig = Figure(figsize=(ncols * PANEL_IN, 2 * PANEL_IN), dpi=DPI)
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, ncols, squeeze=False)
  for ax in axes.ravel():
    ax.set_axis_off()
  gh, gw = arrays["grid"]
  kept = arrays["kept_patches"]
  fig.suptitle(f"{model_name}: {arrays['text']}"[:120], fontsize=10)

  ax = axes[0, 0]
  ax.set_axis_on()
  _overlay(ax, arrays, title="image")

  ax = axes[0, 1]
  ax.set_axis_on()
  n_kept = int(kept.sum())
  if regions:
    extra = ""
    if len(arrays["kept_tokens"]) > gh * gw:
      extra = ", CLS " + ("kept" if arrays["kept_tokens"][0] else "dropped")
    title = f"SA keep: {n_kept}/{gh * gw} patches{extra}"
  else:
    title = f"top-K for caption: {n_kept}/{gh * gw}"
  _overlay(ax, arrays, alpha_map=np.where(kept, 0.0, 0.7), title=title)
  _outline(ax, kept, "lime")

  ax = axes[0, 2]
  ax.set_axis_on()
  _overlay(ax, arrays, alpha_map=np.full((gh, gw), 0.45), title="word -> best patch")
  by_patch: dict[int, list[str]] = {}
  for w, p in zip(arrays["words"], arrays["word_patch"]):
    by_patch.setdefault(int(p), []).append(w)
  for p, ws in by_patch.items():
    r, c = divmod(p, gw)
    label = "\n".join(ws[:4] + (["..."] if len(ws) > 4 else []))
    ax.text(c + 0.5, r + 0.5, label, ha="center", va="center", fontsize=6, color="white",
            bbox=dict(facecolor="black", alpha=0.5, pad=0.5, linewidth=0))

  ax = axes[0, 3]
  rows = []
  for i, (w, p, cs) in enumerate(zip(arrays["words"], arrays["word_patch"],
                                     arrays["word_patch_cos"])):
    r, c = divmod(int(p), gw)
    flag = ""
    if "text_kept" in arrays:
      flag = " kept" if arrays["text_kept"][i] else " drop"
    rows.append(f"{w[:12]:<12} ({r},{c}) {cs:+.2f}{flag}")
  shown = rows[:24] + ([f"... {len(rows) - 24} more"] if len(rows) > 24 else [])
  ax.text(0.0, 1.0, "word  (row,col)  cos\n" + "\n".join(shown), va="top", ha="left",
          family="monospace", fontsize=6.5, transform=ax.transAxes)

  if regions:
    att, sig = arrays["region_attention"], arrays["region_sigma"]
    for k in range(len(att)):
      ax = axes[1, k]
      ax.set_axis_on()
      _overlay(ax, arrays, values=att[k], cmap="magma",
               title=f"region {k}: sigma {sig[k]:.3f}")
  else:
    ax = axes[1, 0]
    ax.set_axis_on()
    _overlay(ax, arrays, values=arrays["selection_score"], cmap="viridis",
             title="selection score")
    ax = axes[1, 1]
    dense = arrays.get("dense_kept_patches")
    if dense is not None:
      ax.set_axis_on()
      _overlay(ax, arrays, alpha_map=np.where(dense, 0.0, 0.7),
               title=f"top-K for dense caption: {int(dense.sum())}")
      _outline(ax, dense, "cyan")
    else:
      ax.text(0.5, 0.5, "no dense caption given", ha="center", va="center", fontsize=8,
              transform=ax.transAxes)
  return fig


def png_bytes(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI)
  return buf.getvalue()


def save_png(fig, out) -> epath.Path:
  """Writes the figure atomically (temporary file + rename; `out` may be on gs://)."""
  out = epath.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
  tmp.write_bytes(png_bytes(fig))
  tmp.replace(out)
  return out


def html_report(explainer: Explainer, queries: Sequence[tuple[Any, str]], out, *,
                title: str = "") -> epath.Path:
  """A self-contained HTML page (PNG figures embedded as base64) for (image, text) queries."""
  sections = []
  for image, text in queries:
    arrays = explainer.arrays(image, text)
    png = base64.b64encode(png_bytes(explainer.figure(arrays))).decode("ascii")
    gh, gw = arrays["grid"]
    facts = [f"kept patches: {int(arrays['kept_patches'].sum())}/{gh * gw}"]
    if "region_sigma" in arrays:
      facts.append("region sigma: " + ", ".join(f"{s:.3f}" for s in arrays["region_sigma"]))
    sections.append(
        f"<section><h2>{html.escape(text)}</h2><p>{html.escape(str(image))} &middot; "
        f"{html.escape(' · '.join(facts))}</p>"
        f'<img alt="{html.escape(text, quote=True)}" src="data:image/png;base64,{png}"></section>')
  page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>"
          f"{html.escape(title or 'gseps_jax explain')}</title><style>body{{font-family:sans-serif;"
          "margin:2em}img{max-width:100%}section{margin-bottom:2em}</style></head><body>"
          f"<h1>{html.escape(title or 'gseps_jax explain')}</h1>" + "".join(sections)
          + "</body></html>\n")
  out = epath.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
  tmp.write_text(page, encoding="utf-8")
  tmp.replace(out)
  return out
