"""Decoder-only LM (Llama / Qwen2 / Qwen3) as a pure function of a parameter pytree."""

from cispo_jax.model.config import ModelConfig
from cispo_jax.model.transformer import (forward, hidden_states, init_cache, init_params, lm_head,
                                         lm_logits, logical_axes, param_shapes, positions_from_mask)
from cispo_jax.model.hf_io import load_config, load_model, load_params, load_tokenizer, save_model
