"""Memory-efficient attention paths against the dense reference (values and dq/dk/dv).

Shapes are tiny and block sizes small (8/16) so several q and kv blocks, ragged last blocks,
GQA (H=4, K=2), left + right padding and all-pad rows are all exercised on CPU. Outputs are
compared only on query rows that see at least one valid key (pad-only rows are unspecified,
but must be finite with finite gradients).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cispo_jax.model import attention as A

B, H, K, D = 3, 4, 2, 8


def _qkv(T, S, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)  # numpy, not jax.random: no compile per shape
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
               for shape in ((B, T, H, D), (B, S, K, D), (B, S, K, D)))


def _self_attn_valid(T):
  """Row 0: left + right pads; row 1: left pads only; row 2: all pads."""
  valid = np.ones((B, T), bool)
  valid[0, :5], valid[0, -4:] = False, False
  valid[1, :11] = False
  valid[2, :] = False
  return jnp.asarray(valid)


def _comparable_BxT(kv_valid_BxS, T, q_offset, rows):
  """Query rows where a path must agree with dense.

  "visible": rows that see at least one valid key (blockwise matches dense on all of them).
  "valid": rows whose own slot is valid, the rows the model uses (cudnn and splash give a
  right-pad query 0 / attention over pads, not dense's value)."""
  S = kv_valid_BxS.shape[1]
  q_slot_T = q_offset + jnp.arange(T)
  if rows == "valid":
    return kv_valid_BxS[:, q_slot_T]
  causal_TxS = jnp.arange(S)[None, :] <= q_slot_T[:, None]
  return (causal_TxS[None] & kv_valid_BxS[:, None, :]).any(-1)


@functools.lru_cache(maxsize=None)
def _value_and_grads_fn(fn):
  """jit(out, d(sum(out * weight))/d(q, k, v)); q_offset is a traced argument. Cached per fn so
  repeated checks at one shape compile once."""
  def loss(q, k, v, kv_valid, q_offset, weight_BxTxHxD):
    out = fn(q, k, v, kv_valid, q_offset)
    return jnp.sum(out.astype(jnp.float32) * weight_BxTxHxD), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _value_and_grads(fn, q, k, v, kv_valid, q_offset, weight_BxTxHxD):
  return _value_and_grads_fn(fn)(q, k, v, kv_valid, jnp.int32(q_offset), weight_BxTxHxD)


def _assert_close(a, b, tol, what):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
  assert err <= tol, f"{what}: max relative error {err:.2e} > {tol:.0e}"


def _check_against_dense(fn, T, S, kv_valid, q_offset=0, dtype=jnp.float32, tol=1e-5,
                         rows="visible"):
  q, k, v = _qkv(T, S, dtype)
  keep_BxTx1x1 = _comparable_BxT(kv_valid, T, q_offset, rows)[:, :, None, None]
  w = jnp.asarray(np.random.default_rng(7).standard_normal((B, T, H, D), np.float32)) * keep_BxTx1x1
  (_, out), grads = _value_and_grads(fn, q, k, v, kv_valid, q_offset, w)
  (_, out_d), grads_d = _value_and_grads(A.dense_attention, q, k, v, kv_valid, q_offset, w)
  _assert_close(out * keep_BxTx1x1, out_d * keep_BxTx1x1, tol, "out")
  for name, g, gd in zip(("dq", "dk", "dv"), grads, grads_d):
    _assert_close(g, gd, tol, name)
  # Pad-only rows: any value, but finite, and finite gradients even when the loss touches them.
  (_, out), grads = _value_and_grads(fn, q, k, v, kv_valid, q_offset, jnp.ones((B, T, H, D)))
  assert all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in (out, *grads))


def _blockwise(q, k, v, kv_valid, q_offset):
  return A.blockwise_attention(q, k, v, kv_valid, q_offset, block_q=8, block_k=16)


def _cudnn_via_xla(q, k, v, kv_valid, q_offset):
  del q_offset  # traced by the test harness; self-attention has offset 0
  return A.cudnn_attention(q, k, v, kv_valid, 0, implementation="xla")


def _cudnn(q, k, v, kv_valid, q_offset):
  del q_offset
  return A.cudnn_attention(q, k, v, kv_valid, 0)


def _splash(q, k, v, kv_valid, q_offset):
  del q_offset
  return A.splash_attention(q, k, v, kv_valid, block_q=128, block_k=128,
                            interpret=jax.default_backend() != "tpu")


# ---------------------------------------------------------------------------------------------
# blockwise


def test_blockwise_self_attention_matches_dense():
  T = 37  # not a multiple of either block: ragged last q and kv blocks
  _check_against_dense(_blockwise, T, T, _self_attn_valid(T))


def test_blockwise_kv_cache_traced_offset_matches_dense():
  # A cache of S slots; queries at slots q_offset..q_offset+T-1 (prefill chunk / decode), the
  # offset traced under jit. Left pads are invalid; slots after the queries are "valid" as in
  # sampling.py (the causal mask hides them); row 2 has invalid slots after its prompt too.
  S, T = 45, 7
  valid = np.ones((B, S), bool)
  valid[0, :6] = False
  valid[1, :19] = False
  valid[2, :3], valid[2, 30:] = False, False
  valid = jnp.asarray(valid)
  for q_offset in (20, 33, 0):  # same shapes: one compile, different dynamic loop bounds
    _check_against_dense(_blockwise, T, S, valid, q_offset=q_offset)
  # Decode: one query.
  _check_against_dense(_blockwise, 1, S, valid, q_offset=40)


