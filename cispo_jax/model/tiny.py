"""Tiny Hugging Face model directories for tests and smoke runs, built without torch.

`build_char_tokenizer` makes a character-level tokenizer (one token per character);
`make_tiny_model_dir` writes config.json + model.safetensors + tokenizer files with
our own parameter tree and `save_model`, so transformers (and our loader) read it like a real
checkpoint. Weights are drawn at a scale that gives O(1) logits (biases and norm
scales are random too), so parity tests are not comparing near-zero numbers.
"""

from __future__ import annotations

import string
from typing import Any

import jax
import numpy as np

from cispo_jax.model.config import ModelConfig
from cispo_jax.model.hf_io import save_model
from cispo_jax.model.hf_io.config import _NP_DTYPES, _rope_from_hf
from cispo_jax.model.transformer import param_shapes

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
DEFAULT_ALPHABET = string.ascii_letters + string.digits + " \n+-*/=().,:;?!'\"_<>#"
# Plain-text chat template whose characters are all in DEFAULT_ALPHABET.
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}")

_FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, chat_template: str | None = None):
  """Character-level PreTrainedTokenizerFast: ids 0,1,2 = <pad>, <eos>, <unk>, then the alphabet.

  decode(encode(s)) == s for strings over the alphabet; no BOS is added.
  """
  from tokenizers import Tokenizer, decoders, models
  from transformers import PreTrainedTokenizerFast

  if len(set(alphabet)) != len(alphabet) or not alphabet:
    raise ValueError(f"alphabet must be non-empty with distinct characters; got {alphabet!r}")
  vocab = {PAD: 0, EOS: 1, UNK: 2}
  for ch in alphabet:
    vocab[ch] = len(vocab)
  # BPE with no merges = one token per character; Fuse joins tokens without spaces.
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
  tok.decoder = decoders.Fuse()
  out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                clean_up_tokenization_spaces=False)
  if chat_template is not None:
    out.chat_template = chat_template
  return out


def random_params(cfg: ModelConfig, seed: int = 0):
  """Numpy parameters with O(1) logits and no bias/norm trivially 0/1.

  Drawn with numpy from `param_shapes`, so building a tiny model compiles nothing.
  """
  rng = np.random.default_rng(seed)
  fan_in = {"q_kernel": cfg.hidden_size, "k_kernel": cfg.hidden_size, "v_kernel": cfg.hidden_size,
            "o_kernel": cfg.num_heads * cfg.head_dim, "gate_kernel": cfg.hidden_size,
            "up_kernel": cfg.hidden_size, "down_kernel": cfg.intermediate_size, "lm_head": cfg.hidden_size,
            # also the LM head when tied: keep those logits O(1)
            "embed": cfg.hidden_size / 4}

  def draw(path, s):
    name = path[-1].key
    noise = rng.standard_normal(s.shape, dtype=np.float32)
    if name == "scale":
      y = 1.0 + 0.2 * noise
    elif name.endswith("bias"):
      y = 0.2 * noise
    else:
      y = noise / np.sqrt(fan_in[name])
    return y.astype(_NP_DTYPES[cfg.param_dtype])

  return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


def tiny_config(family: str = "qwen2", vocab_size: int = 128, hidden_size: int = 64,
                intermediate_size: int | None = None, num_layers: int = 2, num_heads: int = 4,
                num_kv_heads: int = 2, head_dim: int | None = None, tie_word_embeddings: bool = False,
                rope_scaling: dict[str, Any] | None = None, **overrides) -> ModelConfig:
  """A small ModelConfig of `family` (llama | qwen2 | qwen3) with that family's attention flags."""
  if family not in _FAMILIES:
    raise ValueError(f"family={family!r}; allowed: {sorted(_FAMILIES)}")
  max_pos = overrides.pop("max_position_embeddings", 256)
  theta, scaling = _rope_from_hf({"rope_scaling": rope_scaling, "max_position_embeddings": max_pos,
                                  "rope_theta": overrides.pop("rope_theta", 10000.0)}, "rope_scaling")
  fields = dict(
      vocab_size=vocab_size, hidden_size=hidden_size,
      intermediate_size=intermediate_size or 2 * hidden_size, num_layers=num_layers,
      num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim or hidden_size // num_heads,
      rope_theta=theta, rope_scaling=scaling, rms_norm_eps=1e-6,
      tie_word_embeddings=tie_word_embeddings, qkv_bias=family == "qwen2", o_bias=False,
      qk_norm=family == "qwen3", max_position_embeddings=max_pos, architecture=_FAMILIES[family])
  fields.update(overrides)
  return ModelConfig(**fields)


def make_tiny_model_dir(path: str, family: str = "qwen2", tokenizer=None, hidden_size: int = 64,
                        intermediate_size: int | None = None, num_layers: int = 2, num_heads: int = 4,
                        num_kv_heads: int = 2, head_dim: int | None = None,
                        tie_word_embeddings: bool = False, rope_scaling: dict[str, Any] | None = None,
                        seed: int = 0, **overrides) -> str:
  """Write a random tiny HF checkpoint of `family` to `path` and return `path`.

  tokenizer: None (DEFAULT_ALPHABET), an alphabet string, or a tokenizer object.
  vocab_size defaults to len(tokenizer); overrides are other ModelConfig fields
  (e.g. vocab_size, qkv_bias, o_bias for Llama attention_bias, rope_theta, param_dtype).
  """
  if tokenizer is None or isinstance(tokenizer, str):
    tokenizer = build_char_tokenizer(tokenizer or DEFAULT_ALPHABET)
  overrides.setdefault("vocab_size", len(tokenizer))
  cfg = tiny_config(family, hidden_size=hidden_size, intermediate_size=intermediate_size,
                    num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                    head_dim=head_dim, tie_word_embeddings=tie_word_embeddings,
                    rope_scaling=rope_scaling, **overrides)
  params = random_params(cfg, seed)
  return save_model(path, cfg, params, tokenizer=tokenizer)
