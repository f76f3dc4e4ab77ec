"""The device programs of the paged engine: prefill into pages, copy pages, and a burst of decode steps.

The pool is {"k", "v"} of [layers, num_pages, page_size, kv_heads, head_dim], donated to every program
that writes it, so it is updated in place. A slot's position j lives at page table[j // page_size],
offset j % page_size. Decode attention gathers each slot's first `max_pages` pages (the burst's
bucket of its longest live row), so a step reads live pages, not the budget: pure JAX, on any platform.

The decode step is the model's own math (transformer.py) over the parameter pytree, with the cache
write and read replaced by the pool's: the same RMSNorm, projections, RoPE, dense attention over the
gathered slots and SwiGLU, so greedy rows equal the static sampler's (tests/test_paged.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cispo_jax.model import ModelConfig, forward, init_cache
from cispo_jax.model.attention import dense_attention
from cispo_jax.model.transformer import _swiglu, _tokens_matmul, apply_rope, lm_logits, rope_inv_freq
from cispo_jax.rollout.filters import choose_tokens
from cispo_jax.sharding.mesh import constrain


def _pool_layout(pool):
  """The pool split by KV heads over `tensor` (as the decode layout splits the heads), whole on every
  device of the batch axes (their slots index any page); a no-op outside a mesh."""
  return {n: constrain(x, "layers", None, None, "kv_heads", None) for n, x in pool.items()}


def _state_layout(state):
  """The slots' state split over the batch axes, like the requests."""
  return {n: constrain(x, "batch", *([None] * (x.ndim - 1))) for n, x in state.items()}


@functools.partial(jax.jit, static_argnames=("cfg", "num_pages", "page_size"))
def init_pool(cfg: ModelConfig, num_pages: int, page_size: int):
  shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
  return _pool_layout({"k": jnp.zeros(shape, cfg.jnp_dtype), "v": jnp.zeros(shape, cfg.jnp_dtype)})


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1,))
def prefill(params, pool, tokens_bxP, lengths_b, page_bxP, offset_bxP, *, cfg: ModelConfig):
  """The prompts' keys and values, all but each prompt's last token (decode step 0 feeds it), into
  their pages. Prompts are right-aligned at position 0 ([tokens][pads]); pads write to page 0."""
  b, P = tokens_bxP.shape
  valid_bxP = jnp.arange(P)[None, :] < (lengths_b - 1)[:, None]
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32)[None], (b, P))
  _, cache = forward(params, cfg, tokens_bxP, positions, valid_bxP, init_cache(cfg, b, P), 0)
  page, off = jnp.where(valid_bxP, page_bxP, 0), jnp.where(valid_bxP, offset_bxP, 0)
  return _pool_layout({n: pool[n].at[:, page, off].set(cache[n].astype(pool[n].dtype)) for n in ("k", "v")})


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_pages(pool, src_n, dst_n):
  """pool pages dst_n := pages src_n (in every layer); pairs (0, 0) are padding."""
  return _pool_layout({n: pool[n].at[:, dst_n].set(pool[n][:, src_n]) for n in ("k", "v")})


def _rms(x, scale, eps, dt):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (scale.astype(jnp.float32) * x32).astype(dt)


def _layer(cfg: ModelConfig, x_Sx1xE, p, layer, pool_k, pool_v, pos_S, page_S, off_S, table_SxM):
  """One decoder layer for one new token per slot; its key and value are written to the pool first."""
  dt, eps, D = cfg.jnp_dtype, cfg.rms_norm_eps, cfg.head_dim
  a = p["attn"]
  h = _rms(x_Sx1xE, p["input_norm"]["scale"], eps, dt)

  def proj(name):
    y = _tokens_matmul("me,enD->mnD", h, a[f"{name}_kernel"], dt)
    return y + a[f"{name}_bias"].astype(dt) if cfg.qkv_bias else y

  q, k, v = proj("q"), proj("k"), proj("v")
  if cfg.qk_norm:
    q, k = _rms(q, a["q_norm"]["scale"], eps, dt), _rms(k, a["k_norm"]["scale"], eps, dt)
  inv_freq = rope_inv_freq(cfg)
  q, k = apply_rope(q, pos_S[:, None], inv_freq), apply_rope(k, pos_S[:, None], inv_freq)
  pool_k = pool_k.at[layer, page_S, off_S].set(k[:, 0].astype(pool_k.dtype))
  pool_v = pool_v.at[layer, page_S, off_S].set(v[:, 0].astype(pool_v.dtype))
  S, M = table_SxM.shape
  ps = pool_k.shape[2]
  keys = pool_k[layer][table_SxM].reshape(S, M * ps, cfg.num_kv_heads, D)
  values = pool_v[layer][table_SxM].reshape(S, M * ps, cfg.num_kv_heads, D)
  valid_SxL = jnp.arange(M * ps)[None, :] <= pos_S[:, None]
  out = dense_attention(q, keys.astype(dt), values.astype(dt), valid_SxL, M * ps).astype(dt)
  y = _tokens_matmul("mhd,hde->me", out, a["o_kernel"], dt)
  if cfg.o_bias:
    y = y + a["o_bias"].astype(dt)
  x = x_Sx1xE + y
  m = p["mlp"]
  x = x + _swiglu(_rms(x, p["post_attn_norm"]["scale"], eps, dt), m["gate_kernel"], m["up_kernel"],
                  m["down_kernel"], dt)
  return x, pool_k, pool_v


