"""Reward functions by name: fn(completion: str, example: Example) -> float.

Two ways to name one: a registered name ("exact_numeric", or anything decorated with
@register_reward), or an import path "package.module:function" for a user's own
function, resolved with importlib. Both resolve to an importable "module:qualname"
reference, which is what the isolated reward worker receives.
"""

from __future__ import annotations

import importlib
from typing import Callable

from cispo_jax.data.example import Example

RewardFn = Callable[[str, Example], float]

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
  """Decorator: makes `fn` available as `name` in reward configs."""
  if not name or ":" in name:
    raise ValueError(f"reward name must be non-empty and contain no ':', got {name!r}")

  def decorator(fn: RewardFn) -> RewardFn:
    old = _REGISTRY.get(name)
    # Re-importing the same module (e.g. in the reward worker) re-registers the same function.
    if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
      raise ValueError(f"reward {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    _REGISTRY[name] = fn
    return fn

  return decorator


def registered_rewards() -> list[str]:
  return sorted(_REGISTRY)


def _import_path(spec: str) -> RewardFn:
  module_name, _, attr_path = spec.partition(":")
  if not module_name or not attr_path:
    raise ValueError(f"reward {spec!r}: an import path must look like 'package.module:function'")
  try:
    obj = importlib.import_module(module_name)
  except Exception as e:  # ImportError, or whatever the user's module raises at import
    raise ValueError(f"reward {spec!r}: cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
  for attr in attr_path.split("."):
    if not hasattr(obj, attr):
      raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr_path!r}")
    obj = getattr(obj, attr)
  if not callable(obj):
    raise ValueError(f"reward {spec!r}: {attr_path!r} is not callable")
  return obj


def get_reward(spec: str) -> RewardFn:
  """The function for a registered name or a 'package.module:function' path."""
  if ":" in spec:
    return _import_path(spec)
  if spec not in _REGISTRY:
    raise ValueError(f"unknown reward {spec!r}; registered: {registered_rewards()}, "
                     "or give an import path 'package.module:function'")
  return _REGISTRY[spec]


def importable_ref(spec: str) -> str:
  """'module:qualname' of the reward, for a process that must import it afresh.

  Functions defined in __main__ or inside another function cannot be imported by
  another process; that is an error here rather than a silent zero in the worker.
  """
  fn = get_reward(spec)
  module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
  if not module or not qualname or module == "__main__" or "<locals>" in qualname:
    raise ValueError(
        f"reward {spec!r} ({module}.{qualname}) cannot be imported by the reward worker process; "
        "define it at the top level of an importable module, or use isolation='thread'")
  return f"{module}:{qualname}"
