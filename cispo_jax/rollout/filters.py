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
    sorted_BxV = -jnp.sort(-x, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # Smallest prefix whose mass reaches top_p; its last logit is the cut (the top token always stays).
    keep_BxV = mass_before_BxV < cfg.top_p
    cut_B1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x >= cut_B1, x, _NEG_INF)
  if cfg.min_p > 0.0:
    # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p)
    cut_B1 = jnp.max(x, axis=-1, keepdims=True) + jnp.log(cfg.min_p)
    x = jnp.where(x >= cut_B1, x, _NEG_INF)
  return x


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
