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
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cispo_jax.model.config import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
# A config.json without `architectures` is read by its model_type, as transformers' Auto classes do.
MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}
# How to run a checkpoint (ModelConfig fields that config.json does not hold; rl_config.ModelRunConfig sets them).
RUN_OVERRIDES = ("dtype", "param_dtype", "lm_head_f32", "remat", "remat_policy", "scan_unroll",
                 "attention_impl", "attention_block", "logprob_chunk")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_INDEX = "model.safetensors.index.json"
# Files that hold a tokenizer's vocabulary (without one, transformers builds an empty tokenizer).
_TOKENIZER_VOCAB = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "*.tiktoken")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- config


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


def load_config(path: str, **run_overrides) -> ModelConfig:
  """ModelConfig of the HF directory `path`; run_overrides: any of RUN_OVERRIDES.

  Like transformers (5.x): a config with tie_word_embeddings=true whose weights hold an
  lm_head.weight different from the embedding is untied (the file's head is used), with a warning.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory (expected a local Hugging Face model directory)")
  cfg_path = os.path.join(path, "config.json")
  cfg = config_from_hf_dict(_read_json(cfg_path), cfg_path, **run_overrides)
  if cfg.tie_word_embeddings:
    try:
      files = _weight_files(path)
    except (FileNotFoundError, ValueError):
      return cfg  # no readable weights: load_params says why
    head = _distinct_lm_head(files)
    if head is not None:
      log.warning("%s sets tie_word_embeddings=true, but %s holds its own lm_head.weight, different "
                  "from model.embed_tokens.weight; using the file's lm_head (untied), as transformers does. "
                  "Set tie_word_embeddings=false in config.json to silence this.", cfg_path, head)
      cfg = cfg.replace(tie_word_embeddings=False)
  return cfg


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


class _Tensor(NamedTuple):
  ours: tuple[str, ...]  # path in our param tree
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  layer: int | None = None  # slice of the stacked [L, ...] array under params["layers"]


def _identity(x):
  return x


def _layout(cfg: ModelConfig) -> dict[str, _Tensor]:
  """HF tensor name -> where it lives in our tree, its HF shape, and the two conversions."""
  E, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  T = lambda x: x.T  # noqa: E731
  out = {"model.embed_tokens.weight": _Tensor(("embed",), (V, E), _identity, _identity),
         "model.norm.weight": _Tensor(("final_norm", "scale"), (E,), _identity, _identity)}
  if not cfg.tie_word_embeddings:
    out["lm_head.weight"] = _Tensor(("lm_head",), (V, E), T, T)
  for i in range(cfg.num_layers):
    hf, us = f"model.layers.{i}.", "layers"
    layer = lambda ours, shape, to_ours, to_hf: _Tensor(ours, shape, to_ours, to_hf, i)  # noqa: E731
    out[hf + "input_layernorm.weight"] = layer((us, "input_norm", "scale"), (E,), _identity, _identity)
    out[hf + "post_attention_layernorm.weight"] = layer(
        (us, "post_attn_norm", "scale"), (E,), _identity, _identity)
    for name, n in (("q", H), ("k", K), ("v", K)):
      out[hf + f"self_attn.{name}_proj.weight"] = layer(
          (us, "attn", f"{name}_kernel"), (n * D, E),
          lambda x, n=n: x.T.reshape(E, n, D), lambda x, n=n: x.reshape(E, n * D).T)
      if cfg.qkv_bias:
        out[hf + f"self_attn.{name}_proj.bias"] = layer(
            (us, "attn", f"{name}_bias"), (n * D,), lambda x, n=n: x.reshape(n, D), lambda x: x.reshape(-1))
    out[hf + "self_attn.o_proj.weight"] = layer(
        (us, "attn", "o_kernel"), (E, H * D), lambda x: x.T.reshape(H, D, E), lambda x: x.reshape(H * D, E).T)
    if cfg.o_bias:
      out[hf + "self_attn.o_proj.bias"] = layer((us, "attn", "o_bias"), (E,), _identity, _identity)
    if cfg.qk_norm:
      for name in ("q", "k"):
        out[hf + f"self_attn.{name}_norm.weight"] = layer(
            (us, "attn", f"{name}_norm", "scale"), (D,), _identity, _identity)
    for name, shape in (("gate", (F, E)), ("up", (F, E)), ("down", (E, F))):
      out[hf + f"mlp.{name}_proj.weight"] = layer((us, "mlp", f"{name}_kernel"), shape, T, T)
  return out


def _ignored(name: str, cfg: ModelConfig) -> bool:
  # Old checkpoints store the RoPE buffer; tied checkpoints sometimes store lm_head anyway.
  return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


# ----------------------------------------------------------------------------- weights


def _weight_files(path: str) -> list[str]:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory")
  index = os.path.join(path, _INDEX)
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no 'weight_map' object (tensor name -> shard file)")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
      raise FileNotFoundError(f"{index} lists shard(s) missing from {path}: {missing}")
    return [os.path.join(path, f) for f in files]
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if files:
    return files
  pickles = sorted(os.path.basename(p) for pat in _PICKLE_PATTERNS for p in glob.glob(os.path.join(path, pat)))
  if pickles:
    raise ValueError(f"{path} holds only pickle weights {pickles}; pickle weights are refused (they can run "
                     "code when loaded). Convert them to safetensors (e.g. in a trusted environment: "
                     "model.save_pretrained(dir, safe_serialization=True)).")
  raise FileNotFoundError(f"no *.safetensors weights in {path}")


def _open_safetensors(file: str):
  from safetensors import SafetensorError, safe_open

  try:
    return safe_open(file, framework="numpy")
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{file}: not a readable safetensors file ({e}); is it truncated or corrupt "
                     "(an interrupted download or copy)?") from None


def _read_tensor(f, file: str, name: str, rows: slice | None = None) -> np.ndarray:
  from safetensors import SafetensorError

  try:
    return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{file}: tensor {name!r} cannot be read ({e}); is the file truncated or corrupt?") from None


def _distinct_lm_head(files: list[str]) -> str | None:
  """The file holding an lm_head.weight that differs from model.embed_tokens.weight, else None.

  Compared block by block of rows, so the check never holds a whole [V, E] matrix.
  """
  where: dict[str, str] = {}
  for file in files:
    with _open_safetensors(file) as f:
      for name in ("lm_head.weight", "model.embed_tokens.weight"):
        if name in f.keys():
          where[name] = file
  if len(where) < 2:
    return None
  head_file, embed_file = where["lm_head.weight"], where["model.embed_tokens.weight"]
  with _open_safetensors(head_file) as h, _open_safetensors(embed_file) as e:
    shape = tuple(h.get_slice("lm_head.weight").get_shape())
    if shape != tuple(e.get_slice("model.embed_tokens.weight").get_shape()):
      return head_file
    rows = max(1, (1 << 24) // max(1, int(np.prod(shape[1:]))))  # 16M elements a block
    for start in range(0, shape[0] if shape else 0, rows):
      block = slice(start, min(start + rows, shape[0]))
      a = _read_tensor(h, head_file, "lm_head.weight", block)
      b = _read_tensor(e, embed_file, "model.embed_tokens.weight", block)
      if a.dtype != b.dtype or not np.array_equal(a, b):
        return head_file
  return None


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def _get_or_none(tree, keys):
  for k in keys:
    if k not in tree:
      return None
    tree = tree[k]
  return tree


def _set(tree: dict, keys: tuple[str, ...], value):
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked, x, i):
  return jax.lax.dynamic_update_index_in_dim(stacked, x, i, 0)  # i traced: one program per shape


def _stacked_zeros(shape, dtype, sharding):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _layer_sharding(sharding):
  """The sharding of one slice [i] of a stacked [L, ...] parameter: the spec without its layers axis."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))


