"""The command line of `cispo_jax.train` and `cispo_jax.evaluate`: every configurable, the shorthand flags,
and `parse`, which builds and validates every config before anything is compiled.

Each config dataclass is defined by the stage that reads it and registered here with gin under its class
name, so a gin file or `--gin_param` binds `LossConfig.epsilon_high = 5.0`. gin rejects an unknown
configurable or parameter while parsing (file, line, key); every bound value is then checked against its
field's annotation (config/fields.py), the error naming class, field, value, expected type and the gin
file:line or flag that set it; last, the dataclasses validate values when built.

RLConfig is built from its sections' bindings (`RolloutConfig.temperature`, not `RLConfig.temperature`); a
binding of a field under its old RLConfig name is refused, naming where it was written and its new key.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Sequence

from cispo_jax.bootstrap import BootstrapConfig
from cispo_jax.config import gin_io
from cispo_jax.config.gin_io import DEFAULT_GIN
from cispo_jax.config.operative import RENAMED
from cispo_jax.rl.losses import LossConfig
from cispo_jax.rl.optim import OptimConfig
from cispo_jax.sharding import MeshConfig
from cispo_jax.task import TaskConfig
from cispo_jax.trainer import SECTIONS, RLConfig, run_loss_config

CONFIG_CLASSES = {c.__name__: c for c in (RLConfig, *SECTIONS.values(), LossConfig, OptimConfig, MeshConfig,
                                          TaskConfig, BootstrapConfig)}

# The seed's flags and other common knobs: --flag value is shorthand for a gin binding.
SHORTHANDS = {
    "loss_type": "LossConfig.loss_type", "epsilon_high": "LossConfig.epsilon_high",
    "epsilon_low": "LossConfig.epsilon_low", "aggregation": "LossConfig.aggregation",
    "beta": "LossConfig.kl_coef", "kl_coef": "LossConfig.kl_coef",
    "num_generations": "RolloutConfig.num_generations", "num_iterations": "UpdateConfig.num_iterations",
    "total_steps": "RLConfig.total_steps", "prompts_per_step": "RLConfig.prompts_per_step",
    "temperature": "RolloutConfig.temperature", "max_new_tokens": "RolloutConfig.max_new_tokens",
    "model_dir": "RLConfig.model_dir", "run_dir": "RLConfig.run_dir", "seed": "RLConfig.seed",
    "learning_rate": "OptimConfig.learning_rate", "task": "TaskConfig.task",
}

_GIN_MAKERS: dict[str, Any] = {}


def _makers():
  if not _GIN_MAKERS:  # RLConfig's sections are built from their own bindings, never bound as RLConfig.rollout
    _GIN_MAKERS.update({name: gin_io.register(cls, denylist=list(SECTIONS) if cls is RLConfig else None)
                        for name, cls in CONFIG_CLASSES.items()})
  return _GIN_MAKERS


def _flag_binding(flag: str, value: str) -> str:
  target = SHORTHANDS[flag]
  cls_name, field = target.split(".")
  return f"{target} = {gin_io.gin_literal(value, typing.get_type_hints(CONFIG_CLASSES[cls_name])[field])}"


def _origin(cls_name: str, field: str, gin_files, gin_params, shorthands: dict[str, str]) -> str | None:
  """Where the binding gin used was written: the last shorthand flag, else the files, then --gin_param."""
  for flag in reversed(list(shorthands)):
    if SHORTHANDS.get(flag) == f"{cls_name}.{field}":
      return f"flag --{flag} {shorthands[flag]}"
  return gin_io.binding_origin(cls_name, field, gin_files, gin_params)


def _check_renamed(gin_files: Sequence[str], gin_params: Sequence[str]) -> None:
  """Refuse a binding of a field under the name it had before RLConfig was split into sections
  (`RLConfig.temperature`: now `RolloutConfig.temperature`), or of a whole section (`RLConfig.rollout`),
  naming each file:line or flag and the key to use. gin alone would call the first an unknown
  parameter, without saying where the field went; nothing is ever silently ignored."""
  problems = []
  try:
    for statement, where in gin_io.written_bindings(gin_files, gin_params):
      if not gin_io.selects(statement, "RLConfig"):
        continue
      key = f"RLConfig.{statement.arg_name}"
      if key in RENAMED:
        problems.append(f"{where}: {key} is now {RENAMED[key]}")
      elif statement.arg_name in SECTIONS:
        section = SECTIONS[statement.arg_name].__name__
        problems.append(f"{where}: {key} is built from the {section} bindings; bind {section}.<field> instead")
  except Exception:  # a file gin's parser refuses: gin reports it (file, line) when it parses next
    pass
  if problems:
    raise ValueError("RLConfig's fields are in sections now (cispo_jax/trainer/config.py); rename:\n  "
                     + "\n  ".join(problems))


def parse(gin_files: Sequence[str] | None = None, gin_params: Sequence[str] = (),
          shorthands: dict[str, str] | None = None) -> dict[str, Any]:
  """Parse gin files + bindings (+ shorthand flags) and build every config object.

  gin_files=None means the packaged default experiment (config/default.gin); gin files can
  `include 'default.gin'` to start from it. Later bindings win: files, then --gin_param, then
  the shorthand flags. Returns {"RLConfig": RLConfig(...), "RolloutConfig": ..., "LossConfig": ...,
  "operative": text}; RLConfig holds the section configs (built["RLConfig"].rollout is built["RolloutConfig"]).
  """
  makers, shorthands = _makers(), dict(shorthands or {})
  gin_files = [DEFAULT_GIN] if gin_files is None else list(gin_files)
  for flag in shorthands:
    if flag not in SHORTHANDS:
      raise ValueError(f"unknown flag --{flag}; shorthands: {sorted(SHORTHANDS)}")
  _check_renamed(gin_files, gin_params)
  gin_io.parse_files(gin_files, list(gin_params) + [_flag_binding(f, v) for f, v in shorthands.items()])
  built = {}
  for name in sorted(makers, key=lambda n: n == "RLConfig"):  # RLConfig last: it holds the sections
    cls = CONFIG_CLASSES[name]
    kwargs = gin_io.checked_bindings(cls, name, lambda field, name=name: _origin(
        name, field, gin_files, gin_params, shorthands))
    if cls is RLConfig:
      kwargs.update({field: built[section.__name__] for field, section in SECTIONS.items()})
    built[name] = makers[name](**kwargs)  # explicit arguments win over gin's: the checked values are used
  built = {name: built[name] for name in CONFIG_CLASSES}
  built["LossConfig"] = run_loss_config(built["LossConfig"], built["RLConfig"])  # validated before compiling
  _check_groups(built["RLConfig"])
  built["operative"] = _operative(built)
  return built


def _check_groups(rl: RLConfig) -> None:
  """Every advantage estimator (rl/advantages.ADVANTAGE_ESTIMATORS) is relative to the prompt's
  group of num_generations completions: a group of one has advantage 0 (rloo: undefined) and
  zero reward variance, so every iteration would be skipped, without a warning."""
  n, up = rl.rollout.num_generations, rl.update
  if n < 2:
    raise ValueError(
        f"RolloutConfig.num_generations={n} with UpdateConfig.advantage={up.advantage!r}: the "
        f"advantage is relative to the group of num_generations completions of a prompt, and a group of "
        f"one carries no signal (its advantage is 0"
        f"{', and UpdateConfig.filter_zero_variance drops it' if up.filter_zero_variance else ''}), so every "
        f"iteration would be skipped. Use RolloutConfig.num_generations >= 2.")


def _operative(built: dict[str, Any]) -> str:
  """Every field of every config, as gin bindings (what the run actually used)."""
  lines = []
  for name, cls in CONFIG_CLASSES.items():
    for f in dataclasses.fields(built[name]):
      if cls is RLConfig and f.name in SECTIONS:  # each section's fields are written under its own name
        continue
      lines.append(f"{name}.{f.name} = {getattr(built[name], f.name)!r}")
  return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="cispo_jax.train", description="JAX/Flax RL for language models (CISPO and "
                              "the GRPO family): gin files, bindings and shorthand flags.", allow_abbrev=False)
  p.add_argument("--gin_file", action="append", default=None,
                 help="gin file (repeatable); default: the packaged config/default.gin")
  p.add_argument("--gin_param", action="append", default=[], help="gin binding, e.g. RLConfig.seed=1")
  for flag, target in SHORTHANDS.items():
    p.add_argument(f"--{flag}", default=None, help=f"shorthand for {target}")
  return p


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = build_parser().parse_args(argv)
  short = {k: v for k, v in vars(args).items() if k in SHORTHANDS and v is not None}
  return parse(args.gin_file, args.gin_param, short)


def split_distributed_args(argv):
  """The multi-process and resume flags both commands take, split from the rest of argv."""
  p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (CPU/GPU multi-process)")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  p.add_argument("--allow_config_change", action="store_true",
                 help="resume a run directory with a different config (the change is recorded)")
  return p.parse_known_args(argv)

