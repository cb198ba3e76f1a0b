"""GRM / SEPS image-text retrieval in PyTorch: the eval-mode scorer of a gseps_jax export.

This file is self-contained (torch, transformers, safetensors): `python -m gseps_jax.export
--format=hf` copies it into the export directory, next to

  vision_encoder/   HF `ViTModel` / `SwinModel` directory (config.json, model.safetensors)
  text_encoder/     HF `BertModel` directory + tokenizer files (vocab.txt, tokenizer_config.json)
  heads.safetensors projections and heads, named as the attributes of the modules below
  metadata.json     model type, head settings, image size, mean/std, tokenizer lengths, step

Usage (from the export directory or with it on `sys.path`):

    import gseps_torch
    model = gseps_torch.load("export_dir")           # eval mode, float32, CPU
    tok = gseps_torch.load_tokenizer("export_dir")
    ids, mask = gseps_torch.tokenize(tok, ["a red circle"], model.meta["max_len"])
    img = model.encode_images(pixel_values)          # [B, 3, H, W], normalised with meta mean/std
    txt = model.encode_texts(ids, mask)
    sims = model.score(img, txt)                     # [Ni, Nc], row = image, column = caption

SEPS additionally takes the dense captions: `dense = model.encode_texts(dense_ids, dense_mask)`
with ONE dense caption per image, then `model.score(img, txt, dense, dense_mode="honest")` or
`dense_mode="parity", caption_image=...` (the official evaluation: caption j is paired with the
dense caption of its ground-truth image `caption_image[j]`; it uses the answer).

Semantics are those of gseps_jax in eval mode (no dropout, no Gumbel noise, no sampling):
  GRM   SA/GA keep = argmax of the adapter logits (at least one valid token kept, padding never);
        region attention sigmoid(scale * V_hat . normalize(P)^T + bias) over kept tokens,
        column-normalised; region tokens u = mu; score = sum of the level weights times the
        token-level similarity of (V, T), (V on kept, T on kept), (U, T on kept).
  SEPS  SDTPS (top-K patch selection guided by the image mean and a text mean, aggregation of
        the kept patches into N_c tokens, one fused token of the dropped ones) + HRPA, summed
        over the sparse-caption branch and the dense-caption branch.
"""

import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

FORMAT_VERSION = 1
_NEG = -1e4  # GRM kernel fill for masked cosines (finite, far below -1)


# ----------------------------------------------------------------------------------------------
# Shared helpers.
# ----------------------------------------------------------------------------------------------
def rsqrt_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
  """x * rsqrt(sum(x^2) + eps) over the last axis (GRM's normalisation)."""
  return x * torch.rsqrt(torch.sum(x * x, dim=-1, keepdim=True) + eps)


def max_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
  """x / max(||x||, eps) over the last axis (torch F.normalize; SEPS's normalisation)."""
  ss = torch.sum(x * x, dim=-1, keepdim=True)
  return x * torch.rsqrt(torch.clamp(ss, min=eps * eps))


def token_similarity(x, x_mask, y, y_mask, direction="both"):
  """All-pairs token-level similarity.

  Args:
    x: [Bx, Lx, D] tokens; x_mask: [Bx, Lx] bool.
    y: [By, Ly, D] tokens; y_mask: [By, Ly] bool.
    direction: "x2y" (each x token's best y token, mean over x), "y2x", or "both" (halved sum).
  Returns:
    [Bx, By]; 0 where an item has no valid token.
  """
  xm, ym = x_mask.bool(), y_mask.bool()
  xn = torch.where(xm[..., None], rsqrt_normalize(x), torch.zeros(()))
  yn = torch.where(ym[..., None], rsqrt_normalize(y), torch.zeros(()))
  s = torch.einsum("ild,jmd->ijlm", xn, yn)  # [Bx, By, Lx, Ly]
  out = []
  if direction in ("x2y", "both"):
    best = torch.where(ym[None, :, None, :], s, torch.tensor(_NEG)).amax(dim=3)  # [Bx, By, Lx]
    ok = xm[:, None, :] & ym.any(dim=1)[None, :, None]
    total = torch.where(ok, best, torch.zeros(())).sum(-1)
    out.append(total / xm.sum(-1).clamp(min=1)[:, None].to(total.dtype))
  if direction in ("y2x", "both"):
    best = torch.where(xm[:, None, :, None], s, torch.tensor(_NEG)).amax(dim=2)  # [Bx, By, Ly]
    ok = ym[None, :, :] & xm.any(dim=1)[:, None, None]
    total = torch.where(ok, best, torch.zeros(())).sum(-1)
    out.append(total / ym.sum(-1).clamp(min=1)[None, :].to(total.dtype))
  if not out:
    raise ValueError(f"direction must be x2y, y2x or both, got {direction!r}.")
  return out[0] if len(out) == 1 else 0.5 * (out[0] + out[1])