def load_params(path: str, cfg: ModelConfig, shardings=None):
  """Parameters of the HF directory `path` in our layout, cast to cfg.param_dtype.

  `shardings` (optional): a pytree of jax.sharding.Sharding shaped like the params;
  each tensor is placed with its sharding as soon as it is read. A layer tensor is written
  into its slice of the stacked [L, ...] device array (allocated, sharded, at its first
  slice) by a donating update, so a load still never holds two copies of the model.
  """
  layout = _layout(cfg)
  np_dtype = _NP_DTYPES[cfg.param_dtype]
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params: dict = {}
  seen: set[str] = set()
  files = _weight_files(path)
  if cfg.tie_word_embeddings:
    head = _distinct_lm_head(files)
    if head is not None:  # the tied cfg would silently drop the file's head
      raise ValueError(f"{head}: holds an lm_head.weight different from model.embed_tokens.weight, but the "
                       "config has tie_word_embeddings=True; take the config from load_config (which unties it, "
                       "as transformers does) or set tie_word_embeddings=false")
  for file in files:
    with _open_safetensors(file) as f:
      for name in f.keys():
        if name not in layout:
          if _ignored(name, cfg):
            continue
          raise ValueError(f"{file}: unexpected tensor {name!r} for {cfg.architecture} with this config.json "
                           "(a bias or layer the config does not declare?)")
        spec = layout[name]
        got = tuple(f.get_slice(name).get_shape())
        if got != spec.hf_shape:
          raise ValueError(f"{file}: tensor {name!r} has shape {got}, expected {spec.hf_shape} from config.json")
        x = np.ascontiguousarray(spec.to_ours(_read_tensor(f, file, name)).astype(np_dtype))
        sharding = default if shardings is None else _get(shardings, spec.ours)
        if spec.layer is None:
          _set(params, spec.ours, jax.device_put(x, sharding))
        else:
          stacked = _get_or_none(params, spec.ours)
          if stacked is None:
            stacked = _stacked_zeros((cfg.num_layers, *x.shape), x.dtype, sharding)
          _set(params, spec.ours, _write_layer(stacked, jax.device_put(x, _layer_sharding(sharding)),
                                               np.int32(spec.layer)))
        del x
        seen.add(name)
  missing = [n for n in layout if n not in seen]
  if missing:
    raise ValueError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                     f"({len(missing)} of {len(layout)})")
  return params


