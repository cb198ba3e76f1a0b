"""Float64 NumPy reference of SEPS scoring (SDTPS + HRPA), written from the SEPS paper as plain
per-pair loops. Independent of gseps_jax: used only to check `gseps_jax.models.seps`.
"""

import math

import numpy as np


def _normalize(v, eps=1e-12):
  return v / max(np.linalg.norm(v), eps)


def _softmax(v):
  e = np.exp(v - v.max())
  return e / e.sum()


def _gelu(v):
  return 0.5 * v * (1.0 + np.vectorize(math.erf)(v / math.sqrt(2.0)))


def aggr_logits(x, p):
  """Official aggregation net on patches x [K, D] -> [K, N_c] (scale included)."""
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  h = (x - mu) / np.sqrt(var + 1e-5) * p["ln_w"] + p["ln_b"]
  h = _gelu(h @ p["w1"].T + p["b1"])
  return (h @ p["w2"].T + p["b2"]) * p["scale"]


def sdtps(tokens, text, p, rho, tie_break="low"):
  """Final image tokens for one image guided by one text.

  tokens: [L, D] raw image tokens; text: [n_words, D] raw valid text tokens.
  tie_break: "low" keeps the lower index among equal scores (the spec); "high" the other one.
  Returns [C + N_c + 1, D] normalised tokens.
  """
  n_tok = tokens.shape[0]
  c = 0 if math.isqrt(n_tok) ** 2 == n_tok else 1
  cls, x = tokens[:c], tokens[c:]
  n = x.shape[0]
  img_mean = _normalize(x.mean(0))
  txt_mean = _normalize(text.mean(0))
  score = np.array([_normalize(x[i]) @ img_mean + _normalize(x[i]) @ txt_mean for i in range(n)])
  k = math.ceil(n * rho)
  sign = 1 if tie_break == "low" else -1
  order = sorted(range(n), key=lambda i: (-score[i], sign * i))  # descending score
  kept, dropped = order[:k], order[k:]
  xk = x[kept]
  w = aggr_logits(xk, p)  # [K, N_c]
  agg = np.stack([_softmax(w[:, c_]) @ xk for c_ in range(w.shape[1])])
  if dropped:
    fused = _softmax(score[dropped]) @ x[dropped]
  else:
    fused = np.zeros(x.shape[1])
  out = np.concatenate([cls, agg, fused[None]], 0)
  return np.stack([_normalize(t) for t in out])


def hrpa(img_tokens_n, words):
  """img_tokens_n: [T, D] normalised; words: [n_words, D] raw valid words."""
  wn = np.stack([_normalize(w) for w in words])
  a = wn @ img_tokens_n.T
  a = np.where(a > 0, a, 0.1 * a)
  return a.max(1).mean() + a.max(0).mean()


def seps_scores(img, caps, cap_lens, dense, dense_lens, p, rho, *, mode, use_sparse=True,
                use_dense=True):
  """[Ni, Nc] float64 scores.

  img [Ni, L, D]; caps [Nc, Lt, D] with lengths cap_lens; dense [Nd, Ld, D] with dense_lens,
  Nd = Nc for mode 'parity' (caption-aligned), Ni for 'honest' (image-aligned).
  """
  ni, nc = img.shape[0], caps.shape[0]
  out = np.zeros((ni, nc))
  for i in range(ni):
    for j in range(nc):
      cap = caps[j, :cap_lens[j]]
      s = 0.0
      if use_sparse:
        s += hrpa(sdtps(img[i], cap, p, rho), cap)
      if use_dense:
        if mode == "parity":
          dj = dense[j, :dense_lens[j]]
          s += hrpa(sdtps(img[i], dj, p, rho), dj)
        else:
          di = dense[i, :dense_lens[i]]
          s += hrpa(sdtps(img[i], di, p, rho), cap)
      out[i, j] = s
  return out
