"""Choosing the next token: temperature, then top-k / top-p / min-p filters, then a draw (or the argmax).
`cfg` is a sampling.SamplingConfig (or anything with its fields)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30  # finite: a fully filtered row stays NaN-free


def filter_logits(scaled_BxV, cfg):
  """Top-k, then top-p, then min-p on temperature-scaled logits; filtered entries -> -1e30."""
  x = scaled_BxV
  if cfg.top_k and cfg.top_k < x.shape[-1]:
    kth_B1 = jax.lax.top_k(x, cfg.top_k)[0][:, -1:]
    x = jnp.where(x >= kth_B1, x, _NEG_INF)  # ties with the k-th survive
  if cfg.top_p < 1.0:
    x = jnp.where(x >= _top_p_cut(x, cfg.top_p, cfg.top_k), x, _NEG_INF)
  if cfg.min_p > 0.0:
    # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p)
    cut_B1 = jnp.max(x, axis=-1, keepdims=True) + jnp.log(cfg.min_p)
    x = jnp.where(x >= cut_B1, x, _NEG_INF)
  return x


TOP_P_CANDIDATES = 256  # top-p looks at the best this many first; the whole vocabulary only if they fall short


def _top_p_cut(x_BxV, top_p: float, top_k: int):
  """The smallest logit of the shortest prefix (by logit) whose probability mass reaches top_p, per row [B, 1].

  Not a sort of the vocabulary (151,936 entries for Qwen) at every step: the prefix is searched among the
  top C logits (C = top_k when top-k ran first, else TOP_P_CANDIDATES), found with a partial top-k. When
  those C hold less than top_p of some row's mass, that step sorts the whole vocabulary, so the cut is
  the exact filter's either way (tests/test_sampling.py: the same kept set except at ties)."""
  V = x_BxV.shape[-1]
  lse_B1 = jax.nn.logsumexp(x_BxV, axis=-1, keepdims=True)

  def cut(sorted_BxC):
    probs = jnp.exp(sorted_BxC - lse_B1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the top token always stays
    return jnp.min(jnp.where(keep, sorted_BxC, jnp.inf), axis=-1, keepdims=True), probs.sum(-1)

  C = min(V, top_k or TOP_P_CANDIDATES)
  if C == V:
    return cut(-jnp.sort(-x_BxV, axis=-1))[0]
  cut_B1, mass_B = cut(jax.lax.top_k(x_BxV, C)[0])
  if top_k:  # the others are filtered out already: the candidates hold all the mass
    return cut_B1
  return jax.lax.cond(jnp.all(mass_B >= top_p), lambda: cut_B1,
                      lambda: cut(-jnp.sort(-x_BxV, axis=-1))[0])


def choose_tokens(logits_BxV, key, cfg):
  """Next token per row and its log-prob under log_softmax(logits / temperature)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if cfg.greedy:
    scaled_BxV = logits_BxV
    tok_B = jnp.argmax(scaled_BxV, axis=-1)
  else:
    scaled_BxV = logits_BxV / cfg.temperature
    tok_B = jax.random.categorical(key, filter_logits(scaled_BxV, cfg), axis=-1)
  logp_B = jnp.take_along_axis(jax.nn.log_softmax(scaled_BxV, axis=-1), tok_B[:, None], -1)[:, 0]
  return tok_B.astype(jnp.int32), logp_B
