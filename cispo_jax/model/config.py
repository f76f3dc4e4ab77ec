"""Model configuration: one frozen dataclass for the Llama / Qwen2 / Qwen3 families."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cispo_jax.model.attention import IMPLS

ROPE_TYPES = ("default", "linear", "llama3")
# What a rematerialised layer keeps for the backward pass (transformer.py maps them to jax policies).
REMAT_POLICIES = ("nothing_saveable", "save_dots", "save_dots_no_batch", "offload_dots")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
AUTO = "auto"


def resolve_dtype(dtype: str, platform: str | None = None) -> str:
  """ModelRunConfig.dtype as run: "auto" is bfloat16 on an accelerator (GPU, TPU: bf16 matmuls at full rate,
  cuDNN / splash attention) and float32 on CPU (XLA:CPU upcasts bf16 dots, so bf16 is slower there and
  only loses precision); any other value is used as given."""
  if dtype != AUTO:
    return dtype
  return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only LM plus how to run it (dtypes, remat).

  `rope_scaling` is stored as a sorted tuple of (key, value) pairs so the config
  stays hashable (it is a static argument of jitted functions).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  o_bias: bool = False  # Llama with attention_bias=True
  qk_norm: bool = False  # Qwen3
  max_position_embeddings: int = 4096
  architecture: str = "Qwen2ForCausalLM"
  # How to run it, not what it is.
  dtype: str = "float32"  # compute dtype of matmuls
  param_dtype: str = "float32"
  lm_head_f32: bool = True  # MiniMax-M1: keep the LM head in float32
  remat: bool = False  # rematerialise each layer in the backward pass (see REMAT_POLICIES)
  remat_policy: str = "nothing_saveable"  # what a rematerialised layer keeps
  # Layers per iteration of the layer scan; num_layers = straight-line code. 0 = auto: unrolled
  # for <= 4 layers without remat (tiny models: XLA fuses across layers, ~25% faster update on
  # CPU), else 1 (compile time flat in depth; on XLA:CPU remat only holds inside a scan).
  scan_unroll: int = 0
  attention_impl: str = "auto"  # cispo_jax.model.attention.IMPLS
  attention_block: int = 512  # query/key block of the blockwise and splash kernels
  logprob_chunk: int = 1024  # completion tokens per LM-head chunk in the trainer's log-probs
  # LoRA's alpha / rank (model/lora.py), applied where the params hold adapters; 0 without LoRA.
  lora_scaling: float = 0.0

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; allowed: {sorted(_DTYPES)}")
    if self.rope_scaling:
      kind = self.rope_scaling_dict.get("rope_type", self.rope_scaling_dict.get("type", "default"))
      if kind not in ROPE_TYPES:
        raise ValueError(f"ModelConfig.rope_scaling type {kind!r} is not supported; "
                         f"allowed: {', '.join(ROPE_TYPES)}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat_policy={self.remat_policy!r}; allowed: {sorted(REMAT_POLICIES)}")
    if self.attention_impl not in IMPLS:
      raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r}; allowed: {list(IMPLS)}")
    if self.scan_unroll < 0:
      raise ValueError(f"ModelConfig.scan_unroll={self.scan_unroll}; must be >= 0 (0 = auto)")
    for name in ("attention_block", "logprob_chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)}; must be >= 1")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even (rotary embeddings)")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

  @property
  def layers_per_scan_step(self) -> int:
    if self.scan_unroll:
      return min(self.scan_unroll, self.num_layers)
    return self.num_layers if (not self.remat and self.num_layers <= 4) else 1

  @property
  def head_weights(self) -> tuple[str, ...]:
    """The top-level weights the LM head reads: the embedding when tied, else lm_head (a frozen or reference
    copy keeps them in param_dtype under lm_head_f32; an untied embedding is only a lookup)."""
    return ("embed",) if self.tie_word_embeddings else ("lm_head",)

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class ModelRunConfig:
  """How to run the model: overrides of the checkpoint's config (exactly hf_io.RUN_OVERRIDES, which ModelConfig
  checks when the model is loaded)."""
  dtype: str = AUTO  # compute dtype; "auto" = bfloat16 on GPU / TPU, float32 on CPU (resolve_dtype)
  param_dtype: str = "float32"  # the master weights (and the optimizer's moments follow them)
  lm_head_f32: bool = True
  remat: bool = False  # rematerialise each layer in the backward pass
  remat_policy: str = "nothing_saveable"  # nothing_saveable | save_dots | save_dots_no_batch | offload_dots
  scan_unroll: int = 0  # layers per iteration of the layer scan; 0 = auto (ModelConfig.scan_unroll)
  attention_impl: str = "auto"  # auto | dense | blockwise | cudnn | splash (model/attention.py)
  attention_block: int = 512
  logprob_chunk: int = 1024  # completion positions per LM-head chunk of the training log-probs

  def __post_init__(self):
    if self.dtype != AUTO and self.dtype not in _DTYPES:
      raise ValueError(f"ModelRunConfig.dtype={self.dtype!r}; allowed: {[AUTO, *sorted(_DTYPES)]}")
    if self.param_dtype not in _DTYPES:
      raise ValueError(f"ModelRunConfig.param_dtype={self.param_dtype!r}; allowed: {sorted(_DTYPES)}")

  def overrides(self, platform: str | None = None) -> dict[str, Any]:
    """The ModelConfig overrides this run uses on `platform` (default: JAX's backend), "auto" resolved."""
    return {**dataclasses.asdict(self), "dtype": resolve_dtype(self.dtype, platform)}