# ----------------------------------------------------------------------------------------------
# GRM.
# ----------------------------------------------------------------------------------------------
class SaliencyAdapter(nn.Module):
  """LayerNorm -> Linear(D, D//4) -> GELU -> Linear(2); eval keep = argmax (column 0 = keep)."""

  def __init__(self, dim: int, ln_eps: float):
    super().__init__()
    self.norm = nn.LayerNorm(dim, eps=ln_eps)
    self.fc1 = nn.Linear(dim, max(1, dim // 4))
    self.fc2 = nn.Linear(max(1, dim // 4), 2)

  def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L, D], [B, L] bool -> keep [B, L] bool (>= 1 valid token kept, padding never)."""
    logits = self.fc2(F.gelu(self.fc1(self.norm(tokens))))
    logp = torch.log_softmax(logits, dim=-1)
    keep_logit = logp[..., 0] - logp[..., 1]
    valid = valid.bool()
    keep = (keep_logit >= 0) & valid
    best = torch.where(valid, keep_logit, torch.tensor(-math.inf)).argmax(dim=-1)
    forced = (F.one_hot(best, keep.shape[-1]).bool() & valid & ~keep.any(-1, keepdim=True))
    return keep | forced


class RegionPrompts(nn.Module):
  """K prompts; column-normalised sigmoid attention over the kept tokens; region means."""

  def __init__(self, num_regions: int, dim: int, normalize_tokens: bool, learn_scale: bool,
               init_scale: float, eps: float):
    super().__init__()
    self.prompts = nn.Parameter(torch.zeros(num_regions, dim))
    self.normalize_tokens, self.learn_scale, self.eps = normalize_tokens, learn_scale, eps
    if learn_scale:
      self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))
      self.logit_bias = nn.Parameter(torch.tensor(0.0))
    else:
      self.fixed_scale = float(init_scale)

  def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """V_hat [B, L, D], keep [B, L] -> region means mu [B, K, D]."""
    if self.learn_scale:
      scale, bias = self.logit_scale, self.logit_bias
    else:
      scale, bias = self.fixed_scale, 0.0
    v = rsqrt_normalize(tokens) if self.normalize_tokens else tokens
    logits = torch.einsum("bld,kd->blk", v, rsqrt_normalize(self.prompts))
    a = torch.sigmoid(scale * logits + bias) * keep[..., None].to(tokens.dtype)
    attn = a / (a.sum(dim=1, keepdim=True) + self.eps)
    return torch.einsum("blk,bld->bkd", attn, tokens)


class RegionUncertainty(nn.Module):
  """phi: mu -> log sigma^2. Unused in eval (u = mu); kept so every trained weight is present."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, means: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(means)))


class _DualEncoder(nn.Module):
  """The two HF encoders and the export's metadata, shared by the scorers below."""

  def __init__(self, vision_encoder: nn.Module, text_encoder: nn.Module, meta: dict):
    super().__init__()
    self.meta = meta
    self.vision_encoder, self.text_encoder = vision_encoder, text_encoder


class GRMModel(_DualEncoder):
  """GRM eval scorer over HF encoders. `heads.safetensors` names = this module's non-encoder
  state-dict names (`vision_proj.weight`, `sa.fc1.weight`, `regions.prompts`, ...)."""

  def __init__(self, vision_encoder: nn.Module, text_encoder: nn.Module, meta: dict):
    super().__init__(vision_encoder, text_encoder, meta)
    h = meta["heads"]
    e = h["embed_dim"]
    self.vision_proj = nn.Linear(h["vision_width"], e)
    self.text_proj = nn.Linear(h["text_width"], e)
    self.sa = SaliencyAdapter(e, h["adapter_ln_eps"])
    self.ga = SaliencyAdapter(e, h["adapter_ln_eps"])
    self.regions = RegionPrompts(h["num_regions"], e, h["region_normalize_tokens"],
                                 h["region_learn_scale"], h["region_logit_scale"],
                                 h["region_eps"])
    self.uncertainty = RegionUncertainty(e, h["phi_width"])
    if h.get("learn_temperature", False):
      self.log_temperature = nn.Parameter(torch.tensor(0.0))

  def encode_images(self, pixel_values: torch.Tensor) -> dict:
    """[B, 3, H, W] normalised -> {'ori' [B, Lv, E], 'ori_mask', 'key_mask', 'unc' [B, K, E],
    'unc_mask'}."""
    v = self.vision_proj(_vision_tokens(self.vision_encoder, pixel_values, self.meta))
    valid = torch.ones(v.shape[:2], dtype=torch.bool)
    keep = self.sa(v, valid)
    means = self.regions(v * keep[..., None].to(v.dtype), keep)
    return {"ori": v, "ori_mask": valid, "key_mask": keep, "unc": means,
            "unc_mask": torch.ones(means.shape[:2], dtype=torch.bool)}

  def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """[B, L] ids and mask -> {'ori' [B, L, E], 'ori_mask', 'key_mask'}."""
    t = self.text_proj(_text_tokens(self.text_encoder, input_ids, attention_mask))
    valid = attention_mask.bool()
    return {"ori": t, "ori_mask": valid, "key_mask": self.ga(t, valid)}

  def level_scores(self, img: dict, txt: dict) -> dict:
    d = self.meta["heads"]["direction"]
    return {
        "ori": token_similarity(img["ori"], img["ori_mask"], txt["ori"], txt["ori_mask"], d),
        "key": token_similarity(img["ori"], img["key_mask"], txt["ori"], txt["key_mask"], d),
        "unc": token_similarity(img["unc"], img["unc_mask"], txt["ori"], txt["key_mask"], d),
    }

  def score(self, img: dict, txt: dict, dense: Optional[dict] = None, **unused) -> torch.Tensor:
    """[Ni, Nc] = sum over levels of weight * token similarity (dense captions unused)."""
    del dense, unused
    w = self.meta["heads"]["level_weights"]
    s = self.level_scores(img, txt)
    return sum(w[k] * s[k] for k in ("ori", "key", "unc"))

  def forward(self, pixel_values, input_ids, attention_mask, dense_ids=None, dense_mask=None,
              **kwargs):
    del dense_ids, dense_mask
    return self.score(self.encode_images(pixel_values),
                      self.encode_texts(input_ids, attention_mask), **kwargs)


# ----------------------------------------------------------------------------------------------
# SEPS.
# ----------------------------------------------------------------------------------------------
class AggregationNet(nn.Module):
  """Per-patch aggregation logits scale * Linear(GELU(Linear(LayerNorm_1e-5(x)))) -> [.., N_c]."""

  def __init__(self, dim: int, hidden: int, num_out: int, ln_eps: float):
    super().__init__()
    self.norm = nn.LayerNorm(dim, eps=ln_eps)
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, num_out)
    self.scale = nn.Parameter(torch.tensor(1.0))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(self.norm(x)))) * self.scale


