"""Decoder-only transformer (Llama / Qwen2 / Qwen3) in Flax Linen, with a KV cache.

The training and sampling code never touch the module: they call `forward(params, ...)`,
a pure function of a parameter pytree. Every parameter is created with logical axis
names (`nn.with_logical_partitioning`); `logical_axes(cfg)` returns them as a pytree
of PartitionSpecs so sharding.py can map them to a mesh. Linen rather than NNX because
the rest of the code wants exactly that: a stateless apply over a plain dict pytree
(jit/grad/eval_shape/shardings act on it directly, HF names map 1:1 to its paths).

Parameter layout. The L decoder layers are one `nn.scan` (MaxText's scan_layers): every layer
parameter is stacked on a leading axis of size L with the logical name `layers`, under
`params["layers"]`, e.g. `params["layers"]["attn"]["q_kernel"]` is [L, E, H, D]. hf_io maps
each HF tensor `model.layers.{i}.*` to slice i, one tensor at a time.

Cache layout. A cache is a dict {"k", "v"} of arrays [layers, B, S, kv_heads, head_dim].
Tokens are written at slot indices [cache_index, cache_index + T); the caller keeps a
`kv_valid_BxS` mask of which slots hold real tokens (left padding is invalid), and RoPE
positions come in separately per row, so left-padded rows decode correctly.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cispo_jax.model import lora
from cispo_jax.model.attention import attention
from cispo_jax.model.config import REMAT_POLICIES, ModelConfig
from cispo_jax.sharding.mesh import constrain

Params = Any


def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
  """Inverse frequencies [head_dim/2] with the HF `rope_scaling` types we support."""
  d = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  scaling = cfg.rope_scaling_dict
  if not scaling:
    return inv_freq
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return inv_freq
  if kind == "linear":
    return inv_freq / float(scaling["factor"])
  if kind == "llama3":
    factor = float(scaling["factor"])
    low_ff = float(scaling.get("low_freq_factor", 1.0))
    high_ff = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"rope_scaling type {kind!r} is not supported; allowed: default, linear, llama3")


def apply_rope(x_BxTxNxD, positions_BxT, inv_freq):
  """HF convention: rotate the two halves of the head dimension."""
  angles_BxTxH = positions_BxT[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(angles_BxTxH)[:, :, None, :]
  sin = jnp.sin(angles_BxTxH)[:, :, None, :]
  x = x_BxTxNxD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos2, sin2 = jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos2 + rotated * sin2).astype(x_BxTxNxD.dtype)


def _constrain(x, *logical):
  return constrain(x, *logical)


def _tokens_matmul(spec, x, w, dt):
  """einsum `spec` of activations x [B, T, *in] and a weight, with B and T merged into one dim.

  The weight gradient of x [B, T, E] @ w contracts two dims (B and T); XLA canonicalises such a
  dot by materialising a transposed copy of the cotangent ([F, B*T] for the MLP, fused into the
  SiLU gradient): 19-26% of the update's op time on CPU. With one token dim every weight matmul
  and both of its gradients are plain GEMMs (transposed operands are a flag of the GEMM, not a
  copy). The merges and splits of B with T are bitcasts; `spec` is written with `m` for tokens.
  """
  B, T = x.shape[:2]
  y = jnp.einsum(spec, x.reshape(B * T, *x.shape[2:]).astype(dt), w.astype(dt))
  return y.reshape(B, T, *y.shape[1:])


def _param(module, name, shape, axes, cfg, init=None):
  init = init or nn.initializers.normal(stddev=0.02)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.jnp_param_dtype)


class RMSNorm(nn.Module):
  cfg: ModelConfig
  dim: int
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = _param(self, "scale", (self.dim,), (self.axis_name,), self.cfg, nn.initializers.ones)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
    return (scale.astype(jnp.float32) * x32).astype(self.cfg.jnp_dtype)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE, positions_BxT, kv_valid_BxS, cache_kv, cache_index, layer):
    """`layer`: this layer's index (traced under the layer scan), i.e. its slice of the cache."""
    cfg = self.cfg
    E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = cfg.jnp_dtype

    def proj(name, n, axis, bias):
      w = _param(self, f"{name}_kernel", (E, n, D), ("embed", axis, "head_dim"), cfg)
      y = _tokens_matmul("me,enD->mnD", x_BxTxE, w, dt)
      y = lora.adapted(y, x_BxTxE, lora.module_adapter(self, name), 1, cfg)
      if bias:
        b = _param(self, f"{name}_bias", (n, D), (axis, "head_dim"), cfg, nn.initializers.zeros)
        y = y + b.astype(dt)
      return y

    q_BxTxHxD = proj("q", H, "heads", cfg.qkv_bias)
    k_BxTxKxD = proj("k", K, "kv_heads", cfg.qkv_bias)
    v_BxTxKxD = proj("v", K, "kv_heads", cfg.qkv_bias)
    if cfg.qk_norm:
      q_BxTxHxD = RMSNorm(cfg, D, "head_dim", name="q_norm")(q_BxTxHxD)
      k_BxTxKxD = RMSNorm(cfg, D, "head_dim", name="k_norm")(k_BxTxKxD)
    inv_freq = rope_inv_freq(cfg)
    q_BxTxHxD = _constrain(apply_rope(q_BxTxHxD, positions_BxT, inv_freq), "batch", None, "heads", None)
    k_BxTxKxD = _constrain(apply_rope(k_BxTxKxD, positions_BxT, inv_freq), "batch", None, "kv_heads", None)
    v_BxTxKxD = _constrain(v_BxTxKxD, "batch", None, "kv_heads", None)

    if cache_kv is None:
      keys_BxSxKxD, values_BxSxKxD, new_kv, q_offset = k_BxTxKxD, v_BxTxKxD, None, 0
    else:
      # The whole [L,B,S,K,D] cache is updated in place: slicing out a layer and re-stacking
      # copied the entire cache twice per decode step.
      ck, cv = cache_kv
      at = (layer, 0, cache_index, 0, 0)
      ck = jax.lax.dynamic_update_slice(ck, k_BxTxKxD[None].astype(ck.dtype), at)
      cv = jax.lax.dynamic_update_slice(cv, v_BxTxKxD[None].astype(cv.dtype), at)
      keys_BxSxKxD, values_BxSxKxD, new_kv, q_offset = ck[layer], cv[layer], (ck, cv), cache_index
    out_BxTxHxD = attention(q_BxTxHxD, keys_BxSxKxD.astype(dt), values_BxSxKxD.astype(dt), kv_valid_BxS,
                            q_offset, impl=cfg.attention_impl, block_q=cfg.attention_block,
                            block_k=cfg.attention_block).astype(dt)
    wo = _param(self, "o_kernel", (H, D, E), ("heads", "head_dim", "embed"), cfg)
    y = _tokens_matmul("mhd,hde->me", out_BxTxHxD, wo, dt)
    y = lora.adapted(y, out_BxTxHxD, lora.module_adapter(self, "o"), 2, cfg)
    if cfg.o_bias:
      y = y + _param(self, "o_bias", (E,), ("embed",), cfg, nn.initializers.zeros).astype(dt)
    return y, new_kv


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE):
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    E, F = cfg.hidden_size, cfg.intermediate_size
    gate = _param(self, "gate_kernel", (E, F), ("embed", "mlp"), cfg)
    up = _param(self, "up_kernel", (E, F), ("embed", "mlp"), cfg)
    down = _param(self, "down_kernel", (F, E), ("mlp", "embed"), cfg)
    adapters = {n: lora.module_adapter(self, n) for n in ("gate", "up", "down")}
    return jax.checkpoint(functools.partial(_swiglu, dt=dt, cfg=cfg), policy=_SWIGLU_SAVES, prevent_cse=False)(
        x_BxTxE, gate, up, down, adapters)


