"""Causal GQA attention with a padding mask: one dense reference and three memory-efficient paths.

Conventions (the same as transformer.py):
  q_BxTxHxD          queries after RoPE; H = K * G query heads, G query heads share a kv head.
  k_BxSxKxD, v_...   keys / values (S slots: the sequence itself, or a KV cache).
  kv_valid_BxS       which slots hold real tokens. A row is [left pads][prompt][completion][right
                     pads]: pads may sit at both ends.
  q_offset           slot of the first query (the cache index): query t sits at slot q_offset + t and
                     sees key s iff s <= q_offset + t and kv_valid[s]. A Python int or a traced int32.
The output has q's dtype; scores, softmax and accumulators are float32 whatever the input dtype.
Pad queries: only valid query rows (the query's own slot is valid) matter to the model, and all
paths agree with dense on them. A pad query gets some finite output with finite gradients, whose
value differs between paths: a left-pad query sees no valid key (dense: mean of all values,
blockwise: 0); a right-pad query sees earlier valid keys (dense and blockwise: attention over
them, cudnn: 0, splash: attention over the pad tokens only).

Paths (`attention(..., impl=...)`; `choose_impl` documents what "auto" picks):
  dense      the reference: one [B, H, T, S] f32 score matrix. Fastest for short sequences and
             decode (T small), quadratic memory otherwise. Any platform.
  blockwise  pure-JAX FlashAttention-2: queries in blocks of block_q, an online softmax over kv
             blocks of block_k, and a custom_vjp whose forward saves only (out, logsumexp) and
             whose backward recomputes probabilities block by block. Neither pass holds more
             than a few [B, block_q, H, block_k] score blocks plus [B, T, H, D]-sized buffers
             (out, logsumexp, dq). Kv blocks wholly in the causal future
             of a query block are skipped (dynamic loop bounds, so a traced q_offset works). Any
             platform; the fallback whenever a fused kernel does not apply.
  cudnn      jax.nn.dot_product_attention(implementation="cudnn") on NVIDIA GPUs. cuDNN expresses
             padding only as per-row lengths (a prefix of valid tokens), and a `mask=` argument
             would be materialised as a dense [B, H, T, S] bias. So for self-attention (T == S,
             q_offset == 0) each row is rotated left by its number of left pads: [left pads]
             [valid][right pads] becomes [valid][right pads][left pads], the valid tokens are a
             prefix of length n, and "causal + key/query length n" in the rotated frame is exactly
             "causal + kv_valid" in the original one (query t' = t - L sees keys s' <= t', i.e.
             original slots L..t). The output is rotated back. PRECONDITION: the valid slots of
             each row are one contiguous run (true for our batches: left-padded prompt + completion
             that is a prefix of its slots); a hole inside a row would be treated as valid.
             cuDNN also needs fp16/bf16 inputs and head_dim % 8 == 0, <= 128 (256 on Hopper+).
             Verified here only through the same code with implementation="xla" (CPU).
  splash     TPU Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention), for
             T == S and q_offset == 0: CausalMask per head plus SegmentIds(pad=0, real=1), so a
             valid query sees exactly the causal valid keys and a pad query sees earlier pads
             (always itself, so never an empty row). GQA is native (make_splash_mha accepts
             q heads = G * kv heads); batch is vmapped; the sequence is padded to a multiple of
             the block sizes, which must be multiples of 128. It runs on CPU with interpret=True
             (slow, tested at a tiny shape); the compiled kernel needs a TPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from cispo_jax.model.attention_kernels import _round_up, _static_int, cudnn_attention, splash_attention

IMPLS = ("auto", "dense", "blockwise", "cudnn", "splash")

# Same finite mask value as transformer.py: a fully-masked row gives no NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# "auto" thresholds, see choose_impl.
DECODE_MAX_T = 16           # T at or below this: dense (scores are [B, H, T, S] with T tiny).
DENSE_MAX_TS = 1024 * 1024  # T * S at or below this: dense when no fused kernel applies.


def _cudnn_max_head_dim(platform: str) -> int:
  # Hopper (sm_90) and later take head_dim up to 256; older GPUs up to 128.
  if platform == "gpu":
    try:
      cc = getattr(jax.devices("gpu")[0], "compute_capability", "0")
      if tuple(int(x) for x in str(cc).split(".")) >= (9, 0):
        return 256
    except Exception:  # no GPU visible (e.g. choosing for another platform): be conservative
      pass
  return 128


def choose_impl(impl: str, T: int, S: int, platform: str | None = None, *, dtype=None,
                head_dim: int | None = None, q_offset_is_zero: bool = True) -> str:
  """The path `attention(impl=impl)` takes; for impl != "auto", impl itself (validated).

  Rule for "auto" (platform defaults to jax.default_backend()):
    1. T <= DECODE_MAX_T (decode, or a few tokens): dense. Scores are [B, H, T, S] with T tiny,
       and the fused kernels' fixed costs (padding T to a block, rotation) would dominate.
    2. GPU, self-attention (T == S, q_offset statically 0), fp16/bf16 (dtype None counts as
       eligible), head_dim % 8 == 0 and <= 128 (256 on Hopper+): cudnn. Otherwise fall through
       (cudnn cannot express a decode/prefill mask with S != T or a traced offset, and
       rejects f32 and odd head dims).
    3. TPU, self-attention (T == S, q_offset statically 0): splash.
    4. T * S <= DENSE_MAX_TS (= 1024 * 1024, e.g. a 1024-token self-attention): dense. The f32
       scores then take at most 4 MiB per (batch row, head), and dense keeps the tiny test models
       and short RL sequences on the original code path. Measured on CPU (jit grad, B=4, H=4,
       D=16, default blocks): T=512 dense 0.09 s vs blockwise 0.15 s; T=1024 0.54 s vs 0.39 s
       (about break-even, where causal block skipping starts to pay); T=2048 (B=1) 0.81 s vs
       0.21 s, with 257 MiB vs 21 MiB of temporaries.
    5. Otherwise: blockwise (memory O(T + S) per head instead of O(T * S)).
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  if T <= DECODE_MAX_T:
    return "dense"
  self_attn = T == S and q_offset_is_zero
  if platform == "gpu" and self_attn:
    dtype_ok = dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    hd_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= _cudnn_max_head_dim(platform))
    if dtype_ok and hd_ok:
      return "cudnn"
  if platform == "tpu" and self_attn:
    return "splash"
  if T * S <= DENSE_MAX_TS:
    return "dense"
  return "blockwise"


def attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, kv_valid_BxS, q_offset=0, *, impl="auto",
              block_q=512, block_k=512):
  """Causal, padding-masked GQA attention; see the module docstring. Returns [B, T, H, D]."""
  T, D = q_BxTxHxD.shape[1], q_BxTxHxD.shape[3]
  S = k_BxSxKxD.shape[1]
  impl = choose_impl(impl, T, S, dtype=q_BxTxHxD.dtype, head_dim=D,
                     q_offset_is_zero=_static_int(q_offset) == 0)
  args = (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, kv_valid_BxS, q_offset)
  if impl == "dense":
    return dense_attention(*args)
  if impl == "blockwise":
    return blockwise_attention(*args, block_q=block_q, block_k=block_k)
  if impl == "cudnn":
    return cudnn_attention(*args)
  return splash_attention(*args, block_q=block_q, block_k=block_k)


# ----------------------------------------------------------------------------------------------
# dense (reference)


def dense_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, kv_valid_BxS, q_offset=0):
  """The original transformer.py attention: materialises [B, K, G, T, S] f32 scores."""
  B, T, H, D = q_BxTxHxD.shape
  S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  dt = q_BxTxHxD.dtype
  q_slot_T = q_offset + jnp.arange(T)
  causal_TxS = jnp.arange(S)[None, :] <= q_slot_T[:, None]
  mask_BxTxS = causal_TxS[None] & kv_valid_BxS[:, None, :].astype(bool)
  q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
  scores = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD.astype(dt),
                      preferred_element_type=jnp.float32) / math.sqrt(D)
  scores = jnp.where(mask_BxTxS[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD.astype(dt))
  return out_BxTxKxGxD.reshape(B, T, H, D)


# ----------------------------------------------------------------------------------------------
# blockwise (FlashAttention-2 in pure JAX)
#
# Internal layout: q and its cotangent as [B, Tp, K, G, D] (GQA groups next to their kv head, so
# a score block is one einsum with no kv-head repeat), k/v as [B, Sp, K, D], per-row statistics
# as [B, Tp, K, G]. Tp, Sp are T, S padded to whole blocks; padded keys are invalid, padded
# queries are sliced off. Query block i and kv block j interact iff kv block j starts at or before
# the last query slot of block i: j * bk <= q_offset + (i + 1) * bq - 1. Forward and backward
# visit exactly these pairs (forward: j < _kv_blocks_end(i); backward: i >= _q_blocks_start(j)).


def _kv_blocks_end(i, q_offset, bq, bk, nk):
  return jnp.clip((q_offset + (i + 1) * bq - 1) // bk + 1, 1, nk)


def _q_blocks_start(j, q_offset, bq, bk, nq):
  return jnp.clip((j * bk - q_offset) // bq, 0, nq)


def _block_mask(q_slot_bq, j, kv_valid_BxSp, bk):
  """[B, bq, 1, 1, bk]: causal & valid for query slots q_slot_bq against kv block j."""
  k_slot_bk = j * bk + jnp.arange(bk)
  valid_Bxbk = jax.lax.dynamic_slice_in_dim(kv_valid_BxSp, j * bk, bk, axis=1)
  mask = (k_slot_bk[None, :] <= q_slot_bq[:, None])[None] & valid_Bxbk[:, None, :]
  return mask[:, :, None, None, :]


def _block_scores(q_i, k_j, mask, scale):
  s = jnp.einsum("bqkgd,bskd->bqkgs", q_i, k_j, preferred_element_type=jnp.float32) * scale
  return jnp.where(mask, s, _MASK_VALUE)


def _flash_forward(q_BxTpxKxGxD, k_BxSpxKxD, v_BxSpxKxD, kv_valid_BxSp, q_offset, bq, bk):
  B, Tp, K, G, D = q_BxTpxKxGxD.shape
  nq, nk = Tp // bq, k_BxSpxKxD.shape[1] // bk
  dt = q_BxTpxKxGxD.dtype
  scale = 1.0 / math.sqrt(D)

  def q_block(i, bufs):
    out_buf, lse_buf = bufs
    q_i = jax.lax.dynamic_slice_in_dim(q_BxTpxKxGxD, i * bq, bq, axis=1)
    q_slot = q_offset + i * bq + jnp.arange(bq)

    def kv_block(j, state):
      m, l, acc = state
      k_j = jax.lax.dynamic_slice_in_dim(k_BxSpxKxD, j * bk, bk, axis=1)
      v_j = jax.lax.dynamic_slice_in_dim(v_BxSpxKxD, j * bk, bk, axis=1)
      mask = _block_mask(q_slot, j, kv_valid_BxSp, bk)
      s = _block_scores(q_i, k_j, mask, scale)
      m_new = jnp.maximum(m, s.max(-1))
      # Masked entries are zeroed explicitly (dense gets exp(MASK - max) == 0 by underflow, the
      # same thing for rows with a valid key); rows with none end with l == 0 and output 0.
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      l = l * alpha + p.sum(-1)
      acc = acc * alpha[..., None] + jnp.einsum("bqkgs,bskd->bqkgd", p.astype(dt), v_j,
                                                preferred_element_type=jnp.float32)
      return m_new, l, acc

    init = (jnp.full((B, bq, K, G), _MASK_VALUE, jnp.float32), jnp.zeros((B, bq, K, G), jnp.float32),
            jnp.zeros((B, bq, K, G, D), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, _kv_blocks_end(i, q_offset, bq, bk, nk), kv_block, init)
    l_safe = jnp.where(l > 0, l, 1.0)
    out_i = (acc / l_safe[..., None]).astype(dt)
    lse_i = m + jnp.log(l_safe)  # for l == 0 rows any finite value: the backward masks them out
    out_buf = jax.lax.dynamic_update_slice_in_dim(out_buf, out_i, i * bq, axis=1)
    lse_buf = jax.lax.dynamic_update_slice_in_dim(lse_buf, lse_i, i * bq, axis=1)
    return out_buf, lse_buf

  bufs = (jnp.zeros_like(q_BxTpxKxGxD), jnp.zeros((B, Tp, K, G), jnp.float32))
  return jax.lax.fori_loop(0, nq, q_block, bufs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q_BxTpxKxGxD, k_BxSpxKxD, v_BxSpxKxD, kv_valid_BxSp, q_offset, bq, bk):
  return _flash_forward(q_BxTpxKxGxD, k_BxSpxKxD, v_BxSpxKxD, kv_valid_BxSp, q_offset, bq, bk)[0]


def _flash_fwd(q, k, v, kv_valid, q_offset, bq, bk):
  out, lse = _flash_forward(q, k, v, kv_valid, q_offset, bq, bk)
  return out, (q, k, v, kv_valid, q_offset, out, lse)


def _flash_bwd(bq, bk, res, dout_BxTpxKxGxD):
  q_BxTpxKxGxD, k_BxSpxKxD, v_BxSpxKxD, kv_valid_BxSp, q_offset, out_BxTpxKxGxD, lse_BxTpxKxG = res
  B, Tp, K, G, D = q_BxTpxKxGxD.shape
  Sp = k_BxSpxKxD.shape[1]
  nq, nk = Tp // bq, Sp // bk
  dt = q_BxTpxKxGxD.dtype
  scale = 1.0 / math.sqrt(D)
  dout_BxTpxKxGxD = dout_BxTpxKxGxD.astype(dt)
  # FA2's D_i = rowsum(dO * O) = sum_s P * dP: the softmax-Jacobian term, without holding P.
  delta_BxTpxKxG = jnp.sum(dout_BxTpxKxGxD.astype(jnp.float32) * out_BxTpxKxGxD.astype(jnp.float32),
                           axis=-1)

  def kv_block(j, grads):
    # kv-outer: dk_j, dv_j accumulate in a block-sized carry and are written once; dq
    # accumulates in a [B, Tp, K, G, D] f32 buffer (the size of q, not of the scores).
    dq, dk, dv = grads
    k_j = jax.lax.dynamic_slice_in_dim(k_BxSpxKxD, j * bk, bk, axis=1)
    v_j = jax.lax.dynamic_slice_in_dim(v_BxSpxKxD, j * bk, bk, axis=1)

    def q_block(i, state):
      dq, dk_j, dv_j = state
      sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=1)  # noqa: E731
      q_i, do_i, lse_i, delta_i = sl(q_BxTpxKxGxD), sl(dout_BxTpxKxGxD), sl(lse_BxTpxKxG), sl(delta_BxTpxKxG)
      mask = _block_mask(q_offset + i * bq + jnp.arange(bq), j, kv_valid_BxSp, bk)
      s = _block_scores(q_i, k_j, mask, scale)
      p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)  # the forward's probabilities
      dv_j = dv_j + jnp.einsum("bqkgs,bqkgd->bskd", p.astype(dt), do_i,
                               preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqkgd,bskd->bqkgs", do_i, v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_i[..., None])).astype(dt)  # zero where masked, since p is
      dk_j = dk_j + scale * jnp.einsum("bqkgs,bqkgd->bskd", ds, q_i, preferred_element_type=jnp.float32)
      dq_i = scale * jnp.einsum("bqkgs,bskd->bqkgd", ds, k_j, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, sl(dq) + dq_i, i * bq, axis=1)
      return dq, dk_j, dv_j

    zeros_kv = jnp.zeros((B, bk, K, D), jnp.float32)
    dq, dk_j, dv_j = jax.lax.fori_loop(_q_blocks_start(j, q_offset, bq, bk, nq), nq, q_block,
                                       (dq, zeros_kv, zeros_kv))
    dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, j * bk, axis=1)
    dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, j * bk, axis=1)
    return dq, dk, dv

  grads = (jnp.zeros((B, Tp, K, G, D), jnp.float32), jnp.zeros((B, Sp, K, D), jnp.float32),
           jnp.zeros((B, Sp, K, D), jnp.float32))
  dq, dk, dv = jax.lax.fori_loop(0, nk, kv_block, grads)
  # kv_valid and q_offset are integer/bool inputs: no cotangent.
  return dq.astype(dt), dk.astype(k_BxSpxKxD.dtype), dv.astype(v_BxSpxKxD.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, kv_valid_BxS, q_offset=0, *,
                        block_q=512, block_k=512):
  """FlashAttention-2 in pure JAX (see the module docstring); memory O(block_q * block_k)."""
  B, T, H, D = q_BxTxHxD.shape
  S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  dt = q_BxTxHxD.dtype
  bq, bk = min(block_q, T), min(block_k, S)
  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  # Pad and cast outside the custom_vjp: their derivatives (slice, cast) come for free.
  q_BxTpxKxGxD = jnp.pad(q_BxTxHxD.reshape(B, T, K, H // K, D), ((0, 0), (0, Tp - T), (0, 0), (0, 0), (0, 0)))
  pad_kv = ((0, 0), (0, Sp - S), (0, 0), (0, 0))
  k_BxSpxKxD = jnp.pad(k_BxSxKxD.astype(dt), pad_kv)
  v_BxSpxKxD = jnp.pad(v_BxSxKxD.astype(dt), pad_kv)
  kv_valid_BxSp = jnp.pad(kv_valid_BxS.astype(bool), ((0, 0), (0, Sp - S)))
  q_offset = jnp.asarray(q_offset, jnp.int32)
  out = _flash(q_BxTpxKxGxD, k_BxSpxKxD, v_BxSpxKxD, kv_valid_BxSp, q_offset, bq, bk)
  return out[:, :T].reshape(B, T, H, D)
