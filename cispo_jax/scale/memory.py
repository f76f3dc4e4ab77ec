"""Per-device memory plan: params, grads, optimizer state, activations, KV cache.

Parameters, gradients and optimizer moments are exact: every array's shard shape
comes from the same `resolve_spec` that places it on a real mesh. Activations
follow a formula measured against XLA's own figures (`compiled.py`; the formula and
where it was fitted are in `plan_memory`). For a new shape, the truth is
`compiled_memory(...)`, which compiles the real program and runs nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import jax
import numpy as np

from cispo_jax.model import ModelConfig, logical_axes, lora, param_shapes
from cispo_jax.model.lora import LoraConfig
from cispo_jax.model.attention import DENSE_MAX_TS
from cispo_jax.sharding.mesh import CACHE_AXES, RULES, axis_sizes, resolve_spec, shard_shape

# Public Qwen2.5 config.json values (base models). Run as: bf16 compute,
# float32 master params, per-block remat.
_QWEN = dict(rope_theta=1e6, qkv_bias=True, dtype="bfloat16", param_dtype="float32", remat=True)
QWEN25 = {
    "0.5B": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                        num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
                        tie_word_embeddings=True, max_position_embeddings=32768, **_QWEN),
    "7B": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                      num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, max_position_embeddings=131072, **_QWEN),
    "32B": ModelConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
                       num_heads=40, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, max_position_embeddings=131072, **_QWEN),
}

# Qwen/Qwen3-1.7B's config.json (the fields hf_io reads), for experiments/recipes/qwen3_1p7b_dapo.gin: its test
# builds a model of this config and benchmarks/bench_recipe.py compiles its programs (hf_io.config_from_hf_dict).
QWEN3_1P7B_CONFIG_JSON = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000, "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": True,
    "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28,
    "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
}

# Optimizer moments per parameter.
OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "lion": 1, "sgd_momentum": 1, "sgd": 0}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device. `peak` assumes the KV cache is freed before the update."""

  param_count: int
  batch_per_device: int
  rollout_batch_per_device: int
  params: int  # full FT: the master weights; LoRA: the frozen base + the adapters
  grads: int
  optimizer: int
  activations: int
  kv_cache: int
  reference: int = 0  # full FT with a KL term (plan_memory reference=True): the reference's copy
  trained_param_count: int = 0  # what the optimizer updates: every parameter, or the adapters

  @property
  def peak(self) -> int:
    return self.params + self.reference + self.optimizer + max(self.grads + self.activations, self.kv_cache)


@functools.lru_cache(maxsize=None)
def _param_layout(cfg: ModelConfig):
  """[(top-level name, shape, logical spec)] of every parameter (abstract: nothing is allocated)."""
  return _layout(param_shapes(cfg), logical_axes(cfg))


@functools.lru_cache(maxsize=None)
def _adapter_layout(cfg: ModelConfig, lcfg: LoraConfig):
  """_param_layout of the adapters of `lcfg` (lora.adapter_shapes, placed by lora.adapter_logical_axes)."""
  return _layout(lora.adapter_shapes(param_shapes(cfg), lcfg), lora.adapter_logical_axes(logical_axes(cfg), lcfg))


def _layout(shapes, logical):
  shapes = jax.tree_util.tree_leaves_with_path(shapes)
  specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return tuple((path[0].key, tuple(s.shape), spec) for (path, s), spec in zip(shapes, specs))


def param_count(cfg: ModelConfig) -> int:
  return sum(math.prod(shape) for _, shape, _ in _param_layout(cfg))


def _local_elems(layout, sizes, rules) -> int:
  return sum(math.prod(shard_shape(shape, resolve_spec(spec, shape, sizes, rules), sizes))
             for _, shape, spec in layout)


def _itemsize(dtype_name: str) -> int:
  return np.dtype(jax.numpy.dtype(dtype_name)).itemsize


def _split(dim: int, name: str, sizes, rules) -> int:
  """How many ways the rules split one dimension of this size on this mesh."""
  return dim // shard_shape((dim,), resolve_spec((name,), (dim,), sizes, rules), sizes)[0]


@dataclasses.dataclass(frozen=True)
class _State:
  params: int
  grads: int
  optimizer: int
  reference: int
  trained: int
  unit: int  # the largest FSDP unit's bytes, gathered over fsdp (0 without fsdp)
  head_grad: bool  # the LM head is trained: its f32 gradient accumulator is part of the activations