# What the SwiGLU keeps for the backward pass: its two [tokens, F] matmul outputs and nothing else.
# Plain autodiff also kept the SiLU's intermediates and the product h: six [tokens, F] arrays a
# layer in the 27M benchmark model's update, which the layer scan stacks into [L, tokens, F]
# buffers (zero-filled, written in the forward, read back in the backward); now two. The backward
# recomputes the rest from g and u in the elementwise fusions it runs anyway; no matmul is
# recomputed. Measured on CPU (benchmarks/bench_update.py): 27M (scanned layers) update 1.07x;
# 3.2M (unrolled layers) unchanged.
_SWIGLU_SAVES = jax.checkpoint_policies.save_only_these_names("mlp_gate", "mlp_up")


def _swiglu(x_BxTxE, gate_ExF, up_ExF, down_FxE, adapters=None, *, dt, cfg=None):
  """adapters: {"gate" | "up" | "down": (A, B) or None} (LoRA), or None."""
  adapters = adapters or {}
  g = lora.adapted(_tokens_matmul("me,ef->mf", x_BxTxE, gate_ExF, dt), x_BxTxE, adapters.get("gate"), 1, cfg)
  u = lora.adapted(_tokens_matmul("me,ef->mf", x_BxTxE, up_ExF, dt), x_BxTxE, adapters.get("up"), 1, cfg)
  g, u = checkpoint_name(g, "mlp_gate"), checkpoint_name(u, "mlp_up")
  h = _constrain(jax.nn.silu(g) * u, "batch", None, "mlp")
  return lora.adapted(_tokens_matmul("mf,fe->me", h, down_FxE, dt), h, adapters.get("down"), 1, cfg)


