"""The fused attention paths of attention.py: cuDNN flash attention (NVIDIA GPUs) and TPU Pallas splash
attention, both for self-attention (T == S, q_offset == 0). attention.py's docstring gives their
conventions and how padding is expressed (cudnn: a rotation to per-row lengths; splash: segment ids)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _round_up(a: int, b: int) -> int:
  return _cdiv(a, b) * b


def _static_int(x):
  """x as a Python int if it is known at trace time, else None."""
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer) and x.ndim == 0:
    return int(x)
  return None  # a tracer: its value is only known at run time



# ----------------------------------------------------------------------------------------------
# cudnn (NVIDIA GPU)


def _require_self_attention(name, T, S, q_offset):
  if T != S or _static_int(q_offset) != 0:
    raise ValueError(f"{name} attention needs self-attention: T == S and a static q_offset of 0 "
                     f"(got T={T}, S={S}, q_offset={q_offset}); use blockwise")


def cudnn_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, kv_valid_BxS, q_offset=0, *,
                    implementation="cudnn"):
  """cuDNN flash attention for self-attention (T == S, q_offset == 0); see the module docstring.

  implementation="xla" runs the same rotation + lengths through XLA's reference (tests on CPU).
  """
  B, T, H, D = q_BxTxHxD.shape
  _require_self_attention("cudnn", T, k_BxSxKxD.shape[1], q_offset)
  dt = q_BxTxHxD.dtype
  valid_BxT = kv_valid_BxS.astype(bool)
  # L = left pads (index of the first valid slot; 0 for an all-pad row), n = valid tokens.
  left_B = jnp.argmax(valid_BxT, axis=1).astype(jnp.int32)
  # cuDNN with a zero length may leave its rows undefined; length >= 1 keeps every row non-empty
  # (an all-pad row then attends to a pad token, and its output is zeroed below anyway).
  len_B = jnp.maximum(valid_BxT.sum(axis=1), 1).astype(jnp.int32)
  t_T = jnp.arange(T, dtype=jnp.int32)
  to_rot_BxT = (t_T[None] + left_B[:, None]) % T    # rotated slot t' reads original slot t'+L
  from_rot_BxT = (t_T[None] - left_B[:, None]) % T  # original slot t reads rotated slot t-L
  take = lambda x, idx: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)  # noqa: E731
  out_BxTxHxD = jax.nn.dot_product_attention(
      take(q_BxTxHxD, to_rot_BxT), take(k_BxSxKxD.astype(dt), to_rot_BxT),
      take(v_BxSxKxD.astype(dt), to_rot_BxT), is_causal=True,
      query_seq_lengths=len_B, key_value_seq_lengths=len_B, implementation=implementation)
  out_BxTxHxD = take(out_BxTxHxD, from_rot_BxT)
  # Pad queries (outside the length) are not guaranteed to be written by cuDNN: make them 0.
  return jnp.where(valid_BxT[:, :, None, None], out_BxTxHxD, 0).astype(dt)


# ----------------------------------------------------------------------------------------------
# splash (TPU Pallas)


@functools.lru_cache(maxsize=64)
def _splash_kernel(H: int, Tp: int, bq: int, bk: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  mask = sa.MultiHeadMask([sa.CausalMask((Tp, Tp)) for _ in range(H)])
  sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                        block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  # The kernel holds mask-info arrays; build them as concrete constants even when first called
  # inside a jit trace, so the cached kernel never captures a tracer.
  with jax.ensure_compile_time_eval():
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def splash_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, kv_valid_BxS, q_offset=0, *, block_q=512,
                     block_k=512, interpret=False):
  """TPU splash attention for self-attention (T == S, q_offset == 0); see the module docstring."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  B, T, H, D = q_BxTxHxD.shape
  _require_self_attention("splash", T, k_BxSxKxD.shape[1], q_offset)
  dt = q_BxTxHxD.dtype
  # Kernel blocks must be multiples of 128 (lanes) and divide the padded length.
  bq = min(_round_up(block_q, 128), _round_up(T, 128))
  bk = min(_round_up(block_k, 128), _round_up(T, 128))
  Tp = _round_up(T, math.lcm(bq, bk))
  pad = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
  # The kernel does not scale the logits: fold 1/sqrt(D) into q (in f32, then back to dt).
  q_BxHxTpxD = jnp.pad((q_BxTxHxD.astype(jnp.float32) / math.sqrt(D)).astype(dt).transpose(0, 2, 1, 3), pad)
  k_BxKxTpxD = jnp.pad(k_BxSxKxD.astype(dt).transpose(0, 2, 1, 3), pad)
  v_BxKxTpxD = jnp.pad(v_BxSxKxD.astype(dt).transpose(0, 2, 1, 3), pad)
  # Segment ids: real = 1, pad (including the block padding) = 0. A query sees a key iff causal
  # and same segment: valid queries see exactly the valid causal keys.
  seg_BxTp = jnp.pad(kv_valid_BxS.astype(jnp.int32), ((0, 0), (0, Tp - T)))
  kernel = _splash_kernel(H, Tp, bq, bk, interpret)
  out_BxHxTpxD = jax.vmap(kernel)(q_BxHxTpxD, k_BxKxTpxD, v_BxKxTpxD,
                                  sa.SegmentIds(q=seg_BxTp, kv=seg_BxTp))
  return out_BxHxTpxD[:, :, :T].transpose(0, 2, 1, 3).astype(dt)
