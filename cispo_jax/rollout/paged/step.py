"""The device programs of the paged engine: prefill into pages (whole, or a chunk at a time), copy pages,
and a burst of decode steps.

The pool is {"k", "v"} of [layers, num_pages, page_size, kv_heads, head_dim], donated to every program
that writes it, so it is updated in place; on a mesh it is split by KV heads over `tensor`, like the
decode layout's weights (sharding.DECODE_RULES), and the slots by the batch axes. A slot's position j
lives at page table[j // page_size], offset j % page_size. Attention gathers each slot's first
`max_pages` pages (the burst's bucket of its longest live row), so a step reads live pages, not the
budget: pure JAX, on any platform.

The decode step and a prefill chunk are the model's own math (transformer.py) over the parameter
pytree, with the cache write and read replaced by the pool's: the same RMSNorm, projections, RoPE,
dense attention (attention.py's, over the gathered pages) and SwiGLU, so greedy rows equal the static
sampler's (tests/test_paged.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from cispo_jax.model import ModelConfig, forward, init_cache
from cispo_jax.model.attention import _MASK_VALUE
from cispo_jax.model.lora import adapted
from cispo_jax.model.transformer import _swiglu, _tokens_matmul, apply_rope, embed_tokens, lm_logits, rope_inv_freq
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


def _paged_attention(q_SxTxHxD, keys_SxLxKxD, values_SxLxKxD, pos_SxT):
  """dense_attention's math (attention.py) over a slot's gathered pages: query at position p sees keys 0..p."""
  S, T, H, D = q_SxTxHxD.shape
  L, K = keys_SxLxKxD.shape[1], keys_SxLxKxD.shape[2]
  dt = q_SxTxHxD.dtype
  mask_SxTxL = jnp.arange(L)[None, None, :] <= pos_SxT[:, :, None]
  q = q_SxTxHxD.reshape(S, T, K, H // K, D)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, keys_SxLxKxD.astype(dt), preferred_element_type=jnp.float32) / math.sqrt(D)
  scores = jnp.where(mask_SxTxL[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  return jnp.einsum("bkgts,bskd->btkgd", probs, values_SxLxKxD.astype(dt)).reshape(S, T, H, D)


def _attend(q_SxTxHxD, pool_k, pool_v, table_SxM, pos_SxT, block: int):
  """Each query's attention over its slot's pages (one layer's pool [num_pages, page_size, K, D]). Up to
  `block` positions: the pages gathered at once (dense_attention's math, exactly). Longer: `block`
  positions at a time with an online softmax (flash-decoding), so the gathered keys and values, the
  program's temp memory, stay one block per slot whatever the longest live row."""
  S, M = table_SxM.shape
  ps, K, D = pool_k.shape[1:]
  if M * ps <= block:
    gather = lambda pool: pool[table_SxM].reshape(S, M * ps, K, D)  # noqa: E731
    return _paged_attention(q_SxTxHxD, gather(pool_k), gather(pool_v), pos_SxT)
  bp = max(1, block // ps)  # pages a block
  nb = -(-M // bp)
  table = jnp.pad(table_SxM, ((0, 0), (0, nb * bp - M)))  # page 0 past the end: masked by position
  _, T, H, _ = q_SxTxHxD.shape
  dt = q_SxTxHxD.dtype
  q = q_SxTxHxD.reshape(S, T, K, H // K, D)

  def step(carry, j):
    m, l, acc = carry
    pages = jax.lax.dynamic_slice_in_dim(table, j * bp, bp, axis=1)
    keys, values = (pool[pages].reshape(S, bp * ps, K, D).astype(dt) for pool in (pool_k, pool_v))
    mask = (j * bp * ps + jnp.arange(bp * ps))[None, None, :] <= pos_SxT[:, :, None]
    s = jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=jnp.float32) / math.sqrt(D)
    s = jnp.where(mask[:, None, None], s, _MASK_VALUE)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(dt), values, preferred_element_type=jnp.float32)
    return (m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv), None

  init = (jnp.full((S, K, H // K, T), _MASK_VALUE, jnp.float32), jnp.zeros((S, K, H // K, T), jnp.float32),
          jnp.zeros((S, K, H // K, T, D), jnp.float32))
  (_, l, acc), _ = jax.lax.scan(step, init, jnp.arange(nb))
  out = (acc / l[..., None]).astype(dt)  # [S, K, G, T, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(S, T, H, D)


def _layer(cfg: ModelConfig, x_SxTxE, p, layer, pool_k, pool_v, pos_SxT, page_SxT, off_SxT, table_SxM, block):
  """One decoder layer for T new tokens per slot (decode: T = 1; a prefill chunk: T = its length); their
  keys and values are written to the pool first, then each query attends to its slot's pages."""
  dt, eps = cfg.jnp_dtype, cfg.rms_norm_eps
  a = p["attn"]
  h = _rms(x_SxTxE, p["input_norm"]["scale"], eps, dt)

  def proj(name):
    y = adapted(_tokens_matmul("me,enD->mnD", h, a[f"{name}_kernel"], dt), h, _adapter(a, name), 1, cfg)
    return y + a[f"{name}_bias"].astype(dt) if cfg.qkv_bias else y

  q, k, v = proj("q"), proj("k"), proj("v")
  if cfg.qk_norm:
    q, k = _rms(q, a["q_norm"]["scale"], eps, dt), _rms(k, a["k_norm"]["scale"], eps, dt)
  inv_freq = rope_inv_freq(cfg)
  q, k = apply_rope(q, pos_SxT, inv_freq), apply_rope(k, pos_SxT, inv_freq)
  pool_k = pool_k.at[layer, page_SxT, off_SxT].set(k.astype(pool_k.dtype))
  pool_v = pool_v.at[layer, page_SxT, off_SxT].set(v.astype(pool_v.dtype))
  out = _attend(q, pool_k[layer], pool_v[layer], table_SxM, pos_SxT, block).astype(dt)
  y = adapted(_tokens_matmul("mhd,hde->me", out, a["o_kernel"], dt), out, _adapter(a, "o"), 2, cfg)
  if cfg.o_bias:
    y = y + a["o_bias"].astype(dt)
  x = x_SxTxE + y
  m = p["mlp"]
  x = x + _swiglu(_rms(x, p["post_attn_norm"]["scale"], eps, dt), m["gate_kernel"], m["up_kernel"],
                  m["down_kernel"], {n: _adapter(m, n) for n in ("gate", "up", "down")}, dt=dt, cfg=cfg)
  return x, pool_k, pool_v


def _adapter(p, name):
  """(A, B) of weight `name`'s LoRA adapter in this layer's params (model/lora.py), or None."""
  a = p.get(f"{name}_lora_a")
  return None if a is None else (a, p[f"{name}_lora_b"])


def _layers(params, cfg: ModelConfig, pool, x, pos_SxT, page_SxT, off_SxT, table_SxM, block):
  def body(carry, xs):
    x, pk, pv = carry
    p, layer = xs
    x, pk, pv = _layer(cfg, x, p, layer, pk, pv, pos_SxT, page_SxT, off_SxT, table_SxM, block)
    return (x, pk, pv), None

  (x, pk, pv), _ = jax.lax.scan(body, (x, pool["k"], pool["v"]), (params["layers"], jnp.arange(cfg.num_layers)))
  return x, {"k": pk, "v": pv}


@functools.partial(jax.jit, static_argnames=("cfg", "block"), donate_argnums=(1,))
def prefill_chunk(params, pool, tokens_bxC, pos_bxC, valid_bxC, table_bxM, *, cfg: ModelConfig, block: int = 2048):
  """One chunk of C prompt positions of each of b prompts into their pages (table_bxM): a chunk's queries
  attend to the pages the prompt's earlier chunks wrote, so a long prompt is prefilled a chunk between two
  decode bursts. Invalid positions (past the prompt) write to page 0."""
  ps = pool["k"].shape[2]
  page = jnp.where(valid_bxC, jnp.take_along_axis(table_bxM, pos_bxC // ps, 1), 0)
  off = jnp.where(valid_bxC, pos_bxC % ps, 0)
  x = embed_tokens(params, cfg, tokens_bxC)
  _, pool = _layers(params, cfg, _pool_layout(pool), x, pos_bxC, page, off, table_bxM, block)
  return _pool_layout(pool)


def decode_logits(params, cfg: ModelConfig, pool, token_S, pos_S, table_SxM, active_S, block: int = 2048):
  """Logits [S, V] of the next token of every slot; each slot's key/value written at pos_S."""
  ps = pool["k"].shape[2]
  page_S = jnp.where(active_S, jnp.take_along_axis(table_SxM, (pos_S // ps)[:, None], 1)[:, 0], 0)
  off_S = jnp.where(active_S, pos_S % ps, 0)
  x = embed_tokens(params, cfg, token_S[:, None])
  x, pool = _layers(params, cfg, pool, x, pos_S[:, None], page_S[:, None], off_S[:, None], table_SxM, block)
  x = _rms(x, params["final_norm"]["scale"], cfg.rms_norm_eps, cfg.jnp_dtype)
  head = {k: params[k] for k in ("embed", "lm_head", "lm_head_lora_a", "lm_head_lora_b") if k in params}
  return lm_logits(head, cfg, x)[:, 0], pool


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "steps", "block"), donate_argnums=(1,))
def decode_burst(params, pool, state, *, cfg: ModelConfig, scfg, steps: int, block: int = 2048):
  """`steps` decode steps of every slot. state: token_S (the token to feed), pos_S (its position), t_S
  (index of the completion token it predicts), active_S, budget_S, key_S (each row's key data),
  table_SxM, recent_SxH (the row's last H completion tokens, for stop sequences). Returns
  (pool, state, tokens [S, steps], logps [S, steps], produced [S, steps], stopped_S)."""
  stop_ids = jnp.asarray(scfg.stop_token_ids or (-1,), jnp.int32)
  pad = jnp.int32(scfg.pad_token_id)

  def ends_with(recent, t, seq):  # the row's last len(seq) tokens are seq
    m, H = len(seq), recent.shape[1]
    return (t >= m - 1) & jnp.all(recent[:, H - m:] == jnp.asarray(seq, jnp.int32)[None], axis=1)

  def step(carry, _):
    pool, st = carry
    logits_SxV, pool = decode_logits(params, cfg, pool, st["token"], st["pos"], st["table"], st["active"], block)
    keys = jax.vmap(lambda kd, t: jax.random.fold_in(jax.random.wrap_key_data(kd), t))(st["key"], st["t"])
    tok, logp = jax.vmap(lambda l, k: choose_tokens(l[None], k, scfg))(logits_SxV, keys)
    tok, logp, live = tok[:, 0], logp[:, 0], st["active"]
    tok, logp, forcing, st = _force(scfg, logits_SxV, tok, logp, st)
    recent = jnp.concatenate([st["recent"][:, 1:], tok[:, None]], axis=1)
    hit = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    for seq in scfg.stop_sequences:
      hit |= ends_with(recent, st["t"], seq)
    hit &= live & ~forcing
    if scfg.think_budget:
      st = dict(st, closed=st["closed"] | (live & ends_with(recent, st["t"], scfg.think_end_tokens)))
    finished = hit | (st["t"] + 1 >= st["budget"])
    st = dict(st, token=jnp.where(live, tok, st["token"]), pos=st["pos"] + live, t=st["t"] + live,
              active=live & ~finished, recent=jnp.where(live[:, None], recent, st["recent"]),
              stopped=st["stopped"] | hit)
    return (pool, st), (jnp.where(live, tok, pad), jnp.where(live, logp, 0.0), live, live & forcing)

  state = _state_layout(dict(state, stopped=jnp.zeros_like(state["active"])))
  (pool, state), outs = jax.lax.scan(step, (_pool_layout(pool), state), None, length=steps)
  return (_pool_layout(pool), state) + tuple(x.T for x in outs)


def _force(scfg, logits_SxV, tok, logp, st):
  """ScaleRL's forced interruption: a row at completion index think_budget that has not closed its thinking
  takes the interrupt tokens, one a step, in place of its draws (their log-probs under the same convention).
  State: fpos_S (-1 = not interrupted, i = the next interrupt token, F = done), closed_S. Returns
  (tok, logp, forcing_S, state)."""
  F = len(scfg.interrupt_tokens)
  if not scfg.think_budget:
    return tok, logp, jnp.zeros_like(st["active"]), st
  fpos = jnp.where((st["t"] == scfg.think_budget) & ~st["closed"] & (st["fpos"] < 0), 0, st["fpos"])
  forcing = (fpos >= 0) & (fpos < F)
  forced_tok = jnp.asarray(scfg.interrupt_tokens, jnp.int32)[jnp.clip(fpos, 0, F - 1)]
  scaled = logits_SxV.astype(jnp.float32) / (1.0 if scfg.greedy else scfg.temperature)
  forced_logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, -1), forced_tok[:, None], -1)[:, 0]
  st = dict(st, fpos=jnp.where(forcing & st["active"], fpos + 1, st["fpos"]))
  return jnp.where(forcing, forced_tok, tok), jnp.where(forcing, forced_logp, logp), forcing, st
