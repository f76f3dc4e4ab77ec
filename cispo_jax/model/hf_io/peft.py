"""PEFT LoRA adapter directories <-> our adapter tree (model/lora.py): save_peft, is_peft_dir, load_peft.

A directory holds adapter_config.json and adapter_model.safetensors, the layout `peft` (0.21) writes and
`PeftModel.from_pretrained(base, dir)` reads onto a transformers model, so adapters trained here run in the
HF ecosystem unmerged, and adapters trained with peft can be evaluated here. Tensor names and shapes (peft's,
torch Linear's [out, in] convention; the `base_model.model.` prefix is peft's wrapper of the CausalLM):

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, E]      <- q_lora_a [L, E, r] slice i, .T
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [H*D, r]    <- q_lora_b [L, r, H, D] slice i
  (k, v, o_proj, mlp.gate/up/down_proj alike: A [r, in_features], B [out_features, r]; o's input is H*D)
  base_model.model.model.embed_tokens.lora_embedding_A              [r, V]      <- embed_lora_a [V, r] .T
  base_model.model.model.embed_tokens.lora_embedding_B              [E, r]      <- embed_lora_b [r, E] .T
  base_model.model.lm_head.lora_A.weight [r, E], lora_B.weight [V, r]          <- lm_head_lora_a/b .T

In every case the HF tensor is ours flattened to (in, r) / (r, out) and transposed. The delta is the same:
peft adds scaling * B(A(x)) (Embedding: A.T[tokens] @ B.T), with scaling lora_alpha / r (or / sqrt(r) with
use_rslora). Only what our model computes is accepted: plain LoRA on the modules of lora.HF_MODULES; DoRA,
per-module ranks, adapter biases, modules_to_save and partial layers are refused by name. Pickle weights
(adapter_model.bin) are refused, as for models.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import numpy as np

from cispo_jax.model import lora
from cispo_jax.model.config import ModelConfig
from cispo_jax.model.hf_io.config import _read_json
from cispo_jax.model.hf_io.weights import _Tensor, _get, _open_safetensors, _read_tensor, _set

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_PREFIX = "base_model.model."
_MODULES = {m: t for t, m in lora.HF_MODULES.items()}
_ATTN = ("q", "k", "v", "o")
# adapter_config.json keys that must be empty / false: each is a peft feature our model does not compute
_UNSUPPORTED = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "lora_bias", "layers_to_transform",
                "layer_replication", "exclude_modules", "target_parameters", "trainable_token_indices",
                "alora_invocation_tokens", "use_qalora", "use_bdlora")
log = logging.getLogger(__name__)


def is_peft_dir(path: str) -> bool:
  """Whether `path` is an adapter directory (it holds adapter_config.json), not a full model."""
  return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def _module(target: str, layer: int | None) -> str:
  """The transformers module a target's adapter sits on, with peft's prefix."""
  if target == "embed":
    return _PREFIX + "model.embed_tokens"
  if target == "lm_head":
    return _PREFIX + "lm_head"
  block = "self_attn" if target in _ATTN else "mlp"
  return _PREFIX + f"model.layers.{layer}.{block}.{lora.HF_MODULES[target]}"


def _layout(cfg: ModelConfig, lcfg: lora.LoraConfig) -> dict[str, _Tensor]:
  """peft tensor name -> where it lives in our adapter tree, its HF shape and the two conversions."""
  from cispo_jax.model.transformer import param_shapes

  lcfg.check_model(cfg)
  shapes = lora.adapter_shapes(param_shapes(cfg), lcfg)
  out = {}
  for t in lcfg.targets:
    path, _ = lora.WEIGHTS[t]
    layers = range(cfg.num_layers) if path[0] == "layers" else [None]
    for which, suffix in (("a", "A"), ("b", "B")):
      ours = path[:-1] + (lora.adapter_key(path[-1], which),)
      shape = _get(shapes, ours).shape[0 if path[0] != "layers" else 1:]  # one layer's
      flat = (math.prod(shape[:-1]), shape[-1]) if which == "a" else (shape[0], math.prod(shape[1:]))
      to_hf = lambda x, flat=flat: x.reshape(flat).T  # noqa: E731
      to_ours = lambda x, shape=shape: x.T.reshape(shape)  # noqa: E731
      for i in layers:
        name = _module(t, i) + (f".lora_embedding_{suffix}" if t == "embed" else f".lora_{suffix}.weight")
        out[name] = _Tensor(ours, flat[::-1], to_ours, to_hf, i)
  return out


def save_peft(path: str, cfg: ModelConfig, adapters, lcfg: lora.LoraConfig, base_model_dir: str, to_host=None,
              write: bool = True, base_fingerprint: str | None = None) -> str:
  """Write adapter_config.json + adapter_model.safetensors (float32) of the adapter tree `adapters`
  (lora.split(params)[1]) for the base `base_model_dir` (recorded as an absolute path, with our
  lora.fingerprint of it when given). Returns `path`. Multi-process as weights.save_model: every process
  calls it with `to_host` a gathering fetch (one tensor at a time), only one with write=True."""
  from safetensors.numpy import save_file

  to_host = to_host or (lambda x: np.asarray(jax.device_get(x)))
  tensors = {}
  for name, spec in _layout(cfg, lcfg).items():
    x = _get(adapters, spec.ours)
    x = to_host(x if spec.layer is None else x[spec.layer])
    tensors[name] = np.ascontiguousarray(spec.to_hf(np.asarray(x, np.float32)))
    if tensors[name].shape != spec.hf_shape:
      raise ValueError(f"adapter {'/'.join(spec.ours)} has shape {x.shape}; does not match cfg and {lcfg}")
  if not write:
    return path
  os.makedirs(path, exist_ok=True)
  # Our base fingerprint rides in the safetensors header, not adapter_config.json: peft warns about keys it
  # does not know there ("upgrade PEFT"), while header metadata is free-form.
  meta = {"format": "pt", **({FINGERPRINT_KEY: base_fingerprint} if base_fingerprint is not None else {})}
  save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata=meta)
  raw = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank, "lora_alpha": lcfg.alpha,
         "use_rslora": lcfg.rslora, "target_modules": [lora.HF_MODULES[t] for t in lcfg.targets],
         "base_model_name_or_path": os.path.abspath(base_model_dir), "bias": "none", "lora_dropout": 0.0,
         "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
         "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}
  with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
    json.dump(raw, f, indent=2)
  return path


FINGERPRINT_KEY = "cispo_jax.base_fingerprint"  # adapter_model.safetensors metadata: lora.fingerprint of the base


def read_peft_config(path: str) -> tuple[lora.LoraConfig, str | None, str | None]:
  """(LoraConfig, base_model_name_or_path, our base fingerprint or None) of the adapter directory `path`;
  a setting our model cannot run is refused, naming the file and the key."""
  file = os.path.join(path, ADAPTER_CONFIG)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
  raw = _read_json(file)

  def refuse(key, why):
    raise ValueError(f"{file}: {key}={raw.get(key)!r}: {why}")

  if raw.get("peft_type") != "LORA":
    refuse("peft_type", "only LoRA adapters (peft_type 'LORA') are supported")
  if raw.get("task_type") not in (None, "CAUSAL_LM"):
    refuse("task_type", "only causal-LM adapters (task_type 'CAUSAL_LM') are supported")
  if raw.get("bias", "none") != "none":
    refuse("bias", "trained biases are not supported (want 'none')")
  if raw.get("fan_in_fan_out", False):
    refuse("fan_in_fan_out", "Conv1D-style (GPT-2) weights are not supported (want false)")
  for key in _UNSUPPORTED:
    if raw.get(key):
      refuse(key, "not supported by this model's LoRA (want it empty / false)")
  modules = raw.get("target_modules")
  if not isinstance(modules, list) or not modules:
    refuse("target_modules", "want a list of module names (a regex or 'all-linear' is not supported)")
  unknown = sorted(m for m in modules if m not in _MODULES)
  if unknown:
    refuse("target_modules", f"{unknown} are not modules of this model; allowed: {sorted(_MODULES)}")
  r, alpha = raw.get("r"), raw.get("lora_alpha")
  if not isinstance(r, int) or isinstance(r, bool) or r < 1:
    refuse("r", "want a positive integer rank")
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
    refuse("lora_alpha", "want a positive number")
  lcfg = lora.LoraConfig(rank=r, alpha=float(alpha), targets=tuple(_MODULES[m] for m in modules),
                         rslora=bool(raw.get("use_rslora", False)))
  weights = os.path.join(path, ADAPTER_WEIGHTS)
  fingerprint = None
  if os.path.isfile(weights):
    from safetensors import safe_open

    with safe_open(weights, framework="numpy") as f:
      fingerprint = (f.metadata() or {}).get(FINGERPRINT_KEY)
  return lcfg, raw.get("base_model_name_or_path"), fingerprint


def _adapter_file(path: str) -> str:
  file = os.path.join(path, ADAPTER_WEIGHTS)
  if os.path.isfile(file):
    return file
  pickles = [p for p in _PICKLES if os.path.isfile(os.path.join(path, p))]
  if pickles:
    raise ValueError(f"{path} holds only pickle adapter weights {pickles}; pickle weights are refused (they can run "
                     f"code when loaded). Convert them to {ADAPTER_WEIGHTS} (in a trusted environment: "
                     "model.save_pretrained(dir, safe_serialization=True)).")
  raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS}")


def load_peft(path: str, cfg: ModelConfig, shardings=None):
  """(adapters, lcfg, base_model_name_or_path, base_fingerprint) of the adapter directory `path` for the base
  model config `cfg`: the adapter tree in our layout, float32, placed with `shardings` (a tree like it) if
  given. A missing, unexpected or misshaped tensor is refused, naming it and the file."""
  lcfg, base_dir, fingerprint = read_peft_config(path)
  file = _adapter_file(path)
  layout = _layout(cfg, lcfg)
  layers: dict[tuple[str, ...], dict[int | None, np.ndarray]] = {}
  with _open_safetensors(file) as f:
    for name in f.keys():
      if name not in layout:
        stem = name.removesuffix(".base_layer.weight")
        if stem != name and stem in (_module("embed", None), _module("lm_head", None)):
          # peft's save_embedding_layers: a copy of the base's own embedding / head, not an adapter
          log.warning("%s: ignoring %s (peft's copy of the base's layer); the base's own weights are used", file,
                      name)
          continue
        raise ValueError(f"{file}: unexpected tensor {name!r} for {lcfg} on {cfg.architecture} "
                         f"({cfg.num_layers} layers)")
      spec = layout[name]
      got = tuple(f.get_slice(name).get_shape())
      if got != spec.hf_shape:
        raise ValueError(f"{file}: tensor {name!r} has shape {got}, expected {spec.hf_shape} (r={lcfg.rank} "
                         "and the base model's config.json)")
      x = spec.to_ours(_read_tensor(f, file, name).astype(np.float32))
      layers.setdefault(spec.ours, {})[spec.layer] = x
  missing = [n for n, s in layout.items() if s.layer not in layers.get(s.ours, {})]
  if missing:
    raise ValueError(f"{file}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                     f"({len(missing)} of {len(layout)}) for target_modules of {ADAPTER_CONFIG}")
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  adapters: dict = {}
  for ours, by_layer in layers.items():
    x = by_layer[None] if None in by_layer else np.stack([by_layer[i] for i in range(cfg.num_layers)])
    _set(adapters, ours, jax.device_put(np.ascontiguousarray(x), default if shardings is None else
                                        _get(shardings, ours)))
  return adapters, lcfg, base_dir, fingerprint
