"""gin configuration and the command line.

The config dataclasses stay plain (tests build them directly); here each is registered with gin
under its class name, so a gin file or `--gin_param` binds `LossConfig.epsilon_high = 5.0`. gin
rejects an unknown configurable or parameter while parsing, naming the file, line and key; every
bound value is then checked against its field's annotation (`check_field`: an int field takes no
8.0 and no True, a bool field no 'False', a float field takes 2 as 2.0) and the error names the
class, field, value, expected type and the gin file:line or flag that set it; last, the dataclasses
validate values when built. All of it happens before anything is compiled.

RLConfig is built from its sections' bindings (rl_config.py: `RolloutConfig.temperature`, not
`RLConfig.temperature`); a binding of a field under its old RLConfig name is refused, naming where
it was written and its new key.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import inspect
import logging
import numbers
import os
import types
import typing
from typing import Any, Sequence

import gin
import numpy as np
from gin import config_parser

from cispo_jax import losses, sharding
from cispo_jax.bootstrap import BootstrapConfig
from cispo_jax.optim import OptimConfig
from cispo_jax.task import TaskConfig
from cispo_jax.rl_config import RENAMED, SECTIONS, RLConfig
from cispo_jax.trainer import run_loss_config

CONFIG_CLASSES = {c.__name__: c for c in (RLConfig, *SECTIONS.values(), losses.LossConfig, OptimConfig,
                                          sharding.MeshConfig, TaskConfig, BootstrapConfig)}

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


def _register(cls):
  def make(**kwargs):
    return cls(**kwargs)
  make.__signature__ = inspect.signature(cls)
  make.__name__ = make.__qualname__ = cls.__name__
  make.__doc__ = cls.__doc__
  # RLConfig's sections are built from their own bindings (parse), never bound as RLConfig.rollout = ...
  denylist = list(SECTIONS) if cls is RLConfig else None
  return gin.external_configurable(make, name=cls.__name__, denylist=denylist)


_GIN_MAKERS: dict[str, Any] = {}


def _makers():
  if not _GIN_MAKERS:
    _GIN_MAKERS.update({name: _register(cls) for name, cls in CONFIG_CLASSES.items()})
  return _GIN_MAKERS


def _drop_gin_path_probe(record: logging.LogRecord) -> bool:
  return not (record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
              and record.getMessage().startswith(("Path not found", "system_path_file_exists")))


def _quiet_gin_path_probes() -> None:
  """gin looks for `include 'default.gin'` relative to the working directory before its search paths
  (configs/), logging each probe ("INFO root: system_path_file_exists") and each miss as "ERROR root: Path
  not found". Those are probes, not errors: an include found nowhere still fails, naming the file. Drop
  just those records (gin logs them on the root logger)."""
  root = logging.getLogger()
  if _drop_gin_path_probe not in root.filters:
    root.addFilter(_drop_gin_path_probe)


def _gin_literal(value: str, target: str | None = None) -> str:
  """A shorthand's value as a gin literal: numbers, booleans and None as-is, anything else quoted;
  for a target field that takes a string (`--run_dir 2024`), always a string (None if allowed)."""
  if target is not None:
    cls_name, field = target.split(".")
    hint = typing.get_type_hints(CONFIG_CLASSES[cls_name])[field]
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if str in members:
      return "None" if value == "None" and type(None) in members else repr(value)
  if value in ("True", "False", "None"):
    return value
  try:
    float(value)
    return value
  except ValueError:
    return repr(value)


class ConfigTypeError(TypeError, ValueError):
  """A bound value does not match its field's annotation (a ValueError too, like every bad config)."""


class _Mismatch(Exception):
  """Raised by _coerce; its text is a hint (may be empty), or for a container which element is wrong."""


def _type_name(hint) -> str:
  if hint is type(None):
    return "None"
  if isinstance(hint, type) and not typing.get_args(hint):
    return hint.__name__
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    return " | ".join(_type_name(a) for a in args)
  if origin is typing.Literal:
    return " | ".join(repr(a) for a in args)
  if origin is not None and args:
    inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
    return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
  return str(hint).replace("typing.", "")


def _describe(value) -> str:
  return f"{value!r} ({type(value).__name__})"


