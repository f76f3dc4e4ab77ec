"""The RL loop's configuration: RLConfig (the run) and one section per part of the loop.

  RolloutConfig     sampling the completions, and where and when that runs (pipeline.py)
  UpdateConfig      advantages and the optimizer steps on a rollout
  EvalConfig        the held-out evaluation during training
  CheckpointConfig  saving the run state and exporting the final model
  ModelRunConfig    how the model runs (overrides of the checkpoint's config: model/hf_io.RUN_OVERRIDES)

Each is a frozen dataclass that checks its own fields, registered with gin under its class name
(config.py): a gin file binds `RolloutConfig.temperature = 0.7`. RLConfig holds one of each
(`rl.rollout.temperature`) and checks what spans sections. A field name belongs to exactly one
class, so `RLConfig.replace` takes them flat, and the old flat names map one to one (RENAMED).

No jax here (the advantage and profiler checks import it when a config is built): operative_config.py
reads RENAMED, and it and analysis.py run in the sweep's process, which needs no jax.
"""

from __future__ import annotations

import dataclasses

BEHAVIOUR_LOGPS = ("recompute", "sampler")


def _at_least(obj, names, low: int):
  for name in names:
    if getattr(obj, name) < low:
      raise ValueError(f"{type(obj).__name__}.{name}={getattr(obj, name)}; must be >= {low}")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Sampling the rollout: the group of completions per prompt, how they are sampled, and (pipelined) by
  which policy version on which devices. Names follow TRL where they exist (num_generations)."""
  # Completions per prompt (the group). Here, not in UpdateConfig: it is what the sampler draws; the
  # advantages and the update take the group size of the rollout they get.
  num_generations: int = 8
  max_new_tokens: int = 8
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  apply_chat_template: bool = False
  prompt_buckets: tuple = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # padded prompt lengths (one program each)
  # Pipelined off-policy RL (pipeline.py). The rollout of iteration i is sampled by the policy of iteration
  # max(0, i - max_staleness) while the updates in between run; 0 = the synchronous loop (sample, then update).
  max_staleness: int = 0
  # > 0: the first rollout_devices devices sample (a rollout sub-mesh, FSDP over them) and the rest train
  # (the run's MeshConfig applies to those); weights are copied over after each update (or each
  # weight_sync_every-th). 0 = colocated.
  rollout_devices: int = 0
  # The old log-probs of a stale rollout (the behaviour policy's): "recompute" = a training forward at the
  # version that sampled it, on the rollout devices; "sampler" = the sampler's own log-probs.
  behaviour_logps: str = "recompute"
  # Pipelined: the rollout engine gets the trainer's weights after every k-th update only (k = 1: after each).
  # Rollout i is then sampled by version max(0, k * floor((i - max_staleness) / k)): staleness s .. s + k - 1,
  # and 1/k of the weight transfers (a cross-mesh or cross-host copy of the whole model each).
  weight_sync_every: int = 1

  def __post_init__(self):
    _at_least(self, ("num_generations", "max_new_tokens", "weight_sync_every"), 1)
    if not self.temperature > 0:
      raise ValueError(f"RolloutConfig.temperature={self.temperature}; must be > 0")
    _at_least(self, ("max_staleness", "rollout_devices"), 0)
    if self.behaviour_logps not in BEHAVIOUR_LOGPS:
      raise ValueError(f"RolloutConfig.behaviour_logps={self.behaviour_logps!r}; allowed: {list(BEHAVIOUR_LOGPS)}")
    if self.weight_sync_every > 1 and not self.pipelined:
      raise ValueError(f"RolloutConfig.weight_sync_every={self.weight_sync_every} needs a pipelined run "
                       "(RolloutConfig.max_staleness > 0 or RolloutConfig.rollout_devices > 0): the synchronous "
                       "loop samples with the trainer's own weights")

  @property
  def pipelined(self) -> bool:
    """Rollouts come from a producer thread (pipeline.py) rather than in line."""
    return self.max_staleness > 0 or self.rollout_devices > 0

  @property
  def stale(self) -> bool:
    """Whether a rollout can be sampled by an older policy version than the one that trains on it."""
    return self.max_staleness > 0 or self.weight_sync_every > 1


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """From a scored rollout to new params: advantages, then num_iterations passes of num_minibatches optimizer
  steps. Names follow TRL where they exist (num_iterations)."""
  num_iterations: int = 2  # passes over each rollout; > 1 makes the policy ratio depart from 1
  num_minibatches: int = 2  # optimizer steps per pass
  micro_batches: int = 1  # gradient accumulation inside each optimizer step
  advantage: str = "grpo"  # see advantages.ADVANTAGE_ESTIMATORS
  filter_zero_variance: bool = True  # groups whose rewards are all equal carry no signal
  tis_cap: float = 0.0  # > 0: truncated IS correction min(pi_old / pi_sampler, cap) on the advantages
  max_nonfinite_skips: int = 10  # optimizer steps in a row skipped for a NaN/inf loss or gradient before the run stops
  # Update work that carries no gradient (each switch leaves the loss and gradient unchanged up to f32 rounding;
  # tests/test_update_work.py):
  # compact_groups: groups with mask 0 everywhere (filter_zero_variance's all-equal groups) leave the update batch
  #   (and the old/reference log-prob forwards). Each minibatch keeps exactly the weighted groups the masked full
  #   batch would give it (the update's shuffle is drawn on the host from the same key) and is padded with
  #   zero-weight groups to a bucket: quantum * {1, 2, 3, 4, 6, 8, 12, ...}, the quantum being the smallest group
  #   count that splits into micro_batches and over the data x fsdp devices; the full size when that is reached.
  #   Every aggregation's sums and denominators (Dr.GRPO's constant included), the KL and the entropy terms see
  #   masked tokens only, so dropping them changes nothing. A few update programs get compiled (one per bucket).
  #   With micro_batches > 1 the train/ token-mean metrics (ratio_mean, kl_ref, entropy, pg_loss, ...), which are
  #   averaged per micro-batch, can shift because other groups share a micro-batch; train/loss and the gradient
  #   do not. logp_gap/sampler_vs_trainer is measured on the tokens that enter the loss (either way).
  compact_groups: bool = True
  # trim_completions: the update's completion axis (and the token / kv arrays) cut to 8 * {1, 2, 3, 4, 6, ...}
  #   positions >= the longest completion that enters the loss (capped at max_new_tokens). The positions cut are
  #   padding after every kept completion stopped; attention is causal, so the others do not change.
  trim_completions: bool = True
  # old_logps_in_update: with num_minibatches == 1 and tis_cap == 0 the first optimizer step's forward runs the
  #   params the rollout was sampled with on every row: it gives the old log-probs (stop_gradient, ratio exactly 1)
  #   and the separate old-log-prob forward is skipped (the reference forward for a KL stays). The old log-probs
  #   then come from the training forward itself rather than from a second program: equal to f32 rounding in
  #   float32 (at bf16, within the compute dtype's rounding, and the first step's ratio is exactly 1). TIS needs
  #   them on the host before the update, and a later minibatch needs the pre-update params: then the separate
  #   forward runs as before. logp_gap/sampler_vs_trainer is computed after the update then. Not with a stale
  #   rollout (RolloutConfig.max_staleness > 0): its old log-probs are the behaviour policy's.
  old_logps_in_update: bool = True

  def __post_init__(self):
    from cispo_jax.advantages import ADVANTAGE_ESTIMATORS  # here: this module stays free of jax
    _at_least(self, ("num_iterations", "num_minibatches", "micro_batches", "max_nonfinite_skips"), 1)
    if self.advantage not in ADVANTAGE_ESTIMATORS:
      raise ValueError(f"UpdateConfig.advantage={self.advantage!r}; allowed: {sorted(ADVANTAGE_ESTIMATORS)}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The held-out evaluation during training (evaluation.py; TaskConfig says on what)."""
  eval_every: int = 10  # iterations between evals (and at the last one)
  eval_size: int = 128  # held-out problems

  def __post_init__(self):
    _at_least(self, ("eval_every", "eval_size"), 1)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """The run state on disk (checkpoint.py) and the exported model."""
  save_every: int = 10  # iterations between checkpoints (and at the end)
  keep_checkpoints: int = 2
  export_final: bool = True  # a Hugging Face directory <run_dir>/final_model at the end

  def __post_init__(self):
    _at_least(self, ("save_every", "keep_checkpoints"), 1)