class SEPSHead(nn.Module):
  """SDTPS + HRPA (parameters: the aggregation net only)."""

  def __init__(self, dim: int, hidden: int, num_aggregated: int, ln_eps: float):
    super().__init__()
    self.aggr_net = AggregationNet(dim, hidden, num_aggregated, ln_eps)


def has_cls(num_tokens: int) -> bool:
  """An image token set has a leading CLS iff its length is not a perfect square."""
  return math.isqrt(num_tokens) ** 2 != num_tokens


def _masked_mean(tokens, mask):
  m = mask.to(tokens.dtype)
  return torch.einsum("bld,bl->bd", tokens, m) / m.sum(-1).clamp(min=1.0)[:, None]


def _hrpa(tokens, words, mask, slope):
  """tokens [Ni, T, D] normalised, words [L, D] normalised, mask [L] bool -> [Ni]."""
  a = F.leaky_relu(torch.einsum("itd,ld->ilt", tokens, words), slope)  # [Ni, L, T]
  m = mask.bool()
  t2i = a.amax(dim=-1)[:, m].sum(-1) / max(int(m.sum()), 1)
  i2t = a[:, m, :].amax(dim=1).mean(-1) if bool(m.any()) else torch.full(
      (a.shape[0],), -1e30, dtype=a.dtype)
  return t2i + i2t