def _check_tokenizer_files(path: str) -> None:
  """Without a vocabulary file, AutoTokenizer quietly builds a tokenizer that encodes every text
  to zero tokens; name what is missing instead."""
  found = {p for pat in _TOKENIZER_VOCAB for p in glob.glob(os.path.join(path, pat))}
  if os.path.join(path, "vocab.json") in found and not os.path.isfile(os.path.join(path, "merges.txt")) \
      and os.path.join(path, "tokenizer.json") not in found:
    raise FileNotFoundError(f"{path}: tokenizer file merges.txt is missing (vocab.json is there, and a BPE "
                            "tokenizer needs both, or a tokenizer.json)")
  if not found:
    present = sorted(os.listdir(path))
    raise FileNotFoundError(
        f"{path}: no tokenizer vocabulary file: none of tokenizer.json, tokenizer.model, vocab.json + merges.txt, "
        f"vocab.txt, spiece.model, *.tiktoken is there (files present: {present}); copy the checkpoint's "
        "tokenizer files into this directory")


def _sets_token(path: str, key: str) -> bool:
  """Whether the directory's tokenizer files themselves name the special token `key` (e.g. eos_token)."""
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    try:
      if _read_json(os.path.join(path, name)).get(key):
        return True
    except (FileNotFoundError, ValueError):
      pass
  return False


_PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str, vocab_size: int | None = None):
  """The directory's tokenizer via AutoTokenizer: local files only, never remote code.

  Checked here, so a bad directory fails at load naming its cause: a vocabulary file must
  exist; the tokenizer must have an eos token (the sampler's stop token) whose id, like the
  pad and bos ids, is below the model's `vocab_size` (default: config.json's, when there is
  one). A tokenizer without a pad token (or whose pad is a default transformers filled in that
  the vocabulary lacks) gets eos as its pad, logged: padded positions are masked, only the id
  must be valid. More tokens than vocab_size is only a warning: a prompt that holds such a
  token is refused when it is encoded (data.check_prompts, sampling.encode_prompts / generate).
  """
  from transformers import AutoTokenizer

  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory")
  _check_tokenizer_files(path)
  try:
    # A plain tokenizer.json (tokenizer_class TokenizersBackend, as our tiny models save) is loaded as
    # written: AutoTokenizer would swap in the config's model-type class (Qwen2Tokenizer), whose
    # byte-level pre-tokenizer silently drops the spaces and newlines of a character vocabulary.
    cls = AutoTokenizer
    tok_cfg = os.path.join(path, "tokenizer_config.json")
    if (os.path.isfile(tok_cfg) and os.path.isfile(os.path.join(path, "tokenizer.json"))
        and _read_json(tok_cfg).get("tokenizer_class") in _PLAIN_TOKENIZERS):
      from transformers import PreTrainedTokenizerFast as cls
    tok = cls.from_pretrained(path, local_files_only=True, trust_remote_code=False)
  except Exception as e:  # noqa: BLE001 -- re-raised with the directory named
    raise ValueError(f"{path}: transformers cannot load the tokenizer ({type(e).__name__}: {e})") from e
  if tok.eos_token_id is None:
    raise ValueError(f"{path}: the tokenizer has no eos_token (neither tokenizer_config.json nor "
                     "special_tokens_map.json sets one); the sampler stops on it: set \"eos_token\" in "
                     f"{os.path.join(path, 'tokenizer_config.json')} to the model's end-of-text token")
  if vocab_size is None and os.path.isfile(os.path.join(path, "config.json")):
    vocab_size = _read_json(os.path.join(path, "config.json")).get("vocab_size")
    vocab_size = vocab_size if isinstance(vocab_size, int) else None  # a bad one: load_config says so
  if vocab_size is not None:
    if tok.eos_token_id >= vocab_size:
      default = ("" if _sets_token(path, "eos_token") else
                 f"; the tokenizer files set no eos_token, so transformers filled in the default of "
                 f"{type(tok).__name__}, which the vocabulary lacks")
      raise ValueError(f"{path}: the tokenizer has no eos token in the model's vocabulary: eos_token "
                       f"{tok.eos_token!r} has id {tok.eos_token_id} >= vocab_size={vocab_size} (config.json)"
                       f"{default}. Set \"eos_token\" in tokenizer_config.json to the model's end-of-text token")
  pad_id = tok.pad_token_id
  if pad_id is None or (vocab_size is not None and pad_id >= vocab_size and not _sets_token(path, "pad_token")):
    why = ("has no pad_token" if pad_id is None else
           f"files set no pad_token, and transformers' default {tok.pad_token!r} of {type(tok).__name__} is not in "
           f"the model's vocabulary (id {pad_id} >= vocab_size={vocab_size})")
    log.warning("%s: the tokenizer %s; using its eos_token %r (id %d) as pad (padded positions are masked out)",
                path, why, tok.eos_token, tok.eos_token_id)
    tok.pad_token = tok.eos_token
  if vocab_size is not None:
    if tok.pad_token_id >= vocab_size:
      raise ValueError(f"{path}: the tokenizer's pad_token {tok.pad_token!r} has id {tok.pad_token_id} >= the "
                       f"model's vocab_size={vocab_size} (config.json): the tokenizer does not match the model. "
                       "Set \"pad_token\" in tokenizer_config.json to a token of the vocabulary")
    bos = tok.bos_token_id
    if bos is not None and bos >= vocab_size and bos in tok("a")["input_ids"]:  # only if prompts get it
      raise ValueError(f"{path}: the tokenizer starts every text with bos_token {tok.bos_token!r}, id {bos} >= "
                       f"the model's vocab_size={vocab_size} (config.json): the tokenizer does not match the "
                       "model. Set \"bos_token\" in tokenizer_config.json to a token of the vocabulary")
    if len(tok) > vocab_size:
      extra = tok.convert_ids_to_tokens(list(range(vocab_size, min(len(tok), vocab_size + 5))))
      log.warning("%s: the tokenizer has %d tokens but the model's vocab_size is %d: ids >= %d (%s%s) have no "
                  "embedding row; a prompt that holds one is refused when it is encoded", path, len(tok),
                  vocab_size, vocab_size, extra, " ..." if len(tok) > vocab_size + 5 else "")
  return tok