def _state_bytes(cfg, sizes, rules, lcfg, reference, param_bytes, grad_bytes, moments_bytes) -> _State:
  """Params, grads, optimizer moments and the reference copy per device; the FSDP unit. The frozen base (LoRA)
  and the reference copy (full FT) are as trainer/parts.reference_params keeps them: the compute dtype, the LM
  head's weights (ModelConfig.head_weights) at param_bytes under lm_head_f32."""
  layout = _param_layout(cfg)
  base_bytes = lambda top: param_bytes if cfg.lm_head_f32 and top in cfg.head_weights else _itemsize(cfg.dtype)  # noqa
  units = {name for name, _, _ in layout}
  per_unit = {u: _local_elems([x for x in layout if x[0] == u], sizes, rules) for u in units}
  # FSDP all-gathers one unit at a time: one layer of the stack, the embedding or the LM head, full over fsdp and
  # still split over tensor.
  tensor_only = dict(sizes, data=1, fsdp=1)
  gathered = {u: _local_elems([x for x in layout if x[0] == u], tensor_only, rules)
              // (cfg.num_layers if u == "layers" else 1) for u in units}
  frozen = sum(n * base_bytes(u) for u, n in per_unit.items())
  if lcfg is None:
    elems = sum(per_unit.values())
    unit = max(gathered.values()) * param_bytes
    return _State(params=elems * param_bytes, grads=elems * grad_bytes, optimizer=elems * moments_bytes,
                  reference=frozen if reference else 0, trained=param_count(cfg),
                  unit=unit if sizes["fsdp"] > 1 else 0, head_grad=True)
  adapters = _local_elems(_adapter_layout(cfg, lcfg), sizes, rules)
  unit = max(n * base_bytes(u) for u, n in gathered.items())
  return _State(params=frozen + adapters * param_bytes, grads=adapters * grad_bytes,
                optimizer=adapters * moments_bytes, reference=0,
                trained=sum(math.prod(shape) for _, shape, _ in _adapter_layout(cfg, lcfg)),
                unit=unit if sizes["fsdp"] > 1 else 0, head_grad=False)


def plan_memory(model_cfg: ModelConfig, mesh_shape: Mapping[str, int], batch_size: int, seq_len: int, *,
                completion_len: int | None = None, param_bytes: int | None = None,
                grad_bytes: int | None = None, optimizer: str = "adamw", opt_state_bytes: int = 4,
                act_bytes: int | None = None, remat: bool | None = None,
                rollout_batch: int | None = None, rollout_len: int | None = None,
                kv_bytes: int | None = None, rules=RULES, lora: LoraConfig | None = None,
                reference: bool = False) -> MemoryPlan:
  """Per-device bytes of one training micro-batch and one rollout batch.

  `batch_size` / `rollout_batch` are global sequence counts; `seq_len` is prompt + completion,
  `completion_len` the tokens that get log-probs (default seq_len); `mesh_shape` is a dict
  like {"fsdp": 4, "tensor": 2} (missing axes = 1). Byte sizes default to the config's dtypes
  (params and grads: param_dtype; activations and KV cache: dtype); optimizer moments float32.

  params, grads, optimizer: exact. The sum over parameters of the per-device shard size
  (rules + divisibility fallback, as placed by `param_shardings`) x bytes, x moments for
  the optimizer (adamw: 2).

  reference (full fine-tuning with a KL term: the trainer's reference copy, parts.reference_params): the
  parameters again in the compute dtype (dtype), the LM head's weights (ModelConfig.head_weights)
  at param_bytes under lm_head_f32. Counted in `peak` (it lives through the update and the rollout).

  lora (a LoraConfig of rank > 0: parts.build_state's LoRA layout): params = the frozen base, stored like the
  reference copy above (it is the reference: no copy), + the adapters at param_bytes; grads and optimizer
  moments of the adapters alone (placed by lora.adapter_logical_axes); the activations below without the LM
  head's gradient accumulator (the head is frozen), the FSDP unit gathered at the base's bytes. Against XLA's temp
  less its f32 copy of the bf16 base (compiled.cpu_upcast_bytes, an XLA:CPU artefact) on one device: +5% at
  Qwen2.5-0.5B, 2 layers, 4k tokens (tests/test_lora_memory.py); -34% at Qwen2.5-7B, 28 layers, 512 + 8192
  tokens (benchmarks/bench_lora.py), where full FT's estimate is -10%: the layer term, fitted at 0.5B shapes,
  undercounts XLA:CPU's f32 MLP temporaries there, and LoRA's temp came out as large as full FT's.

  activations: the temporaries of the update's gradient, a formula whose coefficients were
  measured against `compiled.memory_analysis()` of `jax.value_and_grad(train_step._loss_fn)`
  (XLA:CPU, Qwen2.5-0.5B shapes, bf16 compute, 1k-16k tokens, 2-24 layers; re-checked by
  tests/test_scale.py at several (layers, tokens, mesh) points, within 30%). With b rows per
  device (batch over data x fsdp), T = seq_len, N = completion_len, a = act_bytes, E, F, H,
  K, D, V, L from the config and h, k, f, v the per-device heads, kv heads, MLP width, vocab:
      layer(T)  = a*(4E + 3h*D + 3k*D + 4f)        one layer's activations per token
      remat:      2*L*b*T*E*a                       each layer's saved input (XLA keeps two
                                                    copies of the scan's carry per layer)
                + 0.25*b*T*layer(T)                 one layer recomputed at a time
      no remat:   3.2*L*b*T*layer(T)                every layer's residuals (XLA:CPU keeps f32
                                                    copies next to the bf16 ones)
      attention = b*h*T*T*(4 + a) per live layer    only when the dense path runs (T*T <=
                                                    attention.DENSE_MAX_TS on CPU, or
                                                    attention_impl="dense"); the blockwise and
                                                    fused kernels hold O(T) per layer
      head      = c*b*n*v*4 + E*v*4                 n = min(N, logprob_chunk) positions of f32
                                                    logits at a time (c = 3 buffers when chunked,
                                                    1.1 on the single-chunk path) + the LM head's
                                                    f32 gradient accumulator (not under LoRA)
      unit      = U * param_bytes                   FSDP: the largest unit (one layer of the
                                                    stack, the embedding or the LM head) gathered
                                                    over fsdp, still split over tensor (XLA
                                                    reduce-scatters its gradient without a second
                                                    full copy: measured); 0 without fsdp
  kv_cache = 2 (k, v) * L * b_r * S * k * D * kv_bytes, with b_r rollout rows per device and
  S = rollout_len cache slots.
  """
  if optimizer not in OPTIMIZER_MOMENTS:
    raise ValueError(f"plan_memory optimizer={optimizer!r}; allowed: {sorted(OPTIMIZER_MOMENTS)}")
  for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
    if v < 1:
      raise ValueError(f"plan_memory {name}={v}; must be >= 1")
  cfg = model_cfg
  sizes = axis_sizes(mesh_shape)
  param_bytes = param_bytes or _itemsize(cfg.param_dtype)
  act_bytes = act_bytes or _itemsize(cfg.dtype)
  remat = cfg.remat if remat is None else remat
  rollout_batch = rollout_batch or batch_size
  rollout_len = rollout_len or seq_len
  lcfg = lora if lora is not None and lora.enabled else None
  state = _state_bytes(cfg, sizes, rules, lcfg, reference, param_bytes, grad_bytes or param_bytes,
                       opt_state_bytes * OPTIMIZER_MOMENTS[optimizer])

  E, F, H, K, D, V, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                         cfg.head_dim, cfg.vocab_size, cfg.num_layers)
  b = batch_size // _split(batch_size, "batch", sizes, rules)
  h, k = H // _split(H, "heads", sizes, rules), K // _split(K, "kv_heads", sizes, rules)
  f, v = F // _split(F, "mlp", sizes, rules), V // _split(V, "vocab", sizes, rules)
  T, N, a = seq_len, completion_len or seq_len, act_bytes
  layer = a * (4 * E + 3 * h * D + 3 * k * D + 4 * f)
  dense = cfg.attention_impl == "dense" or (cfg.attention_impl == "auto" and T * T <= DENSE_MAX_TS)
  attention = b * h * T * T * (4 + a) if dense else 0
  n = min(N, cfg.logprob_chunk)
  head = int((3 if N > cfg.logprob_chunk else 1.1) * b * n * v * 4) + (E * v * 4 if state.head_grad else 0)
  if remat:
    activations = 2 * L * b * T * E * a + int(0.25 * b * T * layer) + attention + head + state.unit
  else:
    activations = int(3.2 * L * b * T * layer) + L * attention + head + state.unit

  cache_shape = (L, rollout_batch, rollout_len, K, D)
  cache_block = shard_shape(cache_shape, resolve_spec(CACHE_AXES, cache_shape, sizes, rules), sizes)
  kv_cache = 2 * math.prod(cache_block) * (kv_bytes or act_bytes)
  return MemoryPlan(param_count=param_count(cfg), batch_per_device=b, rollout_batch_per_device=cache_block[1],
                    params=state.params, grads=state.grads, optimizer=state.optimizer, activations=activations,
                    kv_cache=kv_cache, reference=state.reference, trained_param_count=state.trained)