class Block(nn.Module):
  """One decoder layer as a scan body: carry (x, kv cache or None, layer index) -> (carry, None)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, positions_BxT, kv_valid_BxS, cache_index):
    x, kv, layer = carry
    x = _constrain(x, "batch", None, None)  # activations split by batch, weights gathered (FSDP)
    h, kv = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, self.cfg.hidden_size, name="input_norm")(x),
        positions_BxT, kv_valid_BxS, kv, cache_index, layer)
    x = x + h
    x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, self.cfg.hidden_size, name="post_attn_norm")(x))
    return (_constrain(x, "batch", None, None), kv, layer + 1), None


_REMAT_POLICIES = {
    # Keep only each layer's input; recompute everything else in the backward pass (least memory).
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs, recompute the cheap elementwise work.
    "save_dots": jax.checkpoint_policies.dots_saveable,
    # Keep the weight matmuls' outputs only (not attention's batched q.k / p.v products).
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # As save_dots_no_batch, but parked in host memory (GPU/TPU; XLA:CPU has no pinned host).
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}
assert set(_REMAT_POLICIES) == set(REMAT_POLICIES)


def _layer_stack(cfg: ModelConfig):
  """The decoder layers as one `nn.scan` over parameters stacked on a leading `layers` axis.

  One traced layer instead of L unrolled copies: compile time and program size do not grow
  with depth, and remat applies per scan iteration, so the backward pass holds one layer's
  activations plus the L layer inputs (the scan's residuals) and nothing else.
  """
  block = Block
  if cfg.remat:
    block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                 unroll=cfg.layers_per_scan_step,
                 metadata_params={nn.PARTITION_NAME: "layers"})


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, kv_valid_BxS, cache=None, cache_index=0, last_n=None,
               hidden_only=False):
    cfg = self.cfg
    embed = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
    head_params = {"embed": embed}
    for name in ("embed", "lm_head"):
      adapter = lora.module_adapter(self, name)
      if adapter is not None:
        head_params.update({lora.adapter_key(name, "a"): adapter[0], lora.adapter_key(name, "b"): adapter[1]})
    x = _constrain(embed_tokens(head_params, cfg, tokens_BxT), "batch", None, None)
    kv = None if cache is None else (cache["k"], cache["v"])
    (x, kv, _), _ = _layer_stack(cfg)(cfg, name="layers")(
        (x, kv, jnp.int32(0)), positions_BxT, kv_valid_BxS, cache_index)
    if last_n is not None:  # only these positions need logits: no [B, T, V] for a long prompt
      x = x[:, -last_n:]
    x = RMSNorm(cfg, cfg.hidden_size, name="final_norm")(x)
    if not cfg.tie_word_embeddings:
      head_params["lm_head"] = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)
    new_cache = None if cache is None else {"k": kv[0], "v": kv[1]}
    if hidden_only:
      return x, new_cache
    return lm_logits(head_params, cfg, x), new_cache


def embed_tokens(params: Params, cfg: ModelConfig, tokens_BxT):
  """The token embeddings [B, T, E] in the compute dtype (plus the embedding's LoRA rows, if adapted)."""
  x = jnp.take(params["embed"], tokens_BxT, axis=0).astype(cfg.jnp_dtype)
  if "embed_lora_a" in params:
    x = x + lora.embed_delta(tokens_BxT, params["embed_lora_a"], params["embed_lora_b"], cfg.lora_scaling,
                             cfg.jnp_dtype)
  return x


def lm_head(params: Params, cfg: ModelConfig):
  """The LM head [E, V] (the transposed embedding when tied), in the head's compute dtype; with a LoRA
  adapter on it, merged (W + scaling * A @ B, one [E, V] array per forward, like the head itself)."""
  head_ExV = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
  dt = jnp.float32 if cfg.lm_head_f32 else cfg.jnp_dtype
  if "lm_head_lora_a" in params:
    ab = lora.product(params["lm_head_lora_a"], params["lm_head_lora_b"], 0)
    return (head_ExV.astype(jnp.float32) + cfg.lora_scaling * ab).astype(dt)
  return head_ExV.astype(dt)


def lm_logits(params: Params, cfg: ModelConfig, h_BxTxE):
  """float32 logits [B, T, V] of final-normed hidden states (`params` needs only embed / lm_head)."""
  head_ExV = lm_head(params, cfg)
  return jnp.einsum("bte,ev->btv", h_BxTxE.astype(head_ExV.dtype), head_ExV,
                    preferred_element_type=jnp.float32)


def positions_from_mask(mask_BxT):
  """RoPE positions of a left-padded batch: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def forward(params: Params, cfg: ModelConfig, tokens_BxT, positions_BxT=None, kv_valid_BxS=None,
            cache=None, cache_index=0, last_n: int | None = None):
  """Pure forward: logits [B,T,V] in float32 and the updated cache (None without one).

  Without a cache, `kv_valid_BxS` is the token mask of `tokens_BxT` (S == T) and
  positions default to `positions_from_mask` of it. `last_n`: logits of the last n
  positions only ([B, n, V]); the trainer scores completions with it, so a long prompt
  never costs a prompt-length LM head (the largest activation at a 150k vocabulary).
  """
  if kv_valid_BxS is None:
    if cache is not None:
      raise ValueError("forward with a cache needs kv_valid_BxS (which cache slots hold real tokens)")
    kv_valid_BxS = jnp.ones(tokens_BxT.shape, bool)
  if positions_BxT is None:
    if cache is not None:
      raise ValueError("forward with a cache needs explicit positions_BxT")
    positions_BxT = positions_from_mask(kv_valid_BxS)
  return Transformer(cfg).apply({"params": params}, tokens_BxT, positions_BxT, kv_valid_BxS,
                                cache, cache_index, last_n)


def hidden_states(params: Params, cfg: ModelConfig, tokens_BxT, kv_valid_BxT=None, last_n: int | None = None):
  """The model body without the LM head: final-normed hidden states [B, T or last_n, E].

  The trainer feeds these to the chunked log-prob path (`cispo_jax.model.logprobs`), so no
  [tokens, vocab] array exists for a whole sequence.
  """
  if kv_valid_BxT is None:
    kv_valid_BxT = jnp.ones(tokens_BxT.shape, bool)
  h, _ = Transformer(cfg).apply({"params": params}, tokens_BxT, positions_from_mask(kv_valid_BxT),
                                kv_valid_BxT, None, 0, last_n, True)
  return h


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None):
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.jnp_dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _init_boxed(cfg: ModelConfig, rng):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(rng, tokens, tokens, jnp.ones((1, 1), bool))["params"]


def init_params(cfg: ModelConfig, rng) -> Params:
  """Random parameters (plain arrays): N(0, 0.02) weights, unit norm scales, zero biases."""
  return _init_fn(cfg)(rng)


@functools.lru_cache(maxsize=64)
def _init_fn(cfg: ModelConfig):
  # One normal draw for all weights, sliced per parameter: XLA then compiles one RNG
  # kernel instead of one per parameter (a 2-layer tiny model: ~9 s -> ~1.5 s on CPU).
  flat, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))
  sizes = [math.prod(s.shape) for _, s in flat]

  @jax.jit
  def init(rng):
    z = jax.random.normal(rng, (sum(sizes),), jnp.float32) * 0.02
    out, offset = [], 0
    for (path, s), size in zip(flat, sizes):
      name = path[-1].key
      if name == "scale":
        out.append(jnp.ones(s.shape, s.dtype))
      elif name.endswith("bias"):
        out.append(jnp.zeros(s.shape, s.dtype))
      else:
        out.append(z[offset:offset + size].reshape(s.shape).astype(s.dtype))
      offset += size
    return jax.tree_util.tree_unflatten(treedef, out)

  return init


def logical_axes(cfg: ModelConfig):
  """PartitionSpec of logical axis names for every parameter (same tree as the params)."""
  boxed = jax.eval_shape(lambda: _init_boxed(cfg, jax.random.PRNGKey(0)))
  return nn.get_partition_spec(boxed)


def param_shapes(cfg: ModelConfig):
  """ShapeDtypeStructs of the parameters (no compilation, no memory)."""
  return jax.eval_shape(lambda: nn.unbox(_init_boxed(cfg, jax.random.PRNGKey(0))))
