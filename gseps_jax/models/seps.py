"""SEPS in Flax: encoders + projections + the SDTPS/HRPA head, as Linen modules.

The head's computation (selection, aggregation, HRPA, the tiled all-pairs scorer, the dense
modes and the selection gradients) is pure and lives in `models/sdtps.py`; this module holds its
parameters (`AggregationNet`, `SEPSHead`, the official `cross_net`) and the full model `SEPS` with
the model interface of docs/design.md. The official checkpoint layout is converted by
`interop/official_seps.py`.
"""

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from gseps_jax.models import encoders
from gseps_jax.models import layers
from gseps_jax.models import sdtps

AGGR_LN_EPS = 1e-5  # torch.nn.LayerNorm default, used by the official aggregation net

Array = jax.Array


def backbone_num_patches(vision_cfg) -> int:
  """Spatial tokens (CLS excluded) of the vision backbone at its configured image size: the
  official `num_patches` (196 / 576 for ViT-B/16 at 224 / 384, 49 / 144 for Swin-B)."""
  h, w = encoders.encoder_grid(vision_cfg)
  return h * w


# ----------------------------------------------------------------------------------------------
# Linen modules.
# ----------------------------------------------------------------------------------------------
class AggregationNet(nn.Module):
  """Per-patch aggregation logits: scale * Linear(GELU(Linear(LayerNorm(x)))).

  Official `TokenAggregation.weight` (+ `scale`); every layer acts per token, so the logits of any
  subset of patches are a gather of these. [..., N, D] -> [..., N, num_out].
  """
  num_out: int
  dim_ratio: float = 0.2

  @nn.compact
  def __call__(self, x: Array) -> Array:
    hidden = int(x.shape[-1] * self.dim_ratio)
    h = nn.LayerNorm(epsilon=AGGR_LN_EPS, use_fast_variance=False, name="norm")(x)
    h = nn.Dense(hidden, precision=lax.Precision.HIGHEST, name="fc1")(h)
    h = layers.gelu(h)
    h = nn.Dense(self.num_out, precision=lax.Precision.HIGHEST, name="fc2")(h)
    scale = self.param("scale", nn.initializers.ones, (), jnp.float32)
    return h * scale


