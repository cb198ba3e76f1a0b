"""GRM: saliency adapters, region prompts and region uncertainty over a dual encoder, in Flax.

Design: docs/grm_design.md; the building blocks are in models/grm_heads.py. Per image, V
`[Lv, E]` = projected vision tokens; per caption, T `[Lt, E]` = projected word tokens with a
padding mask.

  1. Saliency adapters (SA for vision, GA for text): LayerNorm -> Dense(E//4) -> GELU ->
     Dense(2) -> log_softmax; column 0 = keep. Training: Gumbel-Softmax (temperature `tau`),
     straight-through hard by default; eval: keep = argmax, no noise. Padding is never kept and at
     least one valid token always is. V_hat = V * A_V[:, None].
  2. Region prompts: A_r = sigmoid(scale * cos(V_hat, P) + bias) `[Lv, K]` (defaults; the paper's
     V_hat . normalize(P) with scale 1 is a config choice) times the keep mask, columns normalised
     to Â; region means mu_k = sum_l Â[l, k] V_hat[l].
  3. Region uncertainty: log sigma^2 = clip(phi(mu)); training samples
     u_k = mu_k + sigma_k * ||Â[:, k]||_2 * xi_k (exactly the distribution of the per-token form
     sum_l Â[l, k] (mu_k + sigma_k eps_lk)); eval u_k = mu_k.
  4. Scores (the one kernel, `similarity.token_similarity`): ori = s(V, T), key = s(V_hat, T_hat)
     on the kept tokens, unc = s(U, T_hat).

How the keep decisions learn (docs/grm_design.md). The kernel L2-normalises tokens, so scaling a
token by its mask (V_hat) carries no gradient to the adapter. In training the keep masks
therefore enter the kernel's reductions as token weights (`token_similarity(x_weight=...)`):
presence = the padding mask, weight = the straight-through mask (forward 0/1, backward the soft
keep probability; `hard=False`: the soft probability itself), so the forward value is exactly the
key level on the kept tokens and every token's keep probability gets the score's gradient. The
same weights enter the region attention and the reconstruction mean. A DynamicViT-style penalty
(mean keep - `keep_ratio`)^2 (aux 'keep') holds the keep ratio near its target so that the eval
argmax neither keeps one token nor all. At evaluation the masks are hard booleans: V is stored
once with two masks (`ori_mask`, `key_mask`) and the boolean kernel runs.

Region collapse (docs/grm_design.md): orthogonal prompt init, cosine logits with a learnable
scale (10) and bias, a diversity loss (aux 'div' = mean pairwise cosine between the columns of
Â, i.e. the overlap of the region maps, which is also the logged 'region_cos'), and an entropy
term bounded from below (aux 'ent' = mean relu(floor - column entropy): it only stops a region
collapsing onto a single patch, it no longer pushes every map towards uniform).

Ablation switches (`grm.use_sa`, `use_ga`, `use_regions`, `use_uncertainty`) and zero level
weights remove components for benchmarks/grm_ablation.py; a level of weight 0 is not computed.
The auxiliary losses are computed by `losses.grm_aux` from the head's named intermediates.
"""

import math
from typing import Any, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from gseps_jax import losses
from gseps_jax.models import encoders
from gseps_jax.models import grm_heads
from gseps_jax.models.similarity import Buckets, bucket_counts, token_similarity_multi

LEVELS = ("ori", "key", "unc")
# Ablation switches (benchmarks/grm_ablation.py): off = the component is not built.
SWITCHES = ("use_sa", "use_ga", "use_regions", "use_uncertainty")


def _eval_buckets(value) -> Union[int, Tuple[int, int]]:
  """`model.grm.eval_buckets` from a config: an int >= 1 (kept: it means caption buckets, see
  `GRM.eval_buckets`), or a pair of them set in a config file (checked as the kernel does)."""
  pair = bucket_counts(value, name="model.grm.eval_buckets")
  return value if isinstance(value, int) else pair


# ----------------------------------------------------------------------------- model