def _coerce(value, hint):
  """`value` as the annotation `hint` wants it (int -> float, list -> tuple), or raise _Mismatch.

  Strict where Python is loose: a bool is not an int or a float, 8.0 is not an int, a string
  is never a number or a bool.
  """
  if hint is Any or hint is object:
    return value
  if hint is None or hint is type(None):
    if value is None:
      return None
    raise _Mismatch("")
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    # A member the value already is wins (int | float keeps 2 an int); then any that converts.
    for member in args:
      if isinstance(member, type) and not typing.get_args(member) and type(value) is member:
        return value
    hints = []
    for member in args:
      try:
        return _coerce(value, member)
      except _Mismatch as e:
        hints.append(str(e))
    raise _Mismatch("; ".join(h for h in dict.fromkeys(hints) if h))
  if origin is typing.Literal:
    for allowed in args:
      if type(value) is type(allowed) and value == allowed:
        return value
    raise _Mismatch("")
  if hint is bool:
    if isinstance(value, (bool, np.bool_)):
      return bool(value)
    raise _Mismatch("only True or False (unquoted) is a bool")
  if hint is int:
    if isinstance(value, (bool, np.bool_)):
      raise _Mismatch("a bool is not an int")
    if isinstance(value, numbers.Integral):
      return int(value)
    if isinstance(value, float) and value.is_integer():
      raise _Mismatch(f"a float is not an int, write {int(value)}")
    return _raise_text_hint(value)
  if hint is float:
    if isinstance(value, (bool, np.bool_)):
      raise _Mismatch("a bool is not a number")
    if isinstance(value, numbers.Real):
      return float(value)
    return _raise_text_hint(value)
  if hint is str:
    if isinstance(value, str):
      return value
    raise _Mismatch("quote a string value")
  container = origin if origin is not None else hint
  if container in (tuple, list, collections.abc.Sequence):
    if not isinstance(value, (tuple, list)):
      raise _Mismatch("")
    items = list(value)
    if args and container is tuple and not (len(args) == 2 and args[1] is Ellipsis):
      args = () if args == ((),) else args
      if len(items) != len(args):
        raise _Mismatch(f"{len(items)} items, not {len(args)}")
      items = [_coerce_item(x, a, i) for i, (x, a) in enumerate(zip(items, args))]
    elif args:
      items = [_coerce_item(x, args[0], i) for i, x in enumerate(items)]
    return items if container is list else tuple(items)
  if container in (dict, collections.abc.Mapping):
    if not isinstance(value, collections.abc.Mapping):
      raise _Mismatch("")
    if not args:
      return dict(value)
    return {_coerce_item(k, args[0], f"key {k!r}"): _coerce_item(v, args[1], repr(k)) for k, v in value.items()}
  if isinstance(container, type):
    if isinstance(value, container):
      return value
    raise _Mismatch("")
  return value  # an annotation this checker does not model (a TypeVar, a Protocol...): unchecked


def _raise_text_hint(value):
  if isinstance(value, str):
    raise _Mismatch("a quoted string is not a number")
  raise _Mismatch("")


def _coerce_item(value, hint, where):
  try:
    return _coerce(value, hint)
  except _Mismatch as e:
    raise _Mismatch(f"item [{where}] should be {_type_name(hint)}, got {_describe(value)}"
                    + (f" ({e})" if str(e) else "")) from None


def check_field(cls, field: str, value, origin: str | None = None):
  """`value` converted to `cls.field`'s annotation, or ConfigTypeError naming class, field,
  value, expected type and (if given) where the value came from."""
  hint = typing.get_type_hints(cls)[field]
  try:
    return _coerce(value, hint)
  except _Mismatch as e:
    detail = f" ({e})" if str(e) else ""
    where = f"; set by {origin}" if origin else ""
    raise ConfigTypeError(f"{cls.__name__}.{field} expects {_type_name(hint)}, got {_describe(value)}"
                          f"{detail}{where}") from None


class _NoEvalDelegate(config_parser.ParserDelegate):
  """Lets gin's parser walk bindings for their locations without resolving references."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return None

  def macro(self, macro_name):
    return None


def _find_gin_file(name: str) -> str | None:
  if os.path.isabs(name):
    return name if os.path.exists(name) else None
  for prefix in getattr(gin.config, "_LOCATION_PREFIXES", ["", CONFIG_DIR]):
    path = os.path.join(prefix, name)
    if os.path.exists(path):
      return path
  return None


def _written_bindings(gin_files: Sequence[str], gin_params: Sequence[str]):
  """(BindingStatement, where) for each binding of the files (includes followed), then of --gin_param, in
  order; where is 'path:line (text)' or "--gin_param '...'". Raises what gin's parser raises."""

  def walk(text_or_file, label, depth):
    for statement in config_parser.ConfigParser(text_or_file, _NoEvalDelegate()):
      if isinstance(statement, config_parser.BindingStatement):
        yield statement, label(statement.location)
      elif isinstance(statement, config_parser.IncludeStatement) and depth < 32:
        path = _find_gin_file(statement.filename)
        if path is not None:
          yield from walk_file(path, depth + 1)

  def walk_file(path, depth=0):
    with open(path) as f:
      yield from walk(f, lambda loc: f"{path}:{loc.line_num} ({loc.line_content.strip()})", depth)

  for path in gin_files:
    path = _find_gin_file(path)
    if path is not None:
      yield from walk_file(path)
  for binding in gin_params:
    yield from walk(binding, lambda loc, b=binding: f"--gin_param {b!r}", 0)