class HeadSettings(nn.Module):
  """The SEPS head's settings, declared once: `SEPSHead` scores with them, `SEPS` carries them
  and builds its head from them (`head_settings`).

  Attributes:
    num_aggregated: N_c aggregated tokens per selection.
    rho: keep ratio (K = ceil(N * rho)).
    dim_ratio: hidden width of the aggregation net, as a fraction of the token width.
    use_sparse, use_dense: which branches are summed (LAPS = sparse only).
    dense_mode: "parity" | "honest" (module docstring); SEPS: the training pairing and the
      default for `score`.
    selection: "official" | "straight_through" (module docstring).
    st_temperature: soft-mask temperature of the straight-through backward pass.
    precision: matmul precision name ("highest" matches PyTorch fp32).
    gather_kept: "auto" | "on" | "off", contract over the kept patches only (`sdtps`).
  """
  num_aggregated: int
  rho: float = 0.5
  dim_ratio: float = 0.2
  use_sparse: bool = True
  use_dense: bool = True
  dense_mode: str = "honest"
  selection: str = "official"
  st_temperature: float = 0.05
  precision: str = "highest"
  gather_kept: str = "auto"

  def head_settings(self) -> dict:
    """{field: value} of the `HeadSettings` fields (the keyword arguments of `SEPSHead`)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(HeadSettings)
            if f.name not in ("parent", "name")}


class SEPSHead(HeadSettings):
  """SDTPS + HRPA pair scorer over projected token sets (the official `cross_net`), with the
  settings of `HeadSettings`."""

  def setup(self):
    if self.selection not in sdtps.SELECTIONS:
      raise ValueError(f"selection must be one of {sdtps.SELECTIONS}, got {self.selection!r}.")
    if self.dense_mode not in sdtps.DENSE_MODES:
      raise ValueError(f"dense_mode must be one of {sdtps.DENSE_MODES}, got "
                       f"{self.dense_mode!r}.")
    sdtps.gather_kept_default(self.gather_kept, self.selection)  # raises on a bad combination
    self.aggr_net = AggregationNet(self.num_aggregated, self.dim_ratio)

  def prepare_images(self, tokens: Array) -> dict:
    """Per-image quantities that do not depend on the text.

    Args:
      tokens: [Ni, L, D] raw projected image tokens ([CLS] first iff L is not a square).
    Returns:
      dict(cls=[Ni, C, D], x=[Ni, N, D], xn=[Ni, N, D] normalised patches, self_attn=[Ni, N]
      cos(x_n, mean x), logits=[Ni, N, N_c] aggregation logits).
    """
    tokens = tokens.astype(jnp.float32)
    c = 1 if sdtps.has_cls(tokens.shape[1]) else 0
    cls, x = tokens[:, :c], tokens[:, c:]
    if self.selection == "official":
      x = lax.stop_gradient(x)  # the official selection/gather/fusion run under no_grad
    xn = sdtps.l2_normalize(x)
    glo = sdtps.l2_normalize(jnp.mean(x, axis=1))
    self_attn = jnp.einsum("ind,id->in", xn, glo, precision=sdtps.PRECISIONS[self.precision])
    return dict(cls=cls, x=x, xn=xn, self_attn=self_attn, logits=self.aggr_net(x))

  def prepare_texts(self, tokens: Array, mask: Array) -> dict:
    """`prepare_texts`, with the selection guide detached in "official" selection."""
    out = sdtps.prepare_texts(tokens, mask)
    if self.selection == "official":
      out["glo"] = lax.stop_gradient(out["glo"])
    return out

  def __call__(self, img_tokens: Array, cap_tokens: Array, cap_mask: Array,
               dense_tokens: Optional[Array] = None, dense_mask: Optional[Array] = None, *,
               dense_mode: Optional[str] = None, chunk=None,
               dense_index: Optional[Array] = None, gather_batch: int = 1) -> Array:
    """Scores every (image, caption) pair.

    Args:
      img_tokens: [Ni, L, D] projected image tokens.
      cap_tokens, cap_mask: [Nc, Lt, D], [Nc, Lt] captions.
      dense_tokens, dense_mask: [Nd, Ld, D], [Nd, Ld] dense captions, Nd = Nc ("parity",
        caption j's dense caption) or Ni ("honest", image i's dense caption).
      dense_mode: overrides the attribute (e.g. evaluate a parity-trained model honestly).
      chunk: pair tile, see `pair_scores`.
      dense_index: parity mode: [Nc] row of caption j's dense caption in `dense_tokens`, which
        then holds each distinct dense caption once (see `pair_scores`).
      gather_batch: captions per iteration of the kept-patch loop (see `pair_scores`; the
        evaluation path `SEPS.score` passes `sdtps.EVAL_GATHER_BATCH`).
    Returns:
      [Ni, Nc] scores.
    """
    img = self.prepare_images(img_tokens)
    cap = self.prepare_texts(cap_tokens, cap_mask)
    dense = None
    if self.use_dense:
      if dense_tokens is None or dense_mask is None:
        raise ValueError("use_dense=True needs dense_tokens and dense_mask.")
      dense = self.prepare_texts(dense_tokens, dense_mask)
    n = img["x"].shape[1]
    return sdtps.pair_scores(
        img, cap, dense, k=sdtps.num_kept(n, self.rho), use_sparse=self.use_sparse,
        use_dense=self.use_dense, dense_mode=dense_mode or self.dense_mode,
        selection=self.selection, st_temperature=self.st_temperature, chunk=chunk,
        precision=sdtps.PRECISIONS[self.precision], dense_index=dense_index,
        gather_kept=self.gather_kept, gather_batch=gather_batch)


# ----------------------------------------------------------------------------------------------
# The full model.
# ----------------------------------------------------------------------------------------------
class SEPS(HeadSettings, kw_only=True):
  """Encoders + projections + SEPS head, with the model interface of docs/design.md.

  Submodule names mirror the official checkpoint: `vision_encoder` (img_enc.visual_encoder),
  `vision_proj` (img_enc.vision_proj), `text_encoder` (txt_enc.bert), `fc` (txt_enc.fc),
  `cross_net` (cross_net; its parameters are `cross_net/aggr_net/...`). As in the official code a
  projection whose input width already equals `embed_dim` is the identity (no parameters).
  Build it with `SEPS.from_config(config.model)`.

  Attributes:
    vision, text: HF config dicts of the encoders.
    embed_dim: joint width D (512).
    num_aggregated, rho, dim_ratio, use_sparse, use_dense, dense_mode, selection,
      st_temperature, precision, gather_kept: the head settings (`HeadSettings`, inherited).
    eval_text_cut: parity-mode evaluation keeps only the first this-many text token FEATURES of
      the full-length encoding (official encode_data stores 90 positions); <= 0 disables.
    ratio_weight: weight of the reported (constant) official ratio term.
    freeze_text: stop gradients at the text encoder's output.
    train_chunk: pair tile for the in-batch [B, B] scores (None = one tile).
    dtype: encoder compute dtype; the head always computes in float32.
    remat: rematerialisation of the encoder blocks, "none" | "blocks" | "dots" (`model.remat`).
  """
  vision: Mapping[str, Any]
  text: Mapping[str, Any]
  embed_dim: int = 512
  eval_text_cut: int = 90
  ratio_weight: float = 2.0
  freeze_text: bool = False
  train_chunk: Optional[int] = None
  dtype: str = "float32"
  remat: str = "none"

  @classmethod
  def from_config(cls, model_cfg) -> "SEPS":
    """`config.model` (with a `seps` sub-config, see configs/seps_vit.py) -> SEPS."""
    sc = model_cfg.seps
    num_patches = sc.num_patches if sc.num_patches > 0 else backbone_num_patches(model_cfg.vision)
    return cls(vision=encoders.config_dict(model_cfg.vision),
               text=encoders.config_dict(model_cfg.text),
               num_aggregated=sdtps.num_aggregated(num_patches, sc.alpha, sc.rho),
               embed_dim=model_cfg.embed_dim, rho=sc.rho, dim_ratio=sc.dim_ratio,
               use_sparse=sc.use_sparse, use_dense=sc.use_dense, dense_mode=sc.dense_mode,
               selection=sc.selection, st_temperature=sc.st_temperature,
               precision=sc.precision, gather_kept=sc.get("gather_kept", "auto"),
               eval_text_cut=sc.eval_text_cut,
               ratio_weight=sc.ratio_weight, freeze_text=model_cfg.get("freeze_text", False),
               train_chunk=sc.train_chunk or None, dtype=model_cfg.dtype,
               remat=model_cfg.get("remat", "none"))  # older saved configs have none

  def setup(self):
    self.vision_encoder = encoders.encoder_from_config(self.vision, self.dtype, self.remat)
    self.text_encoder = encoders.encoder_from_config(self.text, self.dtype, self.remat)
    proj = lambda width, name: (None if width == self.embed_dim else nn.Dense(
        self.embed_dim, precision=lax.Precision.HIGHEST, name=name))
    self.vision_proj = proj(encoders.encoder_width(self.vision), "vision_proj")
    self.fc = proj(encoders.encoder_width(self.text), "fc")
    self.cross_net = SEPSHead(**self.head_settings())

  # -- what callers need to know without asking which model this is (docs/design.md) ---------
  official_layout = True  # interop/official_seps.py converts the authors' checkpoints
  tokenizes_dense = True  # batches carry tokenised dense captions (LAPS ignores them)
  explain_kind = "selection"  # explain.py draws the top-K patch selection

  @property
  def variant(self) -> str:
    """'seps', or 'laps' without the dense branch."""
    return "seps" if self.use_dense else "laps"

  def torch_heads_meta(self) -> dict:
    """The head settings `torch_export/gseps_torch.py` rebuilds the SEPS head from (hf export)."""
    return dict(
        embed_dim=int(self.embed_dim), vision_width=encoders.encoder_width(self.vision),
        text_width=encoders.encoder_width(self.text), num_aggregated=int(self.num_aggregated),
        rho=float(self.rho), dim_ratio=float(self.dim_ratio), use_sparse=bool(self.use_sparse),
        use_dense=bool(self.use_dense), eval_text_cut=int(self.eval_text_cut),
        aggr_ln_eps=float(AGGR_LN_EPS), leaky_slope=float(sdtps.LEAKY_SLOPE),
        train_dense_mode=str(self.dense_mode))

  @property
  def uses_dense(self) -> bool:
    """Scoring needs one dense caption per image (`score(..., dense_feats)`)."""
    return self.use_dense

  @property
  def trained_dense_mode(self) -> Optional[str]:
    """The dense mode of training, evaluation's default (it also decides the parity text cut,
    `eval_text_cut`, with the dense branch off)."""
    return self.dense_mode

  def sparse_only(self) -> "SEPS":
    """The same model (same parameters) with the dense branch off (LAPS scoring)."""
    return self.clone(use_dense=False)

  def score_options(self, dense_mode: Optional[str] = None,
                    caption_image: Optional[Array] = None) -> dict:
    """Keyword arguments of `score` for `dense_mode` (None: the trained one) and, in parity
    mode, caption j's ground-truth image `caption_image` [Nc]."""
    return dict(dense_mode=dense_mode, caption_image=caption_image)

  def encode_images(self, images: Array, *, train: bool = False) -> dict:
    """[B, H, W, 3] -> {'tokens': [B, L, D] float32} (L = 1 + N for ViT, N for Swin)."""
    x = self.vision_encoder(images, train=train).astype(jnp.float32)
    return {"tokens": x if self.vision_proj is None else self.vision_proj(x)}

  def encode_texts(self, input_ids: Array, attention_mask: Array, text_hidden=None, *,
                   train: bool = False) -> dict:
    """[B, L] ids and mask -> {'tokens': [B, L, D] float32, 'mask': [B, L] bool}.
    `text_hidden` `[B, L, D_text]`: cached frozen text-tower outputs (data/text_cache.py) used
    instead of running the encoder; a frozen tower runs deterministically (no dropout)."""
    if text_hidden is None:
      x = self.text_encoder(input_ids, attention_mask,
                            train=train and not self.freeze_text).astype(jnp.float32)
    else:
      x = jnp.asarray(text_hidden, jnp.float32)
    if self.freeze_text:
      x = lax.stop_gradient(x)
    return {"tokens": x if self.fc is None else self.fc(x), "mask": attention_mask.astype(bool)}

  def explain_image(self, images: Array) -> dict:
    """Eval-mode per-image head cache for explain.py (`SEPSHead.prepare_images`: cls, x, xn,
    self_attn, logits)."""
    return self.cross_net.prepare_images(self.encode_images(images)["tokens"])

  def explain_text(self, input_ids: Array, attention_mask: Array) -> dict:
    """Eval-mode per-text head cache for explain.py (`SEPSHead.prepare_texts`: glo, words,
    mask)."""
    t = self.encode_texts(input_ids, attention_mask)
    return self.cross_net.prepare_texts(t["tokens"], t["mask"])

  def towers(self, batch: Mapping[str, Array], *, train: bool) -> dict:
    """The encoders' per-example outputs that `head` scores: {'img': `[B, L, D]` image tokens,
    'cap': `[B, Lc, D]` caption tokens, 'dense': `[B, Ld, D]` dense-caption tokens (with the
    dense branch)}. Row b depends on row b of the batch only (contrastive gradient caching:
    trainer.py)."""
    out = {"img": self.encode_images(batch["image"], train=train)["tokens"],
           "cap": self.encode_texts(batch["input_ids"], batch["attention_mask"],
                                    batch.get("text_hidden"), train=train)["tokens"]}
    if self.use_dense:
      out["dense"] = self.encode_texts(batch["dense_ids"], batch["dense_mask"],
                                       batch.get("dense_hidden"), train=train)["tokens"]
    return out

  def __call__(self, batch: Mapping[str, Array], *, train: bool) -> tuple[dict, dict]:
    """In-batch training forward: `head(towers(batch), batch)`.

    Row b of the batch is (image_b, caption_b, dense caption of image_b). Both dense modes use
    the rows as they are: parity pairs caption j with dense_j (its ground-truth image's), honest
    guides image i's selection with dense_i.

    Returns:
      ({'seps': [B, B]}, {'ratio_loss': constant official ratio term, 'keep_ratio': K / N}).
    """
    return self.head(self.towers(batch, train=train), batch, train=train)

  def head(self, reps: Mapping[str, Array], batch: Mapping[str, Array], *,
           train: bool) -> tuple[dict, dict]:
    """Everything after the encoders, on the whole batch: `__call__`'s outputs from `towers`
    outputs `reps` (batch: 'attention_mask', 'dense_mask')."""
    del train  # the head is deterministic
    img = reps["img"]
    sims = self.cross_net(img, reps["cap"], batch["attention_mask"].astype(bool),
                          reps.get("dense"),
                          batch["dense_mask"].astype(bool) if self.use_dense else None,
                          chunk=self.train_chunk)
    n = img.shape[1] - (1 if sdtps.has_cls(img.shape[1]) else 0)
    k = sdtps.num_kept(n, self.rho)
    branches = int(self.use_sparse) + int(self.use_dense)
    aux = {"ratio_loss": jnp.asarray(
        sdtps.ratio_loss(k, n, self.rho, branches, self.ratio_weight), jnp.float32),
           "keep_ratio": jnp.asarray(k / n, jnp.float32)}
    return {"seps": sims}, aux

  def score(self, img_feats: dict, txt_feats: dict, dense_feats: Optional[dict] = None, *,
            dense_mode: Optional[str] = None, chunk=256,
            caption_image: Optional[Array] = None) -> Array:
    """All-pairs evaluation scores.

    Args:
      img_feats: `encode_images` output for Ni images.
      txt_feats: `encode_texts` output for Nc captions.
      dense_feats: `encode_texts` output of the dense captions, ONE PER IMAGE ([Ni, ...], as
        indexed). Needed when the dense branch is on.
      dense_mode: "parity" | "honest" (default: the model's).
      chunk: pair tile (int or (images, captions)).
      caption_image: [Nc] int, caption j's ground-truth image (row of img_feats). Parity mode
        only: it pairs caption j with that image's dense caption, as the official evaluation
        does; this uses the answer, which is why parity numbers are not a retrieval result.
    Returns:
      [Ni, Nc] scores.
    """
    mode = dense_mode or self.dense_mode
    if mode not in sdtps.DENSE_MODES:
      raise ValueError(f"dense_mode must be one of {sdtps.DENSE_MODES}, got {mode!r}.")
    cap_tok, cap_mask = txt_feats["tokens"], txt_feats["mask"]
    d_tok = d_mask = dense_index = None
    if self.use_dense:
      if dense_feats is None:
        raise ValueError("This SEPS model has a dense branch: score() needs dense_feats.")
      d_tok, d_mask = dense_feats["tokens"], dense_feats["mask"]
      if mode == "parity":
        if caption_image is None:
          raise ValueError("dense_mode='parity' pairs each caption with its ground-truth "
                           "image's dense caption: pass caption_image [Nc].")
        # Each image's dense caption is scored once and shared by its captions (the scores
        # equal gathering d_tok[caption_image]; see `sdtps.pair_scores(dense_index=...)`).
        dense_index = jnp.asarray(caption_image)
    if mode == "parity" and self.eval_text_cut > 0:
      # The official evaluation stores the first `cut` features of each (full-length) text
      # encoding: slicing the features (not the tokens) keeps what they saw of the whole text.
      cap_tok, cap_mask = sdtps.parity_text_cut(cap_tok, cap_mask, self.eval_text_cut)
      if d_tok is not None:
        d_tok, d_mask = sdtps.parity_text_cut(d_tok, d_mask, self.eval_text_cut)
    return self.cross_net(img_feats["tokens"], cap_tok, cap_mask, d_tok, d_mask,
                          dense_mode=mode, chunk=chunk, dense_index=dense_index,
                          gather_batch=sdtps.EVAL_GATHER_BATCH)
