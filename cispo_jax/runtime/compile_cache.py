"""Compilation: a persistent on-disk cache of compiled programs, and compile time as a metric.

With the cache on, the second run of a config loads its programs (sampler, log-prob forward,
update) from disk instead of compiling them again. JAX keys each entry on the program, the
compile options, the backend and the JAX version, so a stale entry is never used.

`CompileClock` adds up the seconds JAX spends tracing, lowering and compiling (or fetching from
the cache) between two reads, from JAX's own monitoring events; the trainer logs it per
iteration as `time/compile_s`.
"""

from __future__ import annotations

import logging
import os
import threading

import jax

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/cispo_jax/xla"  # override with $CISPO_JAX_COMPILATION_CACHE ("" = off)

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Turn on JAX's persistent compilation cache at `path` (default $CISPO_JAX_COMPILATION_CACHE or
  ~/.cache/cispo_jax/xla; an empty string turns it off). Every program is cached, however quick to
  compile. Returns the directory used, or None."""
  if path is None:
    path = os.environ.get("CISPO_JAX_COMPILATION_CACHE", DEFAULT_CACHE_DIR)
  if not path:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:  # a read-only home: run without the cache rather than fail
    log.warning("compilation cache off: cannot create %s (%s)", path, e)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


class CompileClock:
  """Seconds spent compiling since the last `take()` (all threads of this process)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._seconds = 0.0
    self._total = 0.0
    self.cache_hits = 0  # programs loaded from the persistent cache instead of compiled
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    jax.monitoring.register_event_listener(self._on_count)

  def _on_event(self, event: str, duration: float, **_):
    if event in _COMPILE_EVENTS:
      with self._lock:
        self._seconds += duration
        self._total += duration

  def _on_count(self, event: str, **_):
    if event == "/jax/compilation_cache/cache_hits":
      with self._lock:
        self.cache_hits += 1

  def take(self) -> float:
    with self._lock:
      s, self._seconds = self._seconds, 0.0
    return s

  @property
  def total(self) -> float:
    return self._total

  def close(self):
    for unregister, fn in ((jax.monitoring.unregister_event_duration_listener, self._on_event),
                           (jax.monitoring.unregister_event_listener, self._on_count)):
      try:
        unregister(fn)
      except (AttributeError, ValueError, AssertionError):
        pass
