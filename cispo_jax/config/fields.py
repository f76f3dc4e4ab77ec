"""Type checks of bound config values against their dataclass fields.

Strict where Python is loose: an int field takes no 8.0 and no True, a bool field no 'False', a float
field takes 2 as 2.0, a tuple field takes a list. The error names the class, field, value, expected
type and, when known, the gin file:line or flag that set it.
"""

from __future__ import annotations

import collections.abc
import numbers
import types
import typing
from typing import Any

import numpy as np


def at_least(obj, names, low: int):
  """Each field of `names` of the config `obj` is >= low, or ValueError naming class and field."""
  for name in names:
    if getattr(obj, name) < low:
      raise ValueError(f"{type(obj).__name__}.{name}={getattr(obj, name)}; must be >= {low}")


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
    return _coerce_union(value, args)
  if origin is typing.Literal:
    for allowed in args:
      if type(value) is type(allowed) and value == allowed:
        return value
    raise _Mismatch("")
  if hint in (bool, int, float, str):
    return _coerce_scalar(value, hint)
  return _coerce_container(value, origin if origin is not None else hint, args)


def _coerce_union(value, members):
  if value is None and type(None) in members:
    return None
  # A member the value already is wins (int | float keeps 2 an int); then any that converts.
  for member in members:
    if isinstance(member, type) and not typing.get_args(member) and type(value) is member:
      return value
  hints = []
  for member in members:
    try:
      return _coerce(value, member)
    except _Mismatch as e:
      hints.append(str(e))
  raise _Mismatch("; ".join(h for h in dict.fromkeys(hints) if h))


def _coerce_scalar(value, hint):
  if hint is bool:
    if isinstance(value, (bool, np.bool_)):
      return bool(value)
    raise _Mismatch("only True or False (unquoted) is a bool")
  if hint is str:
    if isinstance(value, str):
      return value
    raise _Mismatch("quote a string value")
  if isinstance(value, (bool, np.bool_)):
    raise _Mismatch("a bool is not an int" if hint is int else "a bool is not a number")
  if hint is int:
    if isinstance(value, numbers.Integral):
      return int(value)
    if isinstance(value, float) and value.is_integer():
      raise _Mismatch(f"a float is not an int, write {int(value)}")
  elif isinstance(value, numbers.Real):  # a float field
    return float(value)
  return _raise_text_hint(value)


def _coerce_container(value, container, args):
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
