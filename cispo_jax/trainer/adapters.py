"""The trainer's LoRA parts (model/lora.py has the adapters themselves): the adapters' first values, the
policy's layout for the engines, the base a checkpoint was trained on, and the final export.

With LoraConfig.rank > 0 the train state's params are the adapters alone (optimizer state for them only);
the base is frozen in the compute dtype (parts.build_state), passed to the update as an argument it never
differentiates or donates, and it is the KL's reference as it is (adapters off). Everything that samples or
scores with the policy gets `lora.combine(base, adapters)`.
"""

from __future__ import annotations

import functools
import logging
import os

import jax

from cispo_jax.model import hf_io, logical_axes, lora, param_shapes

log = logging.getLogger(__name__)


def init(rl, model_cfg, base_shapes, shardings, fingerprint: str):
  """The adapters at step 0 (A random, B zero: the policy is the base), built in their layout. Their key is
  derived from the seed apart from the state's rng, which stays the full fine-tuning run's."""
  lc = rl.lora
  key = jax.random.fold_in(jax.random.PRNGKey(rl.seed), 0x10A)
  adapters = jax.jit(functools.partial(lora.init_adapters, base_shapes=base_shapes, lcfg=lc,
                                       dtype=model_cfg.jnp_param_dtype), out_shardings=shardings)(key)
  log.info("LoRA rank %d (alpha %g, scaling %g%s) on %s: %d trained parameters; base %s frozen in %s, "
           "fingerprint %s", lc.rank, lc.alpha, lc.scaling, ", rsLoRA" if lc.rslora else "", ",".join(lc.targets),
           lora.count(adapters), rl.model_dir, model_cfg.dtype, fingerprint)
  return adapters


def policy_layout(lc: lora.LoraConfig, model_cfg):
  """(logical axes, shapes) of the policy's full tree: the base's, with the adapters' beside them under LoRA."""
  logical, shapes = logical_axes(model_cfg), param_shapes(model_cfg)
  if not lc.enabled:
    return logical, shapes
  return (lora.combine(logical, lora.adapter_logical_axes(logical, lc)),
          lora.combine(shapes, lora.adapter_shapes(shapes, lc, model_cfg.jnp_param_dtype)))


def base_record(rl, fingerprint: str | None) -> dict:
  """What a checkpoint keeps of the base its adapters were trained on ({} without LoRA)."""
  if fingerprint is None:
    return {}
  return {"lora_base": {"path": os.path.abspath(rl.model_dir), "fingerprint": fingerprint}}


def check_base(host: dict, rl, fingerprint: str | None, directory: str) -> None:
  """Refuse to resume adapters on another base than the one they were trained on, naming both."""
  if fingerprint is None:
    return
  saved = host.get("lora_base")
  if saved is None:
    raise ValueError(f"the checkpoint in {directory} holds no LoRA base record (it was not written by a LoRA run); "
                     "start a LoRA run in a new run directory")
  if saved["fingerprint"] != fingerprint:
    raise ValueError(f"the checkpoint in {directory} holds adapters trained on the base {saved['path']} (weights "
                     f"fingerprint {saved['fingerprint']}), but this run's base is {os.path.abspath(rl.model_dir)} "
                     f"(fingerprint {fingerprint}): adapters are only meaningful on their own base. Point "
                     "RLConfig.model_dir at the original base, or start a new run directory")
  if saved["path"] != os.path.abspath(rl.model_dir):
    log.info("LoRA base moved: %s -> %s (same weights, fingerprint %s)", saved["path"],
             os.path.abspath(rl.model_dir), fingerprint)


def export_final(path: str, rl, st, params, model_cfg, tokenizer, to_host, write: bool) -> None:
  """final_model/: the HF model (full fine-tuning); with LoRA a PEFT adapter directory ('peft'), the merged
  model ('merged'), or both (the merged model in final_model/merged)."""
  if st.frozen is None:
    hf_io.save_model(path, model_cfg, params, tokenizer, to_host=to_host, write=write)
    return
  lc = rl.lora
  if lc.export in ("peft", "both"):
    hf_io.save_peft(path, model_cfg, params, lc, rl.model_dir, to_host=to_host, write=write,
                    base_fingerprint=st.base_fingerprint)
    if write and tokenizer is not None:
      tokenizer.save_pretrained(path)
  if lc.export in ("merged", "both"):
    layout = jax.tree.map(lambda x: x.sharding, st.frozen)
    merged = jax.jit(functools.partial(lora.merged, scaling=lc.scaling), out_shardings=layout)(st.policy(params))
    hf_io.save_model(path if lc.export == "merged" else os.path.join(path, "merged"), model_cfg, merged,
                     tokenizer, to_host=to_host, write=write)
