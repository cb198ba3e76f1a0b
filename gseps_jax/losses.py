"""Retrieval losses shared by GRM and SEPS, and GRM's auxiliary losses (`grm_aux`, from the named
intermediates of the GRM head). All pure functions.

Score matrices are `[B, B]` with row = image i, column = caption j; the positive pair of row i is
column i. `image_ids [B]` names the image behind each row/caption: captions whose image id equals
row i's (other than the diagonal) describe the same picture, so they are removed from the
negatives ("shared-image masking"), as in the SEPS official code.

Learnable InfoNCE temperature: `infonce` takes `log_temperature` (a scalar array). It is a model
parameter: a model that supports InfoNCE declares a top-level scalar param 'log_temperature'
(GRM: `model.grm.learn_temperature=True`, initialised to log(init_temperature)), so it is trained,
sharded and checkpointed with the rest; `total_loss(..., params=params)` picks it up.
"""

from typing import Any, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp

Bool = Union[bool, jax.Array]


def _check_square(sims, image_ids):
  if sims.ndim != 2 or sims.shape[0] != sims.shape[1]:
    raise ValueError(f"sims must be a square [B, B] matrix, got {sims.shape}")
  if image_ids.shape != (sims.shape[0],):
    raise ValueError(f"image_ids must be [B] = [{sims.shape[0]}], got {image_ids.shape}")