def _selects(statement, cls_name: str) -> bool:
  return statement.selector == cls_name or statement.selector.endswith("." + cls_name)


def _binding_origin(cls_name: str, field: str, gin_files: Sequence[str], gin_params: Sequence[str],
                    shorthands: dict[str, str]) -> str | None:
  """Where the binding of cls_name.field that gin used was written: the last one of the files
  (includes followed), then --gin_param, then the shorthand flags. None if not found."""
  for flag in reversed(list(shorthands)):
    if SHORTHANDS.get(flag) == f"{cls_name}.{field}":
      return f"flag --{flag} {shorthands[flag]}"
  found: list[str] = []
  try:
    for statement, where in _written_bindings(gin_files, gin_params):
      if not statement.scope and statement.arg_name == field and _selects(statement, cls_name):
        found.append(where)
  except Exception:  # the origin is a courtesy: gin has parsed all of this already
    pass
  return found[-1] if found else None


def _check_renamed(gin_files: Sequence[str], gin_params: Sequence[str]) -> None:
  """Refuse a binding of a field under the name it had before RLConfig was split into sections
  (`RLConfig.temperature`: now `RolloutConfig.temperature`), or of a whole section (`RLConfig.rollout`),
  naming each file:line or flag and the key to use. gin alone would call the first an unknown
  parameter, without saying where the field went; nothing is ever silently ignored."""
  problems = []
  try:
    for statement, where in _written_bindings(gin_files, gin_params):
      if not _selects(statement, "RLConfig"):
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
    raise ValueError("RLConfig's fields are in sections now (cispo_jax/rl_config.py); rename:\n  "
                     + "\n  ".join(problems))


CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
DEFAULT_GIN = os.path.join(CONFIG_DIR, "default.gin")  # the offline CPU experiment


def parse(gin_files: Sequence[str] | None = None, gin_params: Sequence[str] = (),
          shorthands: dict[str, str] | None = None) -> dict[str, Any]:
  """Parse gin files + bindings (+ shorthand flags) and build every config object.

  gin_files=None means the packaged default experiment (configs/default.gin); gin files can
  `include 'default.gin'` to start from it. Later bindings win: files, then --gin_param, then
  the shorthand flags. Returns {"RLConfig": RLConfig(...), "RolloutConfig": ..., "LossConfig": ...,
  "operative": text}; RLConfig holds the section configs (built["RLConfig"].rollout is built["RolloutConfig"]).
  """
  makers = _makers()
  gin.clear_config()
  gin.add_config_file_search_path(CONFIG_DIR)
  _quiet_gin_path_probes()
  if gin_files is None:
    gin_files = [DEFAULT_GIN]
  bindings = list(gin_params)
  for flag, value in (shorthands or {}).items():
    if flag not in SHORTHANDS:
      raise ValueError(f"unknown flag --{flag}; shorthands: {sorted(SHORTHANDS)}")
    bindings.append(f"{SHORTHANDS[flag]} = {_gin_literal(value, SHORTHANDS[flag])}")
  _check_renamed(gin_files, gin_params)
  gin.parse_config_files_and_bindings(list(gin_files), bindings)
  built = {}
  for name in sorted(makers, key=lambda n: n == "RLConfig"):  # RLConfig last: it holds the sections
    cls = CONFIG_CLASSES[name]
    kwargs = {}
    for field, value in gin.get_bindings(name).items():  # macros and references resolved
      try:
        kwargs[field] = check_field(cls, field, value)
      except ConfigTypeError:  # again, now saying where the value was written
        origin = _binding_origin(name, field, gin_files, gin_params, shorthands or {})
        check_field(cls, field, value, origin or "a gin binding")
        raise
    if cls is RLConfig:
      kwargs.update({field: built[section.__name__] for field, section in SECTIONS.items()})
    built[name] = makers[name](**kwargs)  # explicit arguments win over gin's: the checked values are used
  built = {name: built[name] for name in CONFIG_CLASSES}
  built["LossConfig"] = run_loss_config(built["LossConfig"], built["RLConfig"])  # validated before compiling
  _check_groups(built["RLConfig"])
  built["operative"] = _operative(built)
  return built


def _check_groups(rl: RLConfig) -> None:
  """Every advantage estimator (advantages.ADVANTAGE_ESTIMATORS) is relative to the prompt's
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
