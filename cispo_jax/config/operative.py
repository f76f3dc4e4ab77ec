"""The config a run directory was started with: operative_config.gin, kept and compared on resume."""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)

# The gin keys of the fields RLConfig held before it was split into sections (2026-11): old -> new. History,
# so written out rather than derived from today's sections (tests/test_config.py checks each still exists).
_SECTION_FIELDS = {
    "RolloutConfig": ("num_generations", "max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                      "apply_chat_template", "prompt_buckets", "max_staleness", "rollout_devices",
                      "behaviour_logps", "weight_sync_every"),
    "UpdateConfig": ("num_iterations", "num_minibatches", "micro_batches", "advantage", "filter_zero_variance",
                     "tis_cap", "max_nonfinite_skips", "compact_groups", "trim_completions", "old_logps_in_update"),
    "EvalConfig": ("eval_every", "eval_size"),
    "CheckpointConfig": ("save_every", "keep_checkpoints", "export_final"),
    "ModelRunConfig": ("dtype", "param_dtype", "lm_head_f32", "remat", "remat_policy", "scan_unroll",
                       "attention_impl", "attention_block", "logprob_chunk"),
}
RENAMED: dict[str, str] = {f"RLConfig.{field}": f"{section}.{field}"
                           for section, fields in _SECTION_FIELDS.items() for field in fields}
# Keys added after runs were recorded without them, with the value that behaves as the code before them
# did: a run directory written then reads as if it held these, so it resumes without a spurious change,
# while a resume that sets another value is still a change. History, like RENAMED (added 2026-12).
ADDED: dict[str, str] = {
    "RolloutConfig.stop_token_ids": "()", "RolloutConfig.stop_strings": "()", "RolloutConfig.engine": "'static'",
    "RolloutConfig.paged_slots": "64", "RolloutConfig.paged_page_size": "16", "RolloutConfig.paged_num_pages": "0",
    "RolloutConfig.paged_steps_per_sync": "8", "RolloutConfig.rollout_tensor": "1",
    "RolloutConfig.paged_prefill_chunk": "512",
    "RolloutConfig.think_budget": "0",
    "RolloutConfig.interrupt_text": "'\\n\\nOkay, time is up. Let me stop thinking and formulate a final answer now.\\n</think>\\n\\n'",
    "RolloutConfig.think_end_text": "'</think>'",
    "UpdateConfig.overlong_filter": "False", "UpdateConfig.overlong_buffer": "0", "UpdateConfig.overlong_penalty": "1.0",
    # the coarse buckets change only runs of 1024 positions or more, and those by f32 rounding (update_plan.Buckets)
    "UpdateConfig.coarse_buckets_from": "1024", "UpdateConfig.coarse_bucket_levels": "(2, 4)",
    "UpdateConfig.precompile": "False",
    # A batch's rewards do not depend on how many workers score it: the default (by cores) behaves as 1 did.
    "TaskConfig.reward_batch_timeout_s": "120.0", "TaskConfig.reward_workers": "0",
    "TaskConfig.on_reward_error": "'zero'",
    # LoRA (2026-12): rank 0 is full fine-tuning, as every run before it.
    "LoraConfig.rank": "0", "LoraConfig.alpha": "32.0",
    "LoraConfig.targets": "('q', 'k', 'v', 'o', 'gate', 'up', 'down')", "LoraConfig.rslora": "False",
    "LoraConfig.rollout_merged": "False", "LoraConfig.export": "'peft'",
}
# ADDED keys whose old behaviour is not today's default, and why the default changed. A run directory recorded
# before such a key reads as the old value, so resuming it with the new default is a config change, refused
# (naming the key) unless the run sets the old value or passes --allow_config_change: what the old run did is
# not silently redefined. Every other ADDED value is the default config's binding (tests/test_config.py).
ADDED_NOT_DEFAULT: dict[str, str] = {
    "TaskConfig.on_reward_error": "a failed reward (timeout, exception, crash) was scored 0, a wrong answer; it "
                                  "is now masked out of the update and of its group's statistics ('mask')",
}


