"""The offline default policy: a small HF-format model warm-started by supervised fine-tuning.

No model can be downloaded here, so the default experiment makes its own starting point: a
character-level tokenizer over the task's alphabet, a random small Qwen2, and a short SFT on
reference completions of the training split, so RL starts from a non-zero pass rate. The result
is written as an ordinary HF directory and RL loads it from disk exactly like a real checkpoint.
The directory is keyed by a hash of its config, so repeated runs reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cispo_jax import data as data_lib
from cispo_jax.model.logprobs import token_logps_and_entropy
from cispo_jax.model import forward
from cispo_jax.model.hf_io import save_model
from cispo_jax.model.tiny import build_char_tokenizer, tiny_config
from cispo_jax.model.transformer import init_params
from cispo_jax.task import LATER_FIELDS, REWARD_FIELDS, make_sources

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BootstrapConfig:
  """Size of the bootstrap model and length of its supervised warm start."""
  cache_dir: str = "runs/bootstrap"
  hidden_size: int = 128
  intermediate_size: int = 384
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  sft_steps: int = 200
  sft_batch_size: int = 64
  sft_learning_rate: float = 3e-3
  sft_examples: int = 4000  # size of the SFT slice of the training split
  # Share of SFT targets written as worked solutions (meta["scratchpad"]) instead of bare answers:
  # the warm start then knows both behaviours, and RL has to find out which one pays.
  sft_scratchpad_fraction: float = 0.0
  seed: int = 0

  def __post_init__(self):
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "sft_batch_size", "sft_examples"):
      if getattr(self, name) < 1:
        raise ValueError(f"BootstrapConfig.{name}={getattr(self, name)}; must be >= 1")
    if self.sft_steps < 0:
      raise ValueError(f"BootstrapConfig.sft_steps={self.sft_steps}; must be >= 0")
    if not 0.0 <= self.sft_scratchpad_fraction <= 1.0:
      raise ValueError(f"BootstrapConfig.sft_scratchpad_fraction={self.sft_scratchpad_fraction}; must be in [0, 1]")


def sft_completion(example, rng: np.random.Generator, scratchpad_fraction: float) -> str:
  if "scratchpad" in example.meta and rng.random() < scratchpad_fraction:
    return example.meta["scratchpad"]
  return data_lib.reference_completion(example)


def _sft_arrays(tokenizer, examples, eos_id: int, scratchpad_fraction: float = 0.0, seed: int = 0):
  """Right-padded prompt+completion+eos token arrays and a mask over the completion part."""
  rows, rng = [], np.random.default_rng(seed)
  for ex in examples:
    p = tokenizer.encode(ex.prompt, add_special_tokens=False)
    c = tokenizer.encode(sft_completion(ex, rng, scratchpad_fraction), add_special_tokens=False) + [eos_id]
    rows.append((p, c))
  L = max(len(p) + len(c) for p, c in rows)
  tokens = np.zeros((len(rows), L), np.int32)
  valid = np.zeros((len(rows), L), bool)
  target = np.zeros((len(rows), L), np.float32)  # 1 where the token is predicted by the loss
  for i, (p, c) in enumerate(rows):
    tokens[i, :len(p) + len(c)] = p + c
    valid[i, :len(p) + len(c)] = True
    target[i, len(p):len(p) + len(c)] = 1.0
  return tokens, valid, target


def sft(params, model_cfg, tokens, valid, target, cfg: BootstrapConfig):
  """Teacher-forced cross-entropy on the completion tokens; returns params and the loss curve."""
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, cfg.sft_learning_rate, 20, max(cfg.sft_steps, 21)),
                   weight_decay=0.0)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, tok, val, tgt):
    def loss_fn(p):
      logits, _ = forward(p, model_cfg, tok, kv_valid_BxS=val)
      logps, _ = token_logps_and_entropy(logits[:, :-1], tok[:, 1:])
      return -(logps * tgt[:, 1:]).sum() / tgt[:, 1:].sum()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(cfg.seed)
  curve = []
  for _ in range(cfg.sft_steps):
    idx = rng.integers(0, len(tokens), cfg.sft_batch_size)
    params, opt_state, loss = step(params, opt_state, tokens[idx], valid[idx], target[idx])
    curve.append(loss)
  return params, [float(x) for x in jax.device_get(curve)]


def bootstrap_model(task_cfg, cfg: BootstrapConfig) -> str:
  """Build (or reuse) the bootstrap model directory for this task and return its path."""
  # Keyed on what shapes the model: the reward fields (task.REWARD_FIELDS: the mix, its timeouts, workers and
  # error policy) and the too-long policy (the SFT examples are not filtered by it) don't, so changing them
  # reuses it.
  # Fields added later (task.LATER_FIELDS) are keyed only when set, so existing directories keep their keys.
  defaults = dataclasses.asdict(type(task_cfg)(**{"task": task_cfg.task, "train_path": task_cfg.train_path}))
  data_cfg = {k: v for k, v in dataclasses.asdict(task_cfg).items()
              if k not in (*REWARD_FIELDS, "too_long") and not (k in LATER_FIELDS and v == defaults[k])}
  key = hashlib.sha1(json.dumps([dataclasses.asdict(cfg), data_cfg], sort_keys=True, default=str).encode()
                     ).hexdigest()[:12]
  path = os.path.join(cfg.cache_dir, f"model-{key}")
  if os.path.exists(os.path.join(path, "bootstrap.json")):
    log.info("reusing bootstrap model %s", path)
    return path
  log.info("bootstrapping a %d-layer, %d-wide model with %d SFT steps -> %s", cfg.num_layers, cfg.hidden_size,
           cfg.sft_steps, path)
  train_src, _ = make_sources(task_cfg, seed=cfg.seed)
  tokenizer = build_char_tokenizer(data_lib.ALPHABET)
  model_cfg = tiny_config("qwen2", vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                          intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                          num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
  params = init_params(model_cfg, jax.random.PRNGKey(cfg.seed))
  examples = [train_src[i] for i in range(min(cfg.sft_examples, len(train_src)))]
  tokens, valid, target = _sft_arrays(tokenizer, examples, tokenizer.eos_token_id, cfg.sft_scratchpad_fraction,
                                     cfg.seed)
  params, curve = sft(params, model_cfg, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(target), cfg)
  save_model(path, model_cfg, jax.device_get(params), tokenizer)
  with open(os.path.join(path, "bootstrap.json"), "w") as f:  # written last: marks a complete directory
    json.dump({"sft_loss_first": curve[:1], "sft_loss_last": curve[-1:], "config": dataclasses.asdict(cfg)}, f)
  log.info("bootstrap model -> %s (SFT loss %s -> %s)", path, curve[:1], curve[-1:])
  return path
