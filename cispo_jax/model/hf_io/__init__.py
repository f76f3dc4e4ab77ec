"""Read and write Hugging Face checkpoint directories (Llama / Qwen2 / Qwen3).

A directory holds config.json, *.safetensors (one file, or shards listed in
model.safetensors.index.json) and tokenizer files. Weights are read tensor by
tensor with `safe_open`, converted to our layout and cast one at a time, so a load
never holds two full copies of the model. Pickle weights (.bin/.pt/.pth) are refused
and no remote code runs.

Layout differences from HF (torch Linear stores weight [out, in]); a layer tensor
`model.layers.{i}.*` is slice i of a stacked [L, ...] array under `layers/`:
  q/k/v_proj.weight [n*D, E]  <-> attn/{q,k,v}_kernel [E, n, D]
  o_proj.weight     [E, H*D]  <-> attn/o_kernel       [H, D, E]
  gate/up_proj      [F, E]    <-> mlp/{gate,up}_kernel [E, F];  down_proj [E, F] <-> [F, E]
  lm_head.weight    [V, E]    <-> lm_head             [E, V]

Three modules: config.py (config.json <-> ModelConfig), weights.py (safetensors <-> our param tree),
tokenizer.py (the tokenizer, checked against the model).
"""

from cispo_jax.model.hf_io.config import (ARCHITECTURES, MODEL_TYPES, RUN_OVERRIDES, config_from_hf_dict,
                                          config_to_hf_dict)
from cispo_jax.model.hf_io.tokenizer import load_tokenizer
from cispo_jax.model.hf_io.weights import load_config, load_model, load_params, save_model

__all__ = ["ARCHITECTURES", "MODEL_TYPES", "RUN_OVERRIDES", "config_from_hf_dict", "config_to_hf_dict",
           "load_config", "load_model", "load_params", "load_tokenizer", "save_model"]