def decode_logits(params, cfg: ModelConfig, pool, token_S, pos_S, table_SxM, active_S):
  """Logits [S, V] of the next token of every slot; each slot's key/value written at pos_S."""
  ps = pool["k"].shape[2]
  page_S = jnp.where(active_S, jnp.take_along_axis(table_SxM, (pos_S // ps)[:, None], 1)[:, 0], 0)
  off_S = jnp.where(active_S, pos_S % ps, 0)
  x = jnp.take(params["embed"], token_S, axis=0).astype(cfg.jnp_dtype)[:, None]

  def body(carry, xs):
    x, pk, pv = carry
    p, layer = xs
    x, pk, pv = _layer(cfg, x, p, layer, pk, pv, pos_S, page_S, off_S, table_SxM)
    return (x, pk, pv), None

  (x, pk, pv), _ = jax.lax.scan(body, (x, pool["k"], pool["v"]),
                                (params["layers"], jnp.arange(cfg.num_layers)))
  x = _rms(x, params["final_norm"]["scale"], cfg.rms_norm_eps, cfg.jnp_dtype)
  head = {k: params[k] for k in ("embed", "lm_head") if k in params}
  return lm_logits(head, cfg, x)[:, 0], {"k": pk, "v": pv}


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "steps"), donate_argnums=(1,))
def decode_burst(params, pool, state, *, cfg: ModelConfig, scfg, steps: int):
  """`steps` decode steps of every slot. state: token_S (the token to feed), pos_S (its position), t_S
  (index of the completion token it predicts), active_S, budget_S, key_S (each row's key data),
  table_SxM, recent_SxH (the row's last H completion tokens, for stop sequences). Returns
  (pool, state, tokens [S, steps], logps [S, steps], produced [S, steps], stopped_S)."""
  stop_ids = jnp.asarray(scfg.stop_token_ids or (-1,), jnp.int32)
  pad = jnp.int32(scfg.pad_token_id)

  def step(carry, _):
    pool, st = carry
    logits_SxV, pool = decode_logits(params, cfg, pool, st["token"], st["pos"], st["table"], st["active"])
    keys = jax.vmap(lambda kd, t: jax.random.fold_in(jax.random.wrap_key_data(kd), t))(st["key"], st["t"])
    tok, logp = jax.vmap(lambda l, k: choose_tokens(l[None], k, scfg))(logits_SxV, keys)
    tok, logp, live = tok[:, 0], logp[:, 0], st["active"]
    recent = jnp.concatenate([st["recent"][:, 1:], tok[:, None]], axis=1)
    hit = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    H = recent.shape[1]
    for seq in scfg.stop_sequences:  # the row's last len(seq) tokens are the sequence
      m = len(seq)
      hit |= (st["t"] >= m - 1) & jnp.all(recent[:, H - m:] == jnp.asarray(seq, jnp.int32)[None], axis=1)
    hit &= live
    finished = hit | (st["t"] + 1 >= st["budget"])
    st = dict(st, token=jnp.where(live, tok, st["token"]), pos=st["pos"] + live, t=st["t"] + live,
              active=live & ~finished, recent=jnp.where(live[:, None], recent, st["recent"]),
              stopped=st["stopped"] | hit)
    return (pool, st), (jnp.where(live, tok, pad), jnp.where(live, logp, 0.0), live)

  state = _state_layout(dict(state, stopped=jnp.zeros_like(state["active"])))
  (pool, state), (tok_KxS, logp_KxS, live_KxS) = jax.lax.scan(step, (_pool_layout(pool), state), None, length=steps)
  return _pool_layout(pool), state, tok_KxS.T, logp_KxS.T, live_KxS.T