class GRM(nn.Module):
  """The full GRM model (model interface of docs/design.md). Build it with
  `GRM.from_config(config.model)` (the `grm` fields: configs/grm_vit.py).

  Attributes:
    vision, text: HF config dicts of the encoders.
    level_weights: {'ori', 'key', 'unc'} -> weight of each score level (a scoring choice: a
      level of weight 0 is not computed).
    embed_dim: joint width E.
    dtype: compute dtype of the encoders and adapters ("float32" | "bfloat16").
    remat: rematerialisation of the encoder blocks, "none" | "blocks" | "dots".
    freeze_text: the text tower is a fixed feature extractor (no gradient, no dropout).
    tau, hard: the saliency adapters' Gumbel-Softmax temperature and straight-through switch.
    num_regions: K region prompts; region_prompt_init, region_normalize_tokens,
      region_learn_scale, region_logit_scale: `RegionPrompts` settings.
    keep_ratio: target of the keep-ratio penalty (aux 'keep').
    region_entropy_floor: bound of the entropy loss (aux 'ent'); None = unbounded.
    phi_width, logvar_min, logvar_max: `RegionUncertainty` settings.
    direction: kernel direction, "both" | "x2y" | "y2x".
    learn_temperature, init_temperature: a 'log_temperature' param for the InfoNCE loss.
    train_chunk: pair tile of the in-batch kernel (None = one tile).
    eval_buckets: token-length buckets of the evaluation kernel (1 = off). An int buckets the
      captions only: GRM's image side is always full (the union of its level masks is every
      token), so image-side buckets would compile variants that never run. A pair (bx, by)
      is passed to the kernel as given (`similarity.token_similarity`).
    use_sa, use_ga, use_regions, use_uncertainty: ablation switches (off = not built).

  Parameter tree: 'vision_encoder', 'text_encoder' (HF-named encoders), 'vision_proj',
  'text_proj', 'sa', 'ga', 'regions', 'uncertainty' and, with `learn_temperature`, the scalar
  'log_temperature' used by the InfoNCE loss.
  """
  vision: Mapping[str, Any]
  text: Mapping[str, Any]
  level_weights: Mapping[str, float]
  embed_dim: int = 512
  dtype: str = "float32"
  remat: str = "none"
  freeze_text: bool = False
  tau: float = 1.0
  hard: bool = True
  num_regions: int = 5
  keep_ratio: float = 0.5
  region_prompt_init: str = "normal"
  region_normalize_tokens: bool = False
  region_learn_scale: bool = False
  region_logit_scale: float = 1.0
  region_entropy_floor: Optional[float] = None
  phi_width: int = 256
  logvar_min: float = -10.0
  logvar_max: float = 2.0
  direction: str = "both"
  learn_temperature: bool = False
  init_temperature: float = 0.07
  train_chunk: Optional[int] = None
  eval_buckets: Union[int, Tuple[int, int]] = 1
  use_sa: bool = True
  use_ga: bool = True
  use_regions: bool = True
  use_uncertainty: bool = True

  @classmethod
  def from_config(cls, model_cfg) -> "GRM":
    """`config.model` (with a `grm` sub-config, see configs/grm_vit.py) -> GRM. Fields absent
    from older saved configs take the value those configs trained with."""
    g = model_cfg.grm
    return cls(
        vision=encoders.config_dict(model_cfg.vision), text=encoders.config_dict(model_cfg.text),
        level_weights=dict(g.level_weights), embed_dim=model_cfg.embed_dim,
        dtype=model_cfg.dtype, remat=model_cfg.get("remat", "none"),
        freeze_text=model_cfg.freeze_text, tau=g.tau, hard=g.hard, num_regions=g.num_regions,
        keep_ratio=float(g.get("keep_ratio", 0.5)),
        region_prompt_init=g.get("region_prompt_init", "normal"),
        region_normalize_tokens=g.region_normalize_tokens,
        region_learn_scale=g.region_learn_scale, region_logit_scale=g.region_logit_scale,
        region_entropy_floor=g.get("region_entropy_floor", None), phi_width=g.phi_width,
        logvar_min=g.logvar_min, logvar_max=g.logvar_max, direction=g.direction,
        learn_temperature=bool(g.get("learn_temperature", False)),
        init_temperature=g.get("init_temperature", 0.07),
        train_chunk=g.get("train_chunk", None) or None,
        eval_buckets=_eval_buckets(g.get("eval_buckets", 1)),
        **{k: bool(g.get(k, True)) for k in SWITCHES})

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    self.vision_encoder = encoders.encoder_from_config(self.vision, dtype, self.remat)
    self.text_encoder = encoders.encoder_from_config(self.text, dtype, self.remat)
    self.vision_proj = nn.Dense(self.embed_dim, dtype=dtype)
    self.text_proj = nn.Dense(self.embed_dim, dtype=dtype)
    self.sa = grm_heads.SaliencyAdapter(tau=self.tau, hard=self.hard, dtype=dtype)
    self.ga = grm_heads.SaliencyAdapter(tau=self.tau, hard=self.hard, dtype=dtype)
    self.regions = grm_heads.RegionPrompts(num_regions=self.num_regions,
                                           normalize_tokens=self.region_normalize_tokens,
                                           learn_scale=self.region_learn_scale,
                                           init_scale=self.region_logit_scale,
                                           prompt_init=self.region_prompt_init)
    self.uncertainty = grm_heads.RegionUncertainty(
        hidden=self.phi_width, logvar_min=self.logvar_min, logvar_max=self.logvar_max,
        dtype=dtype)
    if self.learn_temperature:
      self.log_temperature = self.param(
          "log_temperature", nn.initializers.constant(math.log(self.init_temperature)), ())

  # -- what callers need to know without asking which model this is (docs/design.md) ---------
  official_layout = False  # no published checkpoint layout to convert to
  tokenizes_dense = False  # no dense captions
  uses_dense = False
  trained_dense_mode = None
  variant = "grm"
  explain_kind = "regions"  # explain.py draws the saliency keep mask and the region maps

  def sparse_only(self) -> "GRM":
    """GRM has no dense branch: itself."""
    return self

  def score_options(self, dense_mode=None, caption_image=None) -> dict:
    """Keyword arguments of `score`: none (GRM has no dense modes)."""
    del dense_mode, caption_image
    return {}

  def torch_heads_meta(self) -> dict:
    """The head settings `torch_export/gseps_torch.py` rebuilds the GRM heads from (hf export)."""
    return dict(
        embed_dim=int(self.embed_dim), vision_width=encoders.encoder_width(self.vision),
        text_width=encoders.encoder_width(self.text),
        adapter_ln_eps=float(nn.LayerNorm(parent=None).epsilon),  # SaliencyAdapter: the default
        num_regions=int(self.num_regions),
        region_normalize_tokens=bool(self.region_normalize_tokens),
        region_learn_scale=bool(self.region_learn_scale),
        region_logit_scale=float(self.region_logit_scale),
        region_eps=float(grm_heads.RegionPrompts(num_regions=1, parent=None).eps),
        phi_width=int(self.phi_width),
        learn_temperature=bool(self.learn_temperature), direction=str(self.direction),
        level_weights={k: float(v) for k, v in dict(self.level_weights).items()})

  # -- kernel ----------------------------------------------------------------------------------

  def _kernel_args(self, chunk):
    dtype = jnp.dtype(self.dtype)
    # bf16 models feed bf16 tokens to the kernel's matmul; it accumulates in fp32 regardless.
    return dict(direction=self.direction, chunk=chunk or None,
                compute_dtype=None if dtype == jnp.float32 else dtype)

  def _level_sims(self, specs: dict, v: jax.Array, u, t: jax.Array, *, chunk=None,
                  buckets: Buckets = 1) -> dict:
    """Kernel scores of several levels, one cosine block per token side.

    Args:
      specs: level -> (side, x_mask, x_weight, y_mask, y_weight): side "v" scores the image
        tokens `v` `[B, Lv, E]`, side "u" the region tokens `u` `[B, K, E]` against the caption
        tokens `t`; masks / weights as in `similarity.token_similarity` (weights None or float:
        the straight-through keep masks in training).
      v, u, t: image tokens, region tokens (None when no level reads them), caption tokens.

    The levels of one side (ori and key: the same V, T under different masks and weights) share
    one einsum per tile (`token_similarity_multi`); the values and gradients are those of one
    `token_similarity` call per level. Appending U to V to share a single block was measured
    slower: every level's masked reductions then run over Lv + K rows (docs/benchmarks.md).
    """
    out = {}
    for side, x in (("v", v), ("u", u)):
      names = [k for k, spec in specs.items() if spec[0] == side]
      if not names:
        continue
      _, xms, xws, yms, yws = zip(*(specs[k] for k in names))
      scores = token_similarity_multi(x, xms, t, yms, x_weights=xws, y_weights=yws,
                                      buckets=buckets, **self._kernel_args(chunk))
      out.update(zip(names, scores))
    return {k: out[k] for k in specs}

  def _switch(self, name: str) -> bool:
    """Ablation switch `name` in SWITCHES."""
    return getattr(self, name)

  def _levels(self) -> tuple:
    """The score levels in use: weight != 0, and 'unc' only with region prompts."""
    w = self.level_weights
    return tuple(k for k in LEVELS if w[k] != 0 and (k != "unc" or self._switch("use_regions")))

  def _adapter(self, adapter, tokens, valid, switch, train):
    """Adapter outputs, or keep-everything when the ablation switch is off."""
    if self._switch(switch):
      return adapter(tokens, valid, train=train)
    return {"mask": valid.astype(jnp.float32), "keep": valid,
            "prob": valid.astype(jnp.float32)}

  # -- encoders --------------------------------------------------------------------------------

  def _image_tokens(self, images, train):
    v = self.vision_encoder(images, train=train)
    return self.vision_proj(v).astype(jnp.float32)  # [B, Lv, E]

  def _text_tokens(self, input_ids, attention_mask, train, hidden=None):
    if hidden is None:
      # A frozen tower is a fixed feature extractor: deterministic (no dropout), as its cached
      # features (data/text_cache.py) are.
      t = self.text_encoder(input_ids, attention_mask,
                            train=train and not self.freeze_text)
    else:  # precomputed frozen-tower features `[B, Lt, D_text]` (batch key 'text_hidden')
      t = jnp.asarray(hidden, jnp.dtype(self.dtype))
    if self.freeze_text:  # pretrained text tower used as a fixed feature extractor
      t = jax.lax.stop_gradient(t)
    return self.text_proj(t).astype(jnp.float32)  # [B, Lt, E]

  def image_branch(self, images: jax.Array, train: bool = False) -> dict:
    """Every intermediate of the image branch (used by training, `encode_images`, explain).

    Returns:
      dict(v `[B, Lv, E]` projected tokens V, valid `[B, Lv]`, v_hat V*mask, sa (saliency
      adapter outputs: keep, mask, prob, ...), attn `[B, K, Lv]` region attention, means, stats,
      u `[B, K, E]` region tokens U, logvar `[B, K, E]`).
    """
    return self._image_head(self._image_tokens(images, train), train)

  def _image_head(self, v: jax.Array, train: bool) -> dict:
    """`image_branch` after the encoder: from the projected tokens V `[B, Lv, E]`."""
    valid = jnp.ones(v.shape[:2], bool)
    sa = self._adapter(self.sa, v, valid, "use_sa", train)
    v_hat = v * sa["mask"][..., None]
    out = dict(v=v, valid=valid, v_hat=v_hat, sa=sa, attn=None, means=None, stats={}, u=None,
               logvar=None)
    if not self._switch("use_regions"):
      return out
    # The keep weights (straight-through in training) gate the attention: the same mask as the
    # key level's, and SA learns from the regions too.
    attn, means, stats = self.regions(v_hat, sa["mask"])
    if self._switch("use_uncertainty"):
      u, logvar = self.uncertainty(means, attn, train=train)
    else:  # sigma = 0
      u, logvar = means, None
    out.update(attn=attn, means=means, stats=stats, u=u, logvar=logvar)
    return out

  def text_branch(self, input_ids: jax.Array, attention_mask: jax.Array,
                  train: bool = False, text_hidden=None) -> dict:
    """Every intermediate of the text branch: dict(t `[B, Lt, E]`, valid, t_hat, ga (adapter
    outputs: keep, mask, prob, ...)). `text_hidden`: cached frozen-tower outputs replacing the
    text encoder call (data/text_cache.py)."""
    return self._text_head(self._text_tokens(input_ids, attention_mask, train, text_hidden),
                           attention_mask, train)

  def _text_head(self, t: jax.Array, attention_mask: jax.Array, train: bool) -> dict:
    """`text_branch` after the encoder: from the projected tokens T `[B, Lt, E]`."""
    valid = attention_mask.astype(bool)
    ga = self._adapter(self.ga, t, valid, "use_ga", train)
    return dict(t=t, valid=valid, t_hat=t * ga["mask"][..., None], ga=ga)

  def explain_image(self, images: jax.Array) -> dict:
    """Eval-mode image branch for explain.py: tokens V `[B, Lv, E]`, SA keep mask / probability
    `[B, Lv]`, region attention Â `[B, Lv, K]`, log sigma^2 `[B, K, E]`."""
    b = self.image_branch(images, False)
    return {"tokens": b["v"], "keep": b["sa"]["keep"], "keep_prob": b["sa"]["prob"],
            "attn": b["attn"], "logvar": b["logvar"]}

  def explain_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> dict:
    """Eval-mode text branch for explain.py: tokens T `[B, Lt, E]`, GA keep mask `[B, Lt]`."""
    b = self.text_branch(input_ids, attention_mask, False)
    return {"tokens": b["t"], "keep": b["ga"]["keep"]}

  def encode_images(self, images: jax.Array, *, train: bool = False) -> dict:
    """Image features for scoring.

    Args:
      images: `[B, H, W, 3]` normalised NHWC.

    Returns:
      {'ori': `[B, Lv, E]` V, 'ori_mask': `[B, Lv]` bool (all True), 'key_mask': `[B, Lv]` bool
       (kept tokens: the key level scores V on these), 'unc': `[B, K, E]` U, 'unc_mask': `[B, K]`}.
    """
    b = self.image_branch(images, train)
    out = {"ori": b["v"], "ori_mask": b["valid"], "key_mask": b["sa"]["keep"]}
    if b["u"] is not None:  # None with grm.use_regions=False (no unc level)
      out.update(unc=b["u"], unc_mask=jnp.ones(b["u"].shape[:2], bool))
    return out

  def encode_texts(self, input_ids: jax.Array, attention_mask: jax.Array, text_hidden=None, *,
                   train: bool = False) -> dict:
    """Caption features: {'ori': `[B, Lt, E]` T, 'ori_mask': `[B, Lt]`, 'key_mask': `[B, Lt]`}.
    `text_hidden` `[B, Lt, D_text]`: cached frozen text-tower outputs (skips the encoder)."""
    b = self.text_branch(input_ids, attention_mask, train, text_hidden)
    return {"ori": b["t"], "ori_mask": b["valid"], "key_mask": b["ga"]["keep"]}

  def level_scores(self, img: dict, txt: dict, *, chunk=None, levels=LEVELS) -> dict:
    """level -> `[Ni, Nc]` kernel scores from `encode_images` / `encode_texts` outputs, for the
    requested `levels` ('unc' only when the features have it)."""
    # Evaluation: ori and key score the same tokens V, T with the padding / keep masks, and unc
    # scores U against the kept words: one cosine block per tile serves all three
    # (`_level_sims`). Token-length buckets skip padding (same scores; see
    # `similarity.token_similarity`).
    specs = {}
    if "ori" in levels:
      specs["ori"] = ("v", img["ori_mask"], None, txt["ori_mask"], None)
    if "key" in levels:
      specs["key"] = ("v", img["key_mask"], None, txt["key_mask"], None)
    if "unc" in levels and "unc" in img:
      specs["unc"] = ("u", img["unc_mask"], None, txt["key_mask"], None)
    buckets = self.eval_buckets
    if isinstance(buckets, int):
      buckets = (1, buckets)  # captions only (the image side is full; see eval_buckets)
    return self._level_sims(specs, img["ori"], img.get("unc"), txt["ori"], chunk=chunk,
                            buckets=buckets)

  def score(self, img_feats: dict, txt_feats: dict, dense_feats=None, *,
            chunk=None) -> jax.Array:
    """All-pairs eval score a*s_ori + b*s_key + c*s_unc -> `[Ni, Nc]` (`dense_feats` is ignored:
    GRM has no dense branch, `uses_dense` is False).

    Levels of weight 0 are not computed: `grm.level_weights` is a scoring choice that can be
    changed at evaluation without retraining (it is not in the checkpoint fingerprint), e.g.
    {ori: 1, key: 0, unc: 0} scores one level alone.
    """
    del dense_feats  # no dense branch
    w = self.level_weights
    s = self.level_scores(img_feats, txt_feats, chunk=chunk, levels=self._levels())
    return sum(w[k] * s[k] for k in s)

  def towers(self, batch: dict, *, train: bool) -> dict:
    """The encoders' per-example outputs that `head` scores: {'v': `[B, Lv, E]` projected image
    tokens V, 't': `[B, Lt, E]` projected caption tokens T}. Row b depends on row b of the batch
    only (the split that contrastive gradient caching relies on: trainer.py)."""
    return {"v": self._image_tokens(batch["image"], train),
            "t": self._text_tokens(batch["input_ids"], batch["attention_mask"], train,
                                   batch.get("text_hidden"))}

  def __call__(self, batch: dict, *, train: bool):
    """Training forward: `head(towers(batch), batch)`.

    Args:
      batch: 'image' `[B, H, W, 3]`, 'input_ids' `[B, Lt]`, 'attention_mask' `[B, Lt]`;
        optional 'text_hidden' `[B, Lt, D_text]` (cached frozen text-tower outputs).
      train: dropout / Gumbel / noise on (rngs 'dropout', 'gumbel', 'noise').

    Returns:
      sims: {'ori', 'key', 'unc'} (the levels of non-zero weight) -> `[B, B]` (row = image i,
        column = caption j).
      aux: scalars 'recon', 'kl', 'ent', 'div', 'keep' (auxiliary losses; 0 for a component
        switched off) and metrics 'keep_ratio_img', 'keep_ratio_txt' (mean keep weight per
        valid token), 'region_entropy', 'region_cos', 'region_mean_cos'.
    """
    return self.head(self.towers(batch, train=train), batch, train=train)

  def head(self, reps: dict, batch: dict, *, train: bool):
    """Everything after the encoders, on the whole batch: (sims, aux) of `__call__` from
    `towers` outputs `reps` (batch: 'attention_mask')."""
    im = self._image_head(reps["v"], train)
    tx = self._text_head(reps["t"], batch["attention_mask"], train)
    chunk = self.train_chunk
    levels = self._levels()
    # Key and unc levels: presence = the padding mask, weight = the keep mask (straight-through:
    # forward 0/1, so the values are the kernel on the kept tokens; backward the soft keep
    # probability). Tokens are V and T themselves: V_hat would zero the dropped tokens, whose
    # best match is what tells the adapter whether keeping them would raise the score.
    w_img, w_txt = im["sa"]["mask"], tx["ga"]["mask"]
    specs = {}
    if "ori" in levels:
      specs["ori"] = ("v", im["valid"], None, tx["valid"], None)
    if "key" in levels:
      specs["key"] = ("v", im["valid"], w_img, tx["valid"], w_txt)
    if "unc" in levels:
      specs["unc"] = ("u", jnp.ones(im["u"].shape[:2], bool), None, tx["valid"], w_txt)
    sims = self._level_sims(specs, im["v"], im["u"], tx["t"], chunk=chunk)
    inter = dict(img_tokens=im["v"], img_valid=im["valid"], img_mask=w_img,
                 txt_valid=tx["valid"], txt_mask=w_txt, region_attn=im["attn"],
                 region_means=im["means"], region_stats=im["stats"],
                 region_logvar=im["logvar"])
    aux = losses.grm_aux(inter, keep_target=self.keep_ratio, keep_img=self.use_sa,
                         keep_txt=self.use_ga, entropy_floor=self.region_entropy_floor)
    return sims, aux
