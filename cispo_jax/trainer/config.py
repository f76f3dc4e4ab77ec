"""RLConfig: the run (where, on which model, how long, how many prompts, the seed), holding one section per
part of the loop, each defined by the stage that reads it:

  RolloutConfig     rollout/config.py   sampling the completions, and where and when that runs (pipelined)
  UpdateConfig      rl/config.py        advantages and the optimizer steps on a rollout
  EvalConfig        evals/config.py     the held-out evaluation during training
  CheckpointConfig  runtime/checkpoint.py   saving the run state and exporting the final model
  ModelRunConfig    model/config.py     how the model runs (overrides of the checkpoint's config)
  LoraConfig        model/lora.py       low-rank adapters on a frozen base instead of full fine-tuning

Each is a frozen dataclass that checks its own fields, registered with gin under its class name
(cispo_jax/cli.py): a gin file binds `RolloutConfig.temperature = 0.7`. RLConfig checks what spans sections.
A field name belongs to exactly one class, so `RLConfig.replace` takes them flat, and the old flat names map
one to one (config/operative.RENAMED; tests/test_config.py checks the two agree).
"""

from __future__ import annotations

import dataclasses

from cispo_jax.config.fields import at_least
from cispo_jax.evals.config import EvalConfig
from cispo_jax.model.config import ModelRunConfig
from cispo_jax.model.lora import LoraConfig
from cispo_jax.rl.config import UpdateConfig
from cispo_jax.rollout.config import RolloutConfig
from cispo_jax.runtime.checkpoint import CheckpointConfig
from cispo_jax.runtime.profiler import check_iterations

# RLConfig's field for each section, in the order the operative config writes them.
SECTIONS: dict[str, type] = {"rollout": RolloutConfig, "update": UpdateConfig, "eval": EvalConfig,
                             "checkpoint": CheckpointConfig, "model_run": ModelRunConfig, "lora": LoraConfig}


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The RL run: where, on which model, how long, how many prompts per iteration, the seed; each part of the
  loop in its section (`rl.rollout`, `rl.update`, `rl.eval`, `rl.checkpoint`, `rl.model_run`, `rl.lora`)."""
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
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

  def __post_init__(self):
    for name, cls in SECTIONS.items():
      if not isinstance(getattr(self, name), cls):
        raise TypeError(f"RLConfig.{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
    at_least(self, ("total_steps", "prompts_per_step"), 1)
    u = self.update
    if self.prompts_per_step % (u.num_minibatches * u.micro_batches):
      raise ValueError(
          f"RLConfig.prompts_per_step={self.prompts_per_step} must be divisible by UpdateConfig.num_minibatches"
          f" * UpdateConfig.micro_batches={u.num_minibatches} * {u.micro_batches} (prompt groups are never split)")
    if u.overlong_buffer > self.rollout.max_new_tokens:
      raise ValueError(f"UpdateConfig.overlong_buffer={u.overlong_buffer} is longer than "
                       f"RolloutConfig.max_new_tokens={self.rollout.max_new_tokens}")
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