def load_model(path: str, **run_overrides):
  """(cfg, params) of an HF directory; run_overrides as in load_config."""
  cfg = load_config(path, **run_overrides)
  return cfg, load_params(path, cfg)




def save_model(path: str, cfg: ModelConfig, params, tokenizer=None, max_shard_bytes: int | None = None,
               to_host=None, write: bool = True) -> str:
  """Write config.json + safetensors (sharded with an index above max_shard_bytes) + tokenizer.

  Tensors keep the dtype of `params` (a bf16 policy is saved as bf16). Returns `path`.
  Multi-process: every process calls this with `to_host` a gathering fetch (each tensor is a
  collective, one at a time, so no host ever holds the whole model) and only one with write=True.
  """
  from safetensors.numpy import save_file

  to_host = to_host or (lambda x: np.asarray(jax.device_get(x)))
  if write:
    os.makedirs(path, exist_ok=True)
    # Leftover weights of an earlier save would be picked up by the loader's *.safetensors glob.
    for pattern in ("model.safetensors", "model-*-of-*.safetensors", _INDEX):
      for old in glob.glob(os.path.join(path, pattern)):
        os.remove(old)
    raw = config_to_hf_dict(cfg, tokenizer)
    raw["torch_dtype"] = np.dtype(params["embed"].dtype).name  # what is on disk, whatever cfg says
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(raw, f, indent=2)

  layout = _layout(cfg)
  shards: list[list[str]] = [[]]
  size = 0
  for name, spec in layout.items():
    nbytes = int(np.prod(spec.hf_shape)) * np.dtype(_get(params, spec.ours).dtype).itemsize
    if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  n = len(shards)
  weight_map, total = {}, 0
  for i, names in enumerate(shards):
    fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    tensors = {}
    for name in names:  # one shard in host memory at a time
      x = _get(params, layout[name].ours)
      if layout[name].layer is not None:
        x = x[layout[name].layer]
      x = to_host(x)
      tensors[name] = np.ascontiguousarray(layout[name].to_hf(x))
      if tensors[name].shape != layout[name].hf_shape:
        raise ValueError(f"param {'/'.join(layout[name].ours)} has shape {x.shape}; does not match cfg")
      total += tensors[name].nbytes
      weight_map[name] = fname
    if write:
      save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
    del tensors
  if not write:
    return path
  if n > 1:
    with open(os.path.join(path, _INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
  return path
