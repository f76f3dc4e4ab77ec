"""gin plumbing: registering a config dataclass, parsing files and bindings, and finding where a binding was
written (file:line or flag) for an error message.

Knows no configurable: cispo_jax/cli.py lists them and builds them. gin rejects an unknown configurable or
parameter while parsing, naming the file, line and key; the values it bound are then checked against the
fields' annotations (fields.check_field) with the origin found here.
"""

from __future__ import annotations

import inspect
import logging
import os
import types
import typing
from typing import Any, Iterator, Sequence

import gin
from gin import config_parser

from cispo_jax.config.fields import ConfigTypeError, check_field

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))  # the packaged gin files: `include 'default.gin'`
DEFAULT_GIN = os.path.join(CONFIG_DIR, "default.gin")  # the offline CPU experiment


def register(cls, denylist: Sequence[str] | None = None):
  """A gin configurable named like the dataclass `cls` that builds it from its bound fields."""
  def make(**kwargs):
    return cls(**kwargs)
  make.__signature__ = inspect.signature(cls)
  make.__name__ = make.__qualname__ = cls.__name__
  make.__doc__ = cls.__doc__
  return gin.external_configurable(make, name=cls.__name__, denylist=list(denylist) if denylist else None)


def _drop_gin_path_probe(record: logging.LogRecord) -> bool:
  return not (record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
              and record.getMessage().startswith(("Path not found", "system_path_file_exists")))


def _quiet_gin_path_probes() -> None:
  """gin looks for `include 'default.gin'` relative to the working directory before its search paths
  (CONFIG_DIR), logging each probe ("INFO root: system_path_file_exists") and each miss as "ERROR root: Path
  not found". Those are probes, not errors: an include found nowhere still fails, naming the file. Drop
  just those records (gin logs them on the root logger)."""
  root = logging.getLogger()
  if _drop_gin_path_probe not in root.filters:
    root.addFilter(_drop_gin_path_probe)


def parse_files(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """gin's parse of the files (includes found beside them or in CONFIG_DIR), then the bindings."""
  gin.clear_config()
  gin.add_config_file_search_path(CONFIG_DIR)
  _quiet_gin_path_probes()
  gin.parse_config_files_and_bindings(list(gin_files), list(bindings))


def gin_literal(value: str, hint=None) -> str:
  """A flag's value as a gin literal: numbers, booleans and None as-is, anything else quoted; for a
  field whose annotation `hint` takes a string (`--run_dir 2024`), always a string (None if allowed)."""
  if hint is not None:
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


def written_bindings(gin_files: Sequence[str], gin_params: Sequence[str]) -> Iterator[tuple[Any, str]]:
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


def selects(statement, cls_name: str) -> bool:
  """Whether a binding statement binds the configurable `cls_name` (scoped or module-qualified)."""
  return statement.selector == cls_name or statement.selector.endswith("." + cls_name)


def binding_origin(cls_name: str, field: str, gin_files: Sequence[str], gin_params: Sequence[str]) -> str | None:
  """Where the binding of cls_name.field that gin used was written: the last one of the files (includes
  followed), then --gin_param. None if not found."""
  found: list[str] = []
  try:
    for statement, where in written_bindings(gin_files, gin_params):
      if not statement.scope and statement.arg_name == field and selects(statement, cls_name):
        found.append(where)
  except Exception:  # the origin is a courtesy: gin has parsed all of this already
    pass
  return found[-1] if found else None


def checked_bindings(cls, name: str, origin) -> dict[str, Any]:
  """gin's bindings of the configurable `name` (macros and references resolved), each converted to its
  field's annotation; a mismatch raises ConfigTypeError naming origin(field), where it was written."""
  kwargs = {}
  for field, value in gin.get_bindings(name).items():
    try:
      kwargs[field] = check_field(cls, field, value)
    except ConfigTypeError:  # again, now saying where the value was written
      check_field(cls, field, value, origin(field) or "a gin binding")
      raise
  return kwargs
