"""Compiled programs per phase: how many the loop has built, and building them ahead of time.

The update, the row gather and the old / reference log-prob forwards are compiled once per update bucket
(rl/update_plan.py). Each is called through a `Programs` registry, which keys a call on its static
arguments and the shapes and dtypes of its array arguments (their shardings are fixed per argument: the
jit's in_shardings, or the batch layout the caller puts them in), counts the distinct keys, and logs each
new one with its shape. `compile` lowers and compiles a key from jax.ShapeDtypeStructs, with no data
(UpdateConfig.precompile); the jit's own call then finds that executable in JAX's cache instead of
compiling it again (tests/test_compiles.py checks that no compile event names the function).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import jax

log = logging.getLogger(__name__)


def layout(tree) -> tuple:
  """A hashable key of a pytree of arrays (or ShapeDtypeStructs): its structure, each leaf's shape and dtype."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


class Programs:
  """A jitted function's programs in one phase ("update", "gather", "logps"), one per distinct call key.

  `describe(args, static)` says what a new program's shapes are, for its log line. Thread-safe: the key set
  is read by the metrics of the trainer thread while a rollout thread may add to it."""

  def __init__(self, phase: str, jitted: Callable, describe: Callable[[tuple, dict], str], **static):
    self.phase, self.jitted, self.describe, self.static = phase, jitted, describe, static
    self._keys: set = set()
    self._lock = threading.Lock()

  def _key(self, args: tuple, static: dict):
    return layout(args), tuple(sorted(static.items()))

  def _note(self, args: tuple, static: dict, how: str, seconds: float | None = None) -> bool:
    """Record the call key; log it when it is new. Returns whether it was new."""
    key = self._key(args, static)
    with self._lock:
      if key in self._keys:
        return False
      self._keys.add(key)
      n = len(self._keys)
    took = "" if seconds is None else f" in {seconds:.2f} s"
    log.info("%s: %s program #%d (%s)%s", self.phase, how, n, self.describe(args, static), took)
    return True

  def __call__(self, *args, **static):
    self._note(args, static, "new")  # compiled by the call below (or found in JAX's caches)
    return self.jitted(*args, **self.static, **static)

  def compile(self, *args, **static) -> bool:
    """Lower and compile the program for these arguments (arrays or jax.ShapeDtypeStructs with their
    shardings) without running it. Returns False when the key was there already."""
    if self._key(args, static) in self._keys:
      return False
    t0 = time.perf_counter()
    self.jitted.lower(*args, **self.static, **static).compile()
    return self._note(args, static, "compiled", time.perf_counter() - t0)

  @property
  def count(self) -> int:
    with self._lock:
      return len(self._keys)


def program_counts(registries: dict[str, Any]) -> dict[str, float]:
  """compile/programs_<phase> of each registry (a Programs, or a callable giving a count)."""
  return {f"compile/programs_{name}": float(r.count if isinstance(r, Programs) else r())
          for name, r in registries.items()}
