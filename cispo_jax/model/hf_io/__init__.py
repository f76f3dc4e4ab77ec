"""Read and write Hugging Face checkpoint directories (Llama / Qwen2 / Qwen3).

A directory holds config.json, *.safetensors (one file, or shards listed in
model.safetensors.index.json) and tokenizer files. Weights are read tensor by
tensor with `safe_open`, converted to our layout and cast one at a time, so a load
never holds two full copies of the model. Pickle weights (.bin/.pt/.pth) are refused
and no remote code runs.

Four modules: config.py (config.json <-> ModelConfig), weights.py (safetensors <-> our param tree; its
docstring gives the layout), tokenizer.py (the tokenizer, checked against the model), peft.py (PEFT LoRA
adapter directories <-> our adapter tree).
"""

from cispo_jax.model.hf_io.config import (ARCHITECTURES, MODEL_TYPES, RUN_OVERRIDES, config_from_hf_dict,
                                          config_to_hf_dict)
from cispo_jax.model.hf_io.peft import is_peft_dir, load_peft, read_peft_config, save_peft
from cispo_jax.model.hf_io.tokenizer import load_tokenizer
from cispo_jax.model.hf_io.weights import load_config, load_model, load_params, save_model

__all__ = ["ARCHITECTURES", "MODEL_TYPES", "RUN_OVERRIDES", "config_from_hf_dict", "config_to_hf_dict",
           "is_peft_dir", "load_config", "load_model", "load_params", "load_peft", "load_tokenizer", "read_peft_config",
           "save_model", "save_peft"]
