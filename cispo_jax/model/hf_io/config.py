"""config.json <-> ModelConfig: the architectures we read, their rope scaling, and the fields a
checkpoint must not set (sliding windows); the run-time fields (RUN_OVERRIDES) config.json does not hold."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from cispo_jax.model.config import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
# A config.json without `architectures` is read by its model_type, as transformers' Auto classes do.
MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}
# How to run a checkpoint (ModelConfig fields that config.json does not hold; model.config.ModelRunConfig sets them).
RUN_OVERRIDES = ("dtype", "param_dtype", "lm_head_f32", "remat", "remat_policy", "scan_unroll",
                 "attention_impl", "attention_block", "logprob_chunk")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found (a Hugging Face model directory needs config.json)")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text (byte offset {e.start}: {e.reason})") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
  return raw


def _rope_from_hf(raw: dict[str, Any], path: str) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling pairs) from either transformers 4 (rope_theta + rope_scaling)
  or transformers 5 (rope_parameters) config.json layouts."""
  params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))) != 1.0:
    raise ValueError(f"{path}: partial_rotary_factor != 1 is not supported")
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, (("factor", float(params["factor"])), ("rope_type", "linear"))
  if kind == "llama3":
    return theta, tuple(sorted({
        "rope_type": "llama3",
        "factor": float(params["factor"]),
        "low_freq_factor": float(params.get("low_freq_factor", 1.0)),
        "high_freq_factor": float(params.get("high_freq_factor", 4.0)),
        "original_max_position_embeddings": int(params.get(
            "original_max_position_embeddings", raw.get("max_position_embeddings", 8192))),
    }.items()))
  raise ValueError(f"{path}: rope scaling type {kind!r} is not supported; allowed: default, linear, llama3")


def _check_no_sliding_window(raw: dict[str, Any], path: str, num_layers: int):
  layer_types = raw.get("layer_types")
  if layer_types is not None:
    sliding = any(t != "full_attention" for t in layer_types)
  else:  # transformers: layers i >= max_window_layers slide when use_sliding_window
    sliding = (bool(raw.get("use_sliding_window", False)) and raw.get("sliding_window") is not None
               and int(raw.get("max_window_layers", num_layers)) < num_layers)
  if sliding:
    raise ValueError(f"{path}: sliding-window attention (use_sliding_window / layer_types) is not "
                     "supported; only full attention in every layer")


def config_from_hf_dict(raw: dict[str, Any], path: str = "config.json", **run_overrides) -> ModelConfig:
  """ModelConfig from the dict of a config.json (see load_config)."""
  bad = sorted(set(run_overrides) - set(RUN_OVERRIDES))
  if bad:
    raise ValueError(f"unknown run override(s) {bad}; allowed: {list(RUN_OVERRIDES)}")
  archs = raw.get("architectures") or []
  if not archs:  # transformers' AutoModelForCausalLM goes by model_type alone
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"{path}: no 'architectures' and model_type={model_type!r} is not supported; allowed: "
                       f"architectures {sorted(ARCHITECTURES)} or model_type {sorted(MODEL_TYPES)}")
    archs = [MODEL_TYPES[model_type]]
  known = [a for a in archs if a in ARCHITECTURES]
  if isinstance(archs, str) or len(archs) != 1 or not known:
    raise ValueError(f"{path}: architectures={archs!r} is not supported; allowed: {sorted(ARCHITECTURES)}")
  arch = known[0]
  family = ARCHITECTURES[arch]
  if raw.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{path}: hidden_act={raw['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
  if raw.get("mlp_bias", False):
    raise ValueError(f"{path}: mlp_bias=true is not supported")
  try:
    num_layers = int(raw["num_hidden_layers"])
    num_heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    vocab, inter = int(raw["vocab_size"]), int(raw["intermediate_size"])
  except KeyError as e:
    raise ValueError(f"{path}: missing required field {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: a size field is not an integer ({e})") from None
  _check_no_sliding_window(raw, path, num_layers)
  theta, scaling = _rope_from_hf(raw, path)
  # transformers' Qwen3Config defaults head_dim to 128; the others derive it.
  head_dim = raw.get("head_dim") or (128 if family == "qwen3" else hidden // num_heads)
  attention_bias = bool(raw.get("attention_bias", False))
  try:  # a field of the wrong type, or a value ModelConfig refuses: name the file
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        qk_norm=family == "qwen3",
        max_position_embeddings=int(raw.get("max_position_embeddings",
                                            2048 if family == "llama" else 32768)),
        architecture=arch,
        **run_overrides)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None



def config_to_hf_dict(cfg: ModelConfig, tokenizer=None) -> dict[str, Any]:
  """config.json contents transformers (4.x and 5.x) reads back as the same architecture."""
  family = ARCHITECTURES[cfg.architecture]
  if family == "qwen2" and (not cfg.qkv_bias or cfg.o_bias or cfg.qk_norm):
    raise ValueError("Qwen2ForCausalLM needs qkv_bias=True, o_bias=False, qk_norm=False")
  if family != "qwen2" and cfg.qkv_bias != cfg.o_bias:
    raise ValueError(f"{cfg.architecture} has one attention_bias for q/k/v/o; got qkv_bias="
                     f"{cfg.qkv_bias}, o_bias={cfg.o_bias}")
  if cfg.qk_norm != (family == "qwen3"):
    raise ValueError(f"{cfg.architecture}: qk_norm={cfg.qk_norm} does not match the architecture")
  scaling = cfg.rope_scaling_dict
  raw = {
      "architectures": [cfg.architecture],
      "model_type": family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": scaling,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "torch_dtype": cfg.param_dtype,
      "use_cache": True,
  }
  if family == "llama":
    raw.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
  elif family == "qwen3":
    raw.update(attention_bias=cfg.qkv_bias)
  if family != "llama":
    raw.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
  if tokenizer is not None:
    raw.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
  return raw


# ----------------------------------------------------------------------------- weight layout