class SEPSModel(_DualEncoder):
  """SEPS eval scorer over HF encoders. `heads.safetensors` names = this module's non-encoder
  state-dict names (`vision_proj.*`, `fc.*` when the widths differ from embed_dim,
  `cross_net.aggr_net.{norm,fc1,fc2}.*`, `cross_net.aggr_net.scale`)."""

  def __init__(self, vision_encoder: nn.Module, text_encoder: nn.Module, meta: dict):
    super().__init__(vision_encoder, text_encoder, meta)
    h = meta["heads"]
    e = h["embed_dim"]
    self.vision_proj = nn.Linear(h["vision_width"], e) if h["vision_width"] != e else None
    self.fc = nn.Linear(h["text_width"], e) if h["text_width"] != e else None
    self.cross_net = SEPSHead(e, int(e * h["dim_ratio"]), h["num_aggregated"],
                              h["aggr_ln_eps"])

  def encode_images(self, pixel_values: torch.Tensor) -> dict:
    """[B, 3, H, W] normalised -> {'tokens': [B, L, D]} (L = 1 + N for ViT, N for Swin)."""
    x = _vision_tokens(self.vision_encoder, pixel_values, self.meta)
    return {"tokens": x if self.vision_proj is None else self.vision_proj(x)}

  def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """[B, L] ids and mask -> {'tokens': [B, L, D], 'mask': [B, L] bool}."""
    x = _text_tokens(self.text_encoder, input_ids, attention_mask)
    return {"tokens": x if self.fc is None else self.fc(x), "mask": attention_mask.bool()}

  def _prepare_images(self, tokens):
    c = 1 if has_cls(tokens.shape[1]) else 0
    cls, x = tokens[:, :c], tokens[:, c:]
    xn = max_normalize(x)
    self_attn = torch.einsum("ind,id->in", xn, max_normalize(x.mean(dim=1)))
    return dict(cls=cls, x=x, xn=xn, self_attn=self_attn, logits=self.cross_net.aggr_net(x))

  def _sdtps(self, img, guide):
    """Selected/aggregated/fused tokens of every image for per-image guide means.

    Args:
      img: `_prepare_images` output for Ni images.
      guide: [Ni, D] normalised text mean guiding each image's selection.
    Returns:
      [Ni, C + N_c + 1, D] L2-normalised tokens.
    """
    score = img["self_attn"] + torch.einsum("ind,id->in", img["xn"], guide)  # [Ni, N]
    n = score.shape[-1]
    k = math.ceil(n * self.meta["heads"]["rho"])
    # Stable descending sort: ties keep the lower index first (lax.top_k's order).
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    hard = torch.zeros_like(score, dtype=torch.bool).scatter(-1, order[:, :k], True)
    logits = img["logits"].masked_fill(~hard[..., None], -math.inf)  # [Ni, N, N_c]
    w = torch.softmax(logits, dim=1)
    agg = torch.einsum("inc,ind->icd", w, img["x"])
    if k < n:
      f = torch.softmax(score.masked_fill(hard, -math.inf), dim=-1)
      fused = torch.einsum("in,ind->id", f, img["x"])[:, None]
    else:  # nothing dropped: an empty softmax-weighted sum is the zero token
      fused = torch.zeros_like(agg[:, :1])
    return max_normalize(torch.cat([img["cls"], agg, fused], dim=1))

  def score(self, img: dict, txt: dict, dense: Optional[dict] = None, *,
            dense_mode: Optional[str] = None,
            caption_image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All-pairs scores [Ni, Nc].

    Args:
      img: `encode_images` output (Ni images).
      txt: `encode_texts` output (Nc captions).
      dense: `encode_texts` of the dense captions, ONE PER IMAGE (needed if the dense branch is on).
      dense_mode: "honest" (dense caption of the candidate image guides its selection; the query
        caption's words are aligned) or "parity" (official: caption j is paired with the dense
        caption of `caption_image[j]`, and text is cut to `eval_text_cut` tokens). Default: the
        export's eval dense mode.
      caption_image: [Nc] ground-truth image row of each caption (parity only).
    """
    h = self.meta["heads"]
    mode = dense_mode or self.meta["dense_mode"]
    if mode not in ("honest", "parity"):
      raise ValueError(f"dense_mode must be 'honest' or 'parity', got {mode!r}.")
    slope = h["leaky_slope"]
    cap_tok, cap_mask = txt["tokens"], txt["mask"].bool()
    d_tok = d_mask = None
    if h["use_dense"]:
      if dense is None:
        raise ValueError("This SEPS model has a dense branch: score() needs dense features.")
      d_tok, d_mask = dense["tokens"], dense["mask"].bool()
      if mode == "parity":
        if caption_image is None:
          raise ValueError("dense_mode='parity' needs caption_image [Nc].")
        idx = torch.as_tensor(caption_image, dtype=torch.long)
        d_tok, d_mask = d_tok[idx], d_mask[idx]
    if mode == "parity" and h["eval_text_cut"] > 0:
      cap_mask = cap_mask & (torch.arange(cap_mask.shape[1]) < h["eval_text_cut"])
      if d_mask is not None:
        d_mask = d_mask & (torch.arange(d_mask.shape[1]) < h["eval_text_cut"])
    im = self._prepare_images(img["tokens"])
    cap_glo = max_normalize(_masked_mean(cap_tok, cap_mask))
    cap_words = max_normalize(cap_tok)
    ni, nc = im["x"].shape[0], cap_tok.shape[0]
    out = torch.zeros(ni, nc, dtype=im["x"].dtype)
    if h["use_sparse"]:
      for j in range(nc):
        toks = self._sdtps(im, cap_glo[j].expand(ni, -1))
        out[:, j] += _hrpa(toks, cap_words[j], cap_mask[j], slope)
    if h["use_dense"]:
      d_glo = max_normalize(_masked_mean(d_tok, d_mask))
      if mode == "honest":  # per-image selection, aligned with the query caption's words
        toks = self._sdtps(im, d_glo)
        for j in range(nc):
          out[:, j] += _hrpa(toks, cap_words[j], cap_mask[j], slope)
      else:  # parity: caption j's own (ground-truth) dense caption guides and is aligned
        d_words = max_normalize(d_tok)
        for j in range(nc):
          toks = self._sdtps(im, d_glo[j].expand(ni, -1))
          out[:, j] += _hrpa(toks, d_words[j], d_mask[j], slope)
    return out

  def forward(self, pixel_values, input_ids, attention_mask, dense_ids=None, dense_mask=None,
              **kwargs):
    dense = None if dense_ids is None else self.encode_texts(dense_ids, dense_mask)
    return self.score(self.encode_images(pixel_values),
                      self.encode_texts(input_ids, attention_mask), dense, **kwargs)


# ----------------------------------------------------------------------------------------------
# Encoders and loading.
# ----------------------------------------------------------------------------------------------
def _vision_tokens(encoder, pixel_values, meta):
  kwargs = {"interpolate_pos_encoding": True} if meta["vision_model_type"] == "vit" else {}
  return encoder(pixel_values=pixel_values, **kwargs).last_hidden_state


def _text_tokens(encoder, input_ids, attention_mask):
  return encoder(input_ids=input_ids, attention_mask=attention_mask,
                 token_type_ids=torch.zeros_like(input_ids)).last_hidden_state


MODELS = {"grm": GRMModel, "seps": SEPSModel}


def _hf_encoder(path: str, model_type: str):
  import transformers  # pylint: disable=import-outside-toplevel
  cls = {"vit": transformers.ViTModel, "swin": transformers.SwinModel,
         "bert": transformers.BertModel}.get(model_type)
  if cls is None:
    raise ValueError(f"Unsupported encoder model_type {model_type!r} in {path}.")
  kwargs = {} if model_type == "swin" else {"add_pooling_layer": False}
  return cls.from_pretrained(path, **kwargs)


def read_metadata(export_dir: str) -> dict:
  path = os.path.join(export_dir, "metadata.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{export_dir} is not a gseps_jax export: no metadata.json.")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, this loader reads "
                     f"{FORMAT_VERSION}.")
  if meta.get("model_type") not in MODELS:
    raise ValueError(f"{path}: unknown model_type {meta.get('model_type')!r}; expected one of "
                     f"{sorted(MODELS)}.")
  return meta


def load(export_dir: str) -> nn.Module:
  """The export's model (GRMModel or SEPSModel) in eval mode, float32, on CPU."""
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  meta = read_metadata(export_dir)
  vision = _hf_encoder(os.path.join(export_dir, "vision_encoder"), meta["vision_model_type"])
  text = _hf_encoder(os.path.join(export_dir, "text_encoder"), "bert")
  model = MODELS[meta["model_type"]](vision, text, meta)
  heads = load_file(os.path.join(export_dir, "heads.safetensors"))
  missing, unexpected = model.load_state_dict(heads, strict=False)
  missing = [k for k in missing if not k.startswith(("vision_encoder.", "text_encoder."))]
  if missing or unexpected:
    raise ValueError(f"heads.safetensors does not match the {meta['model_type']} model: missing "
                     f"{sorted(missing)}, unexpected {sorted(unexpected)}.")
  return model.float().eval()


def load_tokenizer(export_dir: str):
  """The BERT WordPiece tokenizer saved in `text_encoder/` (slow `BertTokenizer` from vocab.txt:
  transformers 5's `BertTokenizerFast(vocab_file=...)` maps every word to [UNK])."""
  from transformers import BertTokenizer  # pylint: disable=import-outside-toplevel
  d = os.path.join(export_dir, "text_encoder")
  kwargs = {}
  cfg = os.path.join(d, "tokenizer_config.json")
  if os.path.isfile(cfg):
    with open(cfg) as f:
      kwargs["do_lower_case"] = bool(json.load(f).get("do_lower_case", True))
  return BertTokenizer(os.path.join(d, "vocab.txt"), **kwargs)


def tokenize(tokenizer, texts, max_len: int):
  """texts -> (input_ids [N, max_len] long, attention_mask [N, max_len] long): [CLS] pieces
  [SEP], truncated keeping [SEP], padded with [PAD] (the gseps_jax tokenisation)."""
  ids = torch.full((len(texts), max_len), tokenizer.pad_token_id, dtype=torch.long)
  mask = torch.zeros((len(texts), max_len), dtype=torch.long)
  for i, t in enumerate(texts):
    body = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(t))[:max_len - 2]
    row = [tokenizer.cls_token_id] + body + [tokenizer.sep_token_id]
    ids[i, :len(row)] = torch.tensor(row)
    mask[i, :len(row)] = 1
  return ids, mask
