"""gin configuration and the command line.

The config dataclasses stay plain (tests build them directly); here each is registered with gin
under its class name, so a gin file or `--gin_param` binds `LossConfig.epsilon_high = 5.0`. gin
rejects an unknown configurable or parameter while parsing, naming the file, line and key, and
the dataclasses validate values when built: both happen before anything is compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
from typing import Any, Sequence

import gin

from cispo_jax import losses, sharding
from cispo_jax.bootstrap import BootstrapConfig
from cispo_jax.optim import OptimConfig
from cispo_jax.task import TaskConfig
from cispo_jax.trainer import RLConfig, run_loss_config

CONFIG_CLASSES = {c.__name__: c for c in (RLConfig, losses.LossConfig, OptimConfig, sharding.MeshConfig,
                                          TaskConfig, BootstrapConfig)}

# The seed's flags and other common knobs: --flag value is shorthand for a gin binding.
SHORTHANDS = {
    "loss_type": "LossConfig.loss_type", "epsilon_high": "LossConfig.epsilon_high",
    "epsilon_low": "LossConfig.epsilon_low", "aggregation": "LossConfig.aggregation",
    "beta": "LossConfig.kl_coef", "kl_coef": "LossConfig.kl_coef",
    "num_generations": "RLConfig.num_generations", "num_iterations": "RLConfig.num_iterations",
    "total_steps": "RLConfig.total_steps", "prompts_per_step": "RLConfig.prompts_per_step",
    "temperature": "RLConfig.temperature", "max_new_tokens": "RLConfig.max_new_tokens",
    "model_dir": "RLConfig.model_dir", "run_dir": "RLConfig.run_dir", "seed": "RLConfig.seed",
    "learning_rate": "OptimConfig.learning_rate", "task": "TaskConfig.task",
}


def _register(cls):
  def make(**kwargs):
    return cls(**kwargs)
  make.__signature__ = inspect.signature(cls)
  make.__name__ = make.__qualname__ = cls.__name__
  make.__doc__ = cls.__doc__
  return gin.external_configurable(make, name=cls.__name__)


_GIN_MAKERS: dict[str, Any] = {}


def _makers():
  if not _GIN_MAKERS:
    _GIN_MAKERS.update({name: _register(cls) for name, cls in CONFIG_CLASSES.items()})
  return _GIN_MAKERS


def _gin_literal(value: str) -> str:
  """A shorthand's value as a gin literal: numbers, booleans and None as-is, anything else quoted."""
  if value in ("True", "False", "None"):
    return value
  try:
    float(value)
    return value
  except ValueError:
    return repr(value)


CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
DEFAULT_GIN = os.path.join(CONFIG_DIR, "default.gin")  # the offline CPU experiment


def parse(gin_files: Sequence[str] | None = None, gin_params: Sequence[str] = (),
          shorthands: dict[str, str] | None = None) -> dict[str, Any]:
  """Parse gin files + bindings (+ shorthand flags) and build every config object.

  gin_files=None means the packaged default experiment (configs/default.gin); gin files can
  `include 'default.gin'` to start from it. Later bindings win: files, then --gin_param, then
  the shorthand flags. Returns {"RLConfig": RLConfig(...), "LossConfig": ..., "operative": text}.
  """
  makers = _makers()
  gin.clear_config()
  gin.add_config_file_search_path(CONFIG_DIR)
  if gin_files is None:
    gin_files = [DEFAULT_GIN]
  bindings = list(gin_params)
  for flag, value in (shorthands or {}).items():
    if flag not in SHORTHANDS:
      raise ValueError(f"unknown flag --{flag}; shorthands: {sorted(SHORTHANDS)}")
    bindings.append(f"{SHORTHANDS[flag]} = {_gin_literal(value)}")
  gin.parse_config_files_and_bindings(list(gin_files), bindings)
  built = {name: make() for name, make in makers.items()}
  built["LossConfig"] = run_loss_config(built["LossConfig"], built["RLConfig"])  # validated before compiling
  built["operative"] = _operative(built)
  return built


def _operative(built: dict[str, Any]) -> str:
  """Every field of every config, as gin bindings (what the run actually used)."""
  lines = []
  for name in CONFIG_CLASSES:
    for f in dataclasses.fields(built[name]):
      lines.append(f"{name}.{f.name} = {getattr(built[name], f.name)!r}")
  return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="cispo_jax.train", description=__doc__.split("\n")[0], allow_abbrev=False)
  p.add_argument("--gin_file", action="append", default=None,
                 help="gin file (repeatable); default: the packaged configs/default.gin")
  p.add_argument("--gin_param", action="append", default=[], help="gin binding, e.g. RLConfig.seed=1")
  for flag, target in SHORTHANDS.items():
    p.add_argument(f"--{flag}", default=None, help=f"shorthand for {target}")
  return p


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = build_parser().parse_args(argv)
  short = {k: v for k, v in vars(args).items() if k in SHORTHANDS and v is not None}
  return parse(args.gin_file, args.gin_param, short)
