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
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cispo_jax.model.config import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
# How to run a checkpoint (ModelConfig fields that config.json does not hold; RLConfig sets them).
RUN_OVERRIDES = ("dtype", "param_dtype", "lm_head_f32", "remat", "remat_policy", "scan_unroll",
                 "attention_impl", "attention_block", "logprob_chunk")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- config


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found (a Hugging Face model directory needs config.json)")
  with open(path) as f:
    return json.load(f)


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
  known = [a for a in archs if a in ARCHITECTURES]
  if len(archs) != 1 or not known:
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
  _check_no_sliding_window(raw, path, num_layers)
  theta, scaling = _rope_from_hf(raw, path)
  # transformers' Qwen3Config defaults head_dim to 128; the others derive it.
  head_dim = raw.get("head_dim") or (128 if family == "qwen3" else hidden // num_heads)
  attention_bias = bool(raw.get("attention_bias", False))
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


def load_config(path: str, **run_overrides) -> ModelConfig:
  """ModelConfig of the HF directory `path`; run_overrides: any of RUN_OVERRIDES."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory (expected a local Hugging Face model directory)")
  cfg_path = os.path.join(path, "config.json")
  return config_from_hf_dict(_read_json(cfg_path), cfg_path, **run_overrides)


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
  from safetensors import safe_open

  layout = _layout(cfg)
  np_dtype = _NP_DTYPES[cfg.param_dtype]
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params: dict = {}
  seen: set[str] = set()
  for file in _weight_files(path):
    with safe_open(file, framework="numpy") as f:
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
        x = np.ascontiguousarray(spec.to_ours(f.get_tensor(name)).astype(np_dtype))
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


def load_tokenizer(path: str):
  """The directory's tokenizer via AutoTokenizer: local files only, never remote code."""
  from transformers import AutoTokenizer

  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory")
  return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def load_model(path: str, **run_overrides):
  """(cfg, params) of an HF directory; run_overrides as in load_config."""
  cfg = load_config(path, **run_overrides)
  return cfg, load_params(path, cfg)




def save_model(path: str, cfg: ModelConfig, params, tokenizer=None, max_shard_bytes: int | None = None) -> str:
  """Write config.json + safetensors (sharded with an index above max_shard_bytes) + tokenizer.

  Tensors keep the dtype of `params` (a bf16 policy is saved as bf16). Returns `path`.
  """
  from safetensors.numpy import save_file

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
      x = np.asarray(jax.device_get(x))
      tensors[name] = np.ascontiguousarray(layout[name].to_hf(x))
      if tensors[name].shape != layout[name].hf_shape:
        raise ValueError(f"param {'/'.join(layout[name].ours)} has shape {x.shape}; does not match cfg")
      total += tensors[name].nbytes
      weight_map[name] = fname
    save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
    del tensors
  if n > 1:
    with open(os.path.join(path, _INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
  return path