@dataclasses.dataclass(frozen=True)
class ModelRunConfig:
  """How to run the model: overrides of the checkpoint's config (exactly model/hf_io.RUN_OVERRIDES, which
  ModelConfig checks when the model is loaded)."""
  dtype: str = "float32"
  param_dtype: str = "float32"
  lm_head_f32: bool = True
  remat: bool = False  # rematerialise each layer in the backward pass
  remat_policy: str = "nothing_saveable"  # nothing_saveable | save_dots | save_dots_no_batch | offload_dots
  scan_unroll: int = 0  # layers per iteration of the layer scan; 0 = auto (ModelConfig.scan_unroll)
  attention_impl: str = "auto"  # auto | dense | blockwise | cudnn | splash (model/attention.py)
  attention_block: int = 512
  logprob_chunk: int = 1024  # completion positions per LM-head chunk of the training log-probs


# RLConfig's field for each section, in the order the operative config writes them.
SECTIONS: dict[str, type] = {"rollout": RolloutConfig, "update": UpdateConfig, "eval": EvalConfig,
                             "checkpoint": CheckpointConfig, "model_run": ModelRunConfig}


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The RL run: where, on which model, how long, how many prompts per iteration, the seed; each part of the
  loop in its section (`rl.rollout`, `rl.update`, `rl.eval`, `rl.checkpoint`, `rl.model_run`)."""
  run_dir: str = "runs/default"
  model_dir: str = ""  # local HF directory; "" = bootstrap the small offline model (bootstrap.py)
  total_steps: int = 40  # RL iterations (rollout + updates)
  prompts_per_step: int = 16  # prompts per iteration: the rollout samples them, the update splits them
  seed: int = 0
  profile_iterations: tuple[int, ...] = ()  # (i, j): jax.profiler trace of iterations i..j into <run_dir>/profile
  wandb_project: str = ""  # also log to Weights & Biases (optional package; WANDB_MODE=offline works offline)
  rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
  update: UpdateConfig = dataclasses.field(default_factory=UpdateConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  model_run: ModelRunConfig = dataclasses.field(default_factory=ModelRunConfig)

  def __post_init__(self):
    from cispo_jax.profiler import check_iterations  # here: this module stays free of jax
    for name, cls in SECTIONS.items():
      if not isinstance(getattr(self, name), cls):
        raise TypeError(f"RLConfig.{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
    _at_least(self, ("total_steps", "prompts_per_step"), 1)
    u = self.update
    if self.prompts_per_step % (u.num_minibatches * u.micro_batches):
      raise ValueError(
          f"RLConfig.prompts_per_step={self.prompts_per_step} must be divisible by UpdateConfig.num_minibatches"
          f" * UpdateConfig.micro_batches={u.num_minibatches} * {u.micro_batches} (prompt groups are never split)")
    check_iterations(self.profile_iterations)

  def replace(self, **fields) -> RLConfig:
    """dataclasses.replace that also takes the sections' fields by name: `rl.replace(total_steps=2,
    temperature=0.7)` sets RLConfig.total_steps and RolloutConfig.temperature. A whole section may be
    given too (`rollout=RolloutConfig(...)`); its fields named beside it apply on top."""
    own, changes = {}, {}
    for name, value in fields.items():
      if name in _OWN_FIELDS or name in SECTIONS:
        own[name] = value
      elif name in FIELD_SECTION:
        changes.setdefault(FIELD_SECTION[name], {})[name] = value
      else:
        raise TypeError(f"RLConfig.replace: {name!r} is a field of neither RLConfig nor "
                        f"{', '.join(c.__name__ for c in SECTIONS.values())}")
    for section, values in changes.items():
      own[section] = dataclasses.replace(own.get(section, getattr(self, section)), **values)
    return dataclasses.replace(self, **own)


_OWN_FIELDS = tuple(f.name for f in dataclasses.fields(RLConfig) if f.name not in SECTIONS)


def _field_sections() -> dict[str, str]:
  """Each section field's section (RLConfig's attribute). A name in two classes would make RLConfig.replace
  and RENAMED ambiguous: refused at import."""
  out: dict[str, str] = {}
  for section, cls in SECTIONS.items():
    for f in dataclasses.fields(cls):
      if f.name in out or f.name in _OWN_FIELDS or f.name in SECTIONS:
        raise TypeError(f"{cls.__name__}.{f.name}: the name is taken by another RLConfig section or field")
      out[f.name] = section
  return out


FIELD_SECTION = _field_sections()
# The gin keys of the fields that RLConfig held before it was split into sections: old -> new.
RENAMED: dict[str, str] = {f"RLConfig.{name}": f"{SECTIONS[section].__name__}.{name}"
                           for name, section in FIELD_SECTION.items()}
