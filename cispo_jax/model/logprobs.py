"""Token log-probs and entropies from hidden states, with the LM head applied in chunks.

At a 150k vocabulary the LM head is the largest activation of a long sequence: a float32
[16k, 152k] logits array is 9.3 GiB, and the log-softmax, the entropy and their gradients
each add another. `token_logps_and_entropy_chunked` maps over chunks of `chunk` completion
positions; each chunk's function is rematerialised, so the forward keeps only [B, T] results
and the backward recomputes one chunk's [B, chunk, V] logits at a time. Peak memory of the
head is a few [B, chunk, V] float32 buffers whatever the completion length.

Short completions (T <= chunk, e.g. the tiny default experiment) take the plain path: one
head matmul, no loop, the same program as before chunking existed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cispo_jax.model.config import ModelConfig
from cispo_jax.model.transformer import hidden_states, lm_head
from cispo_jax.sharding.mesh import constrain


def token_logps_and_entropy(logits_BxTxV, tokens_BxT, temperature=1.0):
  """f32 log-probs of `tokens` and entropy under softmax(logits / temperature)."""
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0")
  logits = logits_BxTxV.astype(jnp.float32) / temperature
  logz_BxT = jax.nn.logsumexp(logits, axis=-1)
  picked_BxT = jnp.take_along_axis(logits, tokens_BxT[..., None].astype(jnp.int32), -1)[..., 0]
  probs = jnp.exp(logits - logz_BxT[..., None])
  entropy_BxT = logz_BxT - (probs * logits).sum(-1)
  return picked_BxT - logz_BxT, entropy_BxT


def _chunk_logps(h_BxCxE, head_ExV, tokens_BxC, temperature):
  h_BxCxE = constrain(h_BxCxE, "batch", None, None)
  logits_BxCxV = constrain(jnp.einsum("bce,ev->bcv", h_BxCxE.astype(head_ExV.dtype), head_ExV,
                                      preferred_element_type=jnp.float32), "batch", None, "vocab")
  return token_logps_and_entropy(logits_BxCxV, tokens_BxC, temperature)


def token_logps_and_entropy_chunked(h_BxTxE, head_ExV, tokens_BxT, temperature: float = 1.0,
                                    chunk: int = 1024):
  """f32 log-probs of `tokens_BxT` and entropies under softmax(h @ head / temperature), [B, T] each.

  `h_BxTxE[:, t]` is the hidden state that predicts `tokens_BxT[:, t]`. Equal to
  `token_logps_and_entropy(h @ head, tokens)` in value and gradient (tested), without ever
  holding [B, T, V] when T > chunk.
  """
  B, T, E = h_BxTxE.shape
  if T <= chunk:
    return _chunk_logps(h_BxTxE, head_ExV, tokens_BxT, temperature)
  n = -(-T // chunk)
  pad = n * chunk - T
  h_BxTxE = jnp.pad(h_BxTxE, ((0, 0), (0, pad), (0, 0)))
  tokens_BxT = jnp.pad(tokens_BxT, ((0, 0), (0, pad)))
  # Chunks on a new leading axis; the (sharded) batch axis stays whole inside each chunk, so the
  # loop runs over an unsharded axis and needs no communication.
  h_NxBxCxE = h_BxTxE.reshape(B, n, chunk, E).swapaxes(0, 1)
  tokens_NxBxC = tokens_BxT.reshape(B, n, chunk).swapaxes(0, 1)
  one = jax.checkpoint(lambda h, t: _chunk_logps(h, head_ExV, t, temperature),
                       policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
  logps_NxBxC, entropy_NxBxC = jax.lax.map(lambda args: one(*args), (h_NxBxCxE, tokens_NxBxC))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]  # noqa: E731
  return unchunk(logps_NxBxC), unchunk(entropy_NxBxC)


def completion_logps(params, model_cfg: ModelConfig, tokens_BxL, kv_valid_BxL, n_completion: int,
                     temperature: float):
  """Log-probs and entropies of the last n_completion tokens, as the sampler computes them.

  The LM head runs in chunks of model_cfg.logprob_chunk positions (model/logprobs.py): no
  [B, N, V] float32 array exists for a long completion.
  """
  h_Bx1NxE = hidden_states(params, model_cfg, tokens_BxL, kv_valid_BxL, last_n=n_completion + 1)
  h_BxNxE = h_Bx1NxE[:, :-1]  # position t predicts token t + 1
  return token_logps_and_entropy_chunked(h_BxNxE, lm_head(params, model_cfg), tokens_BxL[:, -n_completion:],
                                         temperature, chunk=model_cfg.logprob_chunk)