# How long a run goes on and what it writes on the way: a resume may change these without
# --allow_config_change (each change still recorded in config_changes.jsonl). None of them alters an
# iteration that already ran: extending a run, evaluating or saving more or less often, keeping more
# checkpoints, another metric sink or profiled window. (A longer total_steps does stretch the learning-rate
# schedule's remaining part, as it would have from the start.)
RUN_LENGTH_KEYS = frozenset({"RLConfig.total_steps", "EvalConfig.eval_every", "CheckpointConfig.save_every",
                             "CheckpointConfig.keep_checkpoints", "CheckpointConfig.export_final",
                             "RLConfig.wandb_project", "RLConfig.profile_iterations"})


def record_operative_config(run_dir: str, operative: str, *, resuming: bool, allow_change: bool,
                            iteration: int | None, write: bool = True):
  """Write operative_config.gin; on resume, first compare it with the one the run was started with.

  A changed binding is refused (every such key named) unless it is a run-length key (RUN_LENGTH_KEYS) or
  allow_change; then the old file is kept as operative_config.before_<iteration>.gin and
  config_changes.jsonl records what changed when. RLConfig.run_dir is not compared (a run directory may
  be moved).
  """
  path = os.path.join(run_dir, "operative_config.gin")
  if resuming and os.path.exists(path):
    with open(path) as f:
      old_text = f.read()
    old, new = bindings(old_text), bindings(operative)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and k != "RLConfig.run_dir"}
    refused = {k: v for k, v in changed.items() if k not in RUN_LENGTH_KEYS}
    if refused and not allow_change:
      lines = "\n".join(f"  {k}: {a if a is not None else '(absent)'} -> {b if b is not None else '(absent)'}"
                        for k, (a, b) in refused.items())
      raise ValueError(
          f"{run_dir} holds a run started with another config; resuming it with this one would change "
          f"{len(refused)} binding(s):\n{lines}\nUse the original settings, a new run_dir, or pass "
          f"--allow_config_change to continue with the change recorded. (How long the run goes on and how "
          f"often it evaluates or saves may change freely: {', '.join(sorted(RUN_LENGTH_KEYS))}.)")
    if changed and write:
      os.replace(path, os.path.join(run_dir, f"operative_config.before_{iteration}.gin"))
      with open(os.path.join(run_dir, "config_changes.jsonl"), "a") as f:
        f.write(json.dumps({"iteration": iteration, "changed": {k: list(v) for k, v in changed.items()},
                            "run_length_only": not refused}) + "\n")
      log.warning("config changed at iteration %s (%s): %s", iteration,
                  "run length" if not refused else "allowed", ", ".join(changed))
  if write:
    with open(path, "w") as f:
      f.write(operative)


def bindings(text: str) -> dict[str, str]:
  """'Config.field = value' lines of an operative config (comments and blank lines ignored).

  A file written before RLConfig was split into sections reads under the new keys (`RLConfig.temperature`
  as `RolloutConfig.temperature`, RENAMED): a run started then resumes without a spurious config
  change, and analysis finds its settings; a key added since (ADDED) reads as the value that behaves as
  the code before it did. This is only for what a run recorded; a gin file or flag that binds an old key
  is refused (cli.py)."""
  out = {}
  for line in text.splitlines():
    if line.strip() and not line.lstrip().startswith("#") and " = " in line:
      key, _, value = line.partition(" = ")
      key = key.strip()
      out[RENAMED.get(key, key)] = value.strip()
  if out:  # a recorded config from before a key existed (ADDED)
    out.update({k: v for k, v in ADDED.items() if k not in out})
  return out


def read_bindings(run_dir: str) -> dict[str, str]:
  """The bindings of a run directory's operative_config.gin ({} when it has none)."""
  path = os.path.join(run_dir, "operative_config.gin")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return bindings(f.read())