def test_blockwise_bf16_matches_dense():
  T = 37
  _check_against_dense(_blockwise, T, T, _self_attn_valid(T), dtype=jnp.bfloat16, tol=3e-2)


def test_blockwise_grad_memory_far_below_dense():
  T = 2048
  q = jax.ShapeDtypeStruct((1, T, H, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, T, K, 16), jnp.float32)
  valid = jax.ShapeDtypeStruct((1, T), jnp.bool_)

  def temp_bytes(fn):
    loss = lambda q, k, v, valid: jnp.sum(fn(q, k, v, valid) ** 2)  # noqa: E731
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, valid).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  dense = temp_bytes(A.dense_attention)
  blockwise = temp_bytes(lambda *a: A.blockwise_attention(*a, block_q=512, block_k=512))
  one_score_matrix = 1 * H * T * T * 4  # one f32 [B, H, T, S]
  print(f"temp bytes at T=S={T}: dense {dense / 2**20:.1f} MiB, blockwise {blockwise / 2**20:.1f} MiB,"
        f" one f32 [B,H,T,S] {one_score_matrix / 2**20:.0f} MiB")
  assert blockwise < dense / 4
  assert blockwise < one_score_matrix


# ---------------------------------------------------------------------------------------------
# cudnn: the rotation + lengths logic, run through XLA's reference on CPU


def test_cudnn_rotation_logic_matches_dense_via_xla():
  T = 37
  _check_against_dense(_cudnn_via_xla, T, T, _self_attn_valid(T), rows="valid")


def test_cudnn_rejects_cache_attention():
  q, k, v = _qkv(4, 9)
  with pytest.raises(ValueError, match="T == S"):
    A.cudnn_attention(q, k, v, jnp.ones((B, 9), bool), 0, implementation="xla")


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN flash attention needs an NVIDIA GPU; the same rotation logic is "
                           "tested above with implementation='xla'")
def test_cudnn_on_gpu_matches_dense():
  T = 64  # head_dim 8 is a multiple of 8, as cuDNN requires
  _check_against_dense(_cudnn, T, T, _self_attn_valid(T), dtype=jnp.bfloat16, tol=3e-2,
                       rows="valid")


# ---------------------------------------------------------------------------------------------
# splash: Pallas interpret mode on CPU (compiled kernel only on TPU)


def test_splash_interpret_matches_dense():
  T = 200  # padded to 256 = two 128-blocks (splash blocks must be multiples of 128)
  _check_against_dense(_splash, T, T, _self_attn_valid(T), rows="valid")


# ---------------------------------------------------------------------------------------------
# dispatch


def test_choose_impl_rules():
  bf16, f32 = jnp.bfloat16, jnp.float32
  # Decode / few queries: dense everywhere.
  for platform in ("cpu", "gpu", "tpu"):
    assert A.choose_impl("auto", 1, 100_000, platform) == "dense"
  # CPU: dense while T*S is small, blockwise beyond.
  assert A.choose_impl("auto", 1024, 1024, "cpu") == "dense"
  assert A.choose_impl("auto", 2048, 2048, "cpu") == "blockwise"
  # GPU: cudnn for bf16 self-attention with a good head dim, else the CPU rule.
  assert A.choose_impl("auto", 4096, 4096, "gpu", dtype=bf16, head_dim=128) == "cudnn"
  assert A.choose_impl("auto", 4096, 4096, "gpu", dtype=f32, head_dim=128) == "blockwise"
  assert A.choose_impl("auto", 4096, 4096, "gpu", dtype=bf16, head_dim=12) == "blockwise"
  assert A.choose_impl("auto", 4096, 4096, "gpu", dtype=bf16, head_dim=128,
                       q_offset_is_zero=False) == "blockwise"
  assert A.choose_impl("auto", 512, 8192, "gpu", dtype=bf16, head_dim=128) == "blockwise"
  assert A.choose_impl("auto", 256, 256, "gpu", dtype=f32, head_dim=128) == "dense"
  # TPU: splash for self-attention, else the CPU rule.
  assert A.choose_impl("auto", 4096, 4096, "tpu") == "splash"
  assert A.choose_impl("auto", 512, 8192, "tpu") == "blockwise"
  # Explicit choices pass through; unknown ones fail.
  for impl in A.IMPLS[1:]:
    assert A.choose_impl(impl, 1, 1, "cpu") == impl
  with pytest.raises(ValueError):
    A.choose_impl("flash", 8, 8)


def test_attention_dispatch_on_cpu():
  T = 37
  q, k, v = _qkv(T, T)
  valid = _self_attn_valid(T)
  dense = A.dense_attention(q, k, v, valid)
  np.testing.assert_array_equal(A.attention(q, k, v, valid), dense)  # auto -> dense here
  visible = _comparable_BxT(valid, T, 0, "visible")[:, :, None, None]
  out = A.attention(q, k, v, valid, impl="blockwise", block_q=16, block_k=8)
  _assert_close(out * visible, dense * visible, 1e-5, "blockwise via attention()")