def _at_least_f32(x: jax.Array) -> jax.Array:
  """`x` as float32 if it is narrower: the aux losses below reduce bf16 inputs in float32."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def shared_image_mask(image_ids: jax.Array) -> jax.Array:
  """`[B, B]` bool: True where row i and column j show the same image (diagonal included)."""
  return image_ids[:, None] == image_ids[None, :]


def vse_hinge(sims: jax.Array, image_ids: jax.Array, *, margin: float = 0.2,
              hardest: bool = True) -> jax.Array:
  """VSE++ triplet hinge in both directions, SUMMED over the batch.

  cost_c[i, j]  = relu(margin + s[i, j] - s[i, i])   (image i, negative caption j)
  cost_im[i, j] = relu(margin + s[i, j] - s[j, j])   (caption j, negative image i)
  Pairs sharing an image id (diagonal included) are no negatives. `hardest=True`: per query only
  the largest violation counts (VSE++); False: all negatives summed (the warm-up form).

  Args:
    sims: `[B, B]` scores.
    image_ids: `[B]` int image identity of each row / caption.
    margin: hinge margin.
    hardest: hardest negative vs all negatives.

  Returns:
    scalar float32.
  """
  _check_square(sims, image_ids)
  sims = sims.astype(jnp.float32)
  pos = jnp.diagonal(sims)
  same = shared_image_mask(image_ids)
  cost_c = jnp.where(same, 0.0, jax.nn.relu(margin + sims - pos[:, None]))
  cost_im = jnp.where(same, 0.0, jax.nn.relu(margin + sims - pos[None, :]))
  if hardest:
    return jnp.sum(jnp.max(cost_c, axis=1)) + jnp.sum(jnp.max(cost_im, axis=0))
  return jnp.sum(cost_c) + jnp.sum(cost_im)


def hinge_with_warmup(sims: jax.Array, image_ids: jax.Array, *, margin: float = 0.2,
                      warmup: Bool = False, warmup_scale: Union[float, jax.Array] = 1.0
                      ) -> jax.Array:
  """The SEPS/GRM schedule: warm-up = all negatives x `warmup_scale`, then hardest negatives.

  The caller states the schedule explicitly: in the official recipe `warmup` is
  `epoch < loss.warmup_epochs` and `warmup_scale` = i / n_batches, the position within the epoch.
  Both may be Python values (the unused branch is not traced) or traced arrays (one compile
  serves the whole run).

  Args:
    sims: `[B, B]`; image_ids: `[B]`; margin: hinge margin.
    warmup: bool or bool scalar array.
    warmup_scale: multiplier of the warm-up loss.

  Returns:
    scalar float32.
  """
  if isinstance(warmup, bool):
    if warmup:
      return warmup_scale * vse_hinge(sims, image_ids, margin=margin, hardest=False)
    return vse_hinge(sims, image_ids, margin=margin, hardest=True)
  all_neg = warmup_scale * vse_hinge(sims, image_ids, margin=margin, hardest=False)
  return jnp.where(warmup, all_neg, vse_hinge(sims, image_ids, margin=margin, hardest=True))


def infonce(sims: jax.Array, image_ids: jax.Array, log_temperature: jax.Array) -> jax.Array:
  """Symmetric InfoNCE with temperature exp(log_temperature), averaged over the batch.

  Same-image off-diagonal pairs are removed from the softmax denominators (they are not
  negatives); the diagonal is the target in both directions.

  Args:
    sims: `[B, B]`; image_ids: `[B]`.
    log_temperature: scalar (learnable; see the module docstring).

  Returns:
    scalar float32: (CE over rows + CE over columns) / 2.
  """
  _check_square(sims, image_ids)
  logits = sims.astype(jnp.float32) * jnp.exp(-jnp.asarray(log_temperature, jnp.float32))
  eye = jnp.eye(sims.shape[0], dtype=bool)
  logits = jnp.where(shared_image_mask(image_ids) & ~eye, -jnp.inf, logits)
  pos = jnp.diagonal(logits)
  i2t = jax.nn.logsumexp(logits, axis=1) - pos
  t2i = jax.nn.logsumexp(logits, axis=0) - pos
  return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


# ----------------------------------------------------------------------------- GRM auxiliaries


def recon_loss(region_means: jax.Array, tokens: jax.Array, keep: jax.Array,
               eps: float = 1e-12) -> jax.Array:
  """1 - cos(mean_k mu_k, mean of kept tokens), averaged over images.

  Args:
    region_means: `[B, K, D]` mu.
    tokens: `[B, L, D]` visual tokens.
    keep: `[B, L]` bool (or 0/1), or float keep weights (a weighted mean; GRM passes the
      straight-through keep mask, so the saliency adapter gets this loss's gradient).
    eps: added to the squared norms (a finite gradient for zero vectors).

  Returns:
    scalar (float32 for bf16 inputs).
  """
  region_means, tokens = _at_least_f32(region_means), _at_least_f32(tokens)
  keep = keep.astype(tokens.dtype)
  kept_mean = jnp.sum(tokens * keep[..., None], axis=1) / jnp.maximum(
      jnp.sum(keep, axis=1, keepdims=True), 1.0)
  a, b = jnp.mean(region_means, axis=1), kept_mean
  cos = jnp.sum(a * b, -1) * jax.lax.rsqrt(
      (jnp.sum(a * a, -1) + eps) * (jnp.sum(b * b, -1) + eps))
  return jnp.mean(1.0 - cos)


def kl_loss(logvar: jax.Array) -> jax.Array:
  """Variance part of KL(N(mu, sigma^2) || N(0, I)): 0.5 * mean(sigma^2 - log sigma^2 - 1).

  Args:
    logvar: `[B, K, D]` log sigma^2.
  """
  logvar = _at_least_f32(logvar)
  return 0.5 * jnp.mean(jnp.exp(logvar) - logvar - 1.0)


def column_entropy(attn: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Entropy (nats) of each column of the column-normalised attention.

  Args:
    attn: `[B, L, K]` Â, columns summing to 1 (or 0 for an all-zero column).

  Returns:
    `[B, K]` (float32 for bf16 inputs).
  """
  attn = _at_least_f32(attn)
  return -jnp.sum(attn * jnp.log(attn + eps), axis=1)


def entropy_loss(attn: jax.Array) -> jax.Array:
  """Negative mean column entropy of Â `[B, L, K]`: minimising it spreads each region."""
  return -jnp.mean(column_entropy(attn))


def entropy_floor_loss(attn: jax.Array, floor: Optional[float]) -> jax.Array:
  """Bounded L_ent: mean relu(floor - column entropy) of Â `[B, L, K]`.

  "Preventing attention collapse" means no region on a single patch (entropy 0); the unbounded
  form (`entropy_loss`, floor None) keeps pushing every column towards uniform, i.e. towards
  every region = the global mean, which is the collapse seen in practice. With a floor the loss
  is 0 once a column spreads over about exp(floor) patches.

  Args:
    attn: `[B, L, K]` Â.
    floor: entropy floor in nats; None = the unbounded `entropy_loss`.

  Returns:
    scalar.
  """
  if floor is None:
    return entropy_loss(attn)
  return jnp.mean(jax.nn.relu(floor - column_entropy(attn)))


def keep_ratio(mask: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean keep weight over the valid tokens of the batch (forward: the fraction kept)."""
  mask = jnp.where(valid, mask.astype(jnp.float32), 0.0)
  return jnp.sum(mask) / jnp.maximum(jnp.sum(valid), 1)


def keep_penalty(mask: jax.Array, valid: jax.Array, target: float) -> jax.Array:
  """DynamicViT's ratio loss: mean over items of (keep ratio of the item - target)^2.

  Args:
    mask: `[B, L]` keep weights (straight-through: the forward ratio is the hard one, the
      gradient reaches the soft keep probabilities).
    valid: `[B, L]` bool.
    target: the wanted fraction of valid tokens kept.

  Returns:
    scalar; items without a valid token count 0.
  """
  n = jnp.sum(valid, axis=-1)
  r = jnp.sum(jnp.where(valid, mask.astype(jnp.float32), 0.0), axis=-1) / jnp.maximum(n, 1)
  return jnp.mean(jnp.where(n > 0, jnp.square(r - target), 0.0))


def grm_aux(inter: Mapping[str, Any], *, keep_target: float, keep_img: bool, keep_txt: bool,
            entropy_floor: Optional[float]) -> dict:
  """GRM's auxiliary losses and metrics from the named intermediates of its training head.

  Args:
    inter: 'img_tokens' `[B, Lv, E]` V, 'img_valid' `[B, Lv]` bool, 'img_mask' `[B, Lv]` SA keep
      weights, 'txt_valid' `[B, Lt]`, 'txt_mask' `[B, Lt]` GA keep weights; with region prompts
      'region_attn' `[B, Lv, K]` Â, 'region_means' `[B, K, E]` mu, 'region_stats' (scalars
      region_entropy / region_cos / region_mean_cos) and, with uncertainty, 'region_logvar'
      `[B, K, E]`; absent (None) entries are components switched off.
    keep_target: the keep ratio the penalty pulls towards.
    keep_img, keep_txt: whether SA / GA decide (else their penalty is 0).
    entropy_floor: the bound of the entropy loss (`entropy_floor_loss`).

  Returns:
    scalars 'recon', 'kl', 'ent', 'div', 'keep' (0 for a component switched off) and the
    metrics 'keep_ratio_img', 'keep_ratio_txt', 'region_entropy', 'region_cos',
    'region_mean_cos'.
  """
  zero = jnp.zeros((), jnp.float32)
  w_img, w_txt = inter["img_mask"], inter["txt_mask"]
  aux = {
      "recon": zero, "kl": zero, "ent": zero, "div": zero,
      "keep": (keep_penalty(w_img, inter["img_valid"], keep_target) if keep_img else zero)
              + (keep_penalty(w_txt, inter["txt_valid"], keep_target) if keep_txt else zero),
      "keep_ratio_img": keep_ratio(w_img, inter["img_valid"]),
      "keep_ratio_txt": keep_ratio(w_txt, inter["txt_valid"]),
      "region_entropy": zero, "region_cos": zero, "region_mean_cos": zero,
  }
  if inter.get("region_attn") is not None:
    aux.update(inter["region_stats"])
    aux["recon"] = recon_loss(inter["region_means"], inter["img_tokens"], w_img)
    aux["ent"] = entropy_floor_loss(inter["region_attn"], entropy_floor)
    aux["div"] = inter["region_stats"]["region_cos"]
    if inter.get("region_logvar") is not None:
      aux["kl"] = kl_loss(inter["region_logvar"])
  return aux


# ----------------------------------------------------------------------------- combination


def head_aux_weights(head) -> Optional[dict]:
  """The aux weights of a head config: `aux_weights`, plus GRM's `keep_ratio_weight` (aux 'keep',
  the keep-ratio penalty) and `region_div_weight` (aux 'div', the region-map overlap) where the
  head has them. None when the head names no weight."""
  weights = head.get("aux_weights", None)
  weights = None if weights is None else dict(weights)
  for field, name in (("keep_ratio_weight", "keep"), ("region_div_weight", "div")):
    if head.get(field, None) is not None:
      weights = dict(weights or {}, **{name: float(head[field])})
  return weights


def contrastive_loss(sims, image_ids, loss_cfg, *, warmup, warmup_scale, log_temperature=None):
  """The configured contrastive loss of one `[B, B]` score matrix (`loss_cfg.kind`)."""
  kind = loss_cfg["kind"]
  if kind == "hinge":
    return hinge_with_warmup(sims, image_ids, margin=loss_cfg["margin"], warmup=warmup,
                             warmup_scale=warmup_scale)
  if kind == "infonce":
    if log_temperature is None:
      raise ValueError("loss kind 'infonce' needs log_temperature: pass it, or params with a "
                       "'log_temperature' entry (GRM: model.grm.learn_temperature=True)")
    return infonce(sims, image_ids, log_temperature)
  raise ValueError(f"unknown loss kind {kind!r}; expected 'hinge' or 'infonce'")


def total_loss(sims: Mapping[str, jax.Array], aux: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array], loss_cfg: Mapping[str, Any], *,
               level_weights: Optional[Mapping[str, float]] = None,
               aux_weights: Optional[Mapping[str, float]] = None,
               warmup: Bool = False, warmup_scale: Union[float, jax.Array] = 1.0,
               log_temperature: Optional[jax.Array] = None,
               params: Optional[Mapping[str, Any]] = None) -> Tuple[jax.Array, dict]:
  """sum_level w_level * L(sims[level]) + sum_name w_name * aux[name].

  GRM: sims = {'ori', 'key', 'unc'} with level weights (a, b, c), aux weights for 'recon', 'kl',
  'ent'. SEPS: sims = {'seps'}, aux = {'ratio_loss'} with no aux weight (reported only).
  Aux entries without a weight are metrics only.

  Args:
    sims: level -> `[B, B]` scores.
    aux: name -> scalar (auxiliary losses and metrics).
    batch: needs 'image_index' `[B]` (the image id of each row/caption).
    loss_cfg: `config.loss` (kind, margin, ...), or the whole run config (has 'loss' and
      'model'): then `config.loss` is used and weights not given explicitly come from
      `config.model.<config.model.name>.level_weights / aux_weights` (absent = defaults below).
    level_weights: level -> weight; None = 1 for every level. Must cover every level of sims.
    aux_weights: aux name -> weight; None = {}. Every name must be in aux.
    warmup, warmup_scale: the hinge schedule (see `hinge_with_warmup`).
    log_temperature: InfoNCE temperature parameter; None = `params['log_temperature']` when
      `params` (the model's params, e.g. GRM with `grm.learn_temperature`) has it.
    params: model params, only read for 'log_temperature'.

  Returns:
    (scalar loss, metrics dict: 'loss', 'loss_<level>' for each level, every aux entry).
  """
  if "loss" in loss_cfg and "model" in loss_cfg:  # the whole run config
    head = loss_cfg["model"].get(loss_cfg["model"]["name"], None) or {}
    level_weights = head.get("level_weights", None) if level_weights is None else level_weights
    if aux_weights is None:
      aux_weights = head_aux_weights(head)
    loss_cfg = loss_cfg["loss"]
  if log_temperature is None and params is not None and "log_temperature" in params:
    log_temperature = params["log_temperature"]
  level_weights = {k: 1.0 for k in sims} if level_weights is None else dict(level_weights)
  aux_weights = {} if aux_weights is None else dict(aux_weights)
  missing = set(sims) - set(level_weights)
  if missing:
    raise ValueError(f"no level weight for score levels {sorted(missing)}; got {level_weights}")
  missing = set(aux_weights) - set(aux)
  if missing:
    raise ValueError(f"aux_weights name {sorted(missing)} not produced by the model; aux has "
                     f"{sorted(aux)}")
  ids = batch["image_index"]
  metrics, loss = {}, jnp.zeros((), jnp.float32)
  for level, s in sims.items():
    l = contrastive_loss(s, ids, loss_cfg, warmup=warmup, warmup_scale=warmup_scale,
                         log_temperature=log_temperature)
    metrics[f"loss_{level}"] = l
    loss = loss + level_weights[level] * l
  for name, value in aux.items():
    metrics[name] = value
    if name in aux_weights:
      loss = loss + aux_weights[name] * value
  if log_temperature is not None:
    metrics["temperature"] = jnp.exp(log_temperature)
  metrics["loss"] = loss
  return loss, metrics
