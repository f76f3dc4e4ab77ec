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

from cispo_jax.losses import token_logps_and_entropy


def _chunk_logps(h_BxCxE, head_ExV, tokens_BxC, temperature):
  from cispo_jax.sharding.mesh import constrain  # lazy: cispo_jax.sharding imports the model
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
