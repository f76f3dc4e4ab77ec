"""The weights of a Hugging Face directory: load_config (with the tied-head check), load_params, save_model.

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
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cispo_jax.model.config import ModelConfig
from cispo_jax.model.hf_io.config import _NP_DTYPES, _read_json, config_from_hf_dict, config_to_hf_dict

_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_INDEX = "model.safetensors.index.json"
log = logging.getLogger(__name__)


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
