"""The reward evaluation loop, and the worker process that runs it in isolation.

The worker is a fresh interpreter (not a fork: the trainer holds JAX threads) started
with `python -c` so it imports only this package and the reward modules, not the
trainer's __main__. It talks over two pipes with pickled tuples:

  parent -> worker: ("job", refs, completions, examples, start)
  worker -> parent: ("resolved",) once the reward functions are imported, then one
                    (flat_index, value, error, seconds) per (item, reward) pair, in order
                    (seconds: that evaluation's wall time here, without the messages).

One message per pair lets the parent tell exactly which evaluation hung when a
result stops coming: that pair is the timeout, the rest of the job is resubmitted
to a fresh worker from the next pair.

Containment: the parent starts the worker as the leader of its own session and process
group, so whatever a reward forks (a `sleep`, a compiler, a pool) is in that group and
dies with it when the parent kills the group (timeout, restart, close, exit); if the
parent itself dies, the worker kills its group. main() caps the worker's address space
(RLIMIT_AS): a reward that allocates past it gets MemoryError, reported as an error whose
text starts with OUT_OF_MEMORY, after which the parent replaces the worker (a leak
must not survive into the next item). JAX is never imported here (it would reserve far
more address space than the cap); see tests/test_reward_isolation.py.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable, Sequence

from cispo_jax.data.example import Example

OUT_OF_MEMORY = "out of memory"  # how an error caused by MemoryError starts


def as_number(raw: Any) -> float:
  """A reward's return value as a float; TypeError for anything that is not a real number
  (a str such as '1.0', bytes, None, a complex, a list...). bool counts (True = 1.0).
  Finiteness and range are the parent's to check (scoring.reward_value_error)."""
  if not isinstance(raw, (str, bytes, bytearray, complex)) and raw is not None:
    try:
      return float(raw)
    except (TypeError, ValueError, OverflowError):
      pass
  text = repr(raw)
  text = text if len(text) <= 80 else text[:77] + "..."
  raise TypeError(f"returned {text} ({type(raw).__name__}), not a number")


def run_items(fns: Sequence[Callable], completions: Sequence[str], examples: Sequence[Example],
              start: int, emit: Callable[[int, float, str | None, float], None]) -> None:
  """Evaluates pair flat = i * len(fns) + j as fns[j](completions[i], examples[i]), for
  every flat >= start, calling emit(flat, value, error, seconds); an exception is error text."""
  for flat in range(start, len(completions) * len(fns)):
    i, j = divmod(flat, len(fns))
    t0 = time.perf_counter()
    try:
      value, error = as_number(fns[j](completions[i], examples[i])), None
    except MemoryError as e:
      value, error = 0.0, f"{OUT_OF_MEMORY}: MemoryError" + (f": {e}" if str(e) else "")
    except Exception as e:  # a reward bug must cost one item, not the run
      value, error = 0.0, f"{type(e).__name__}: {e}"
    emit(flat, value, error, time.perf_counter() - t0)


def _resolve(ref: str, cache: dict[str, Callable]) -> Callable:
  if ref not in cache:
    from cispo_jax.rewards.registry import get_reward

    try:
      fn = get_reward(ref)
      warmup = getattr(fn, "warmup", None)
      if warmup is not None:
        warmup()
    except Exception as e:  # unresolvable here: every item of this reward is an error
      message = f"{type(e).__name__}: {e}"

      def fn(completion, example, _message=message):
        raise RuntimeError(f"reward worker could not load it: {_message}")
    cache[ref] = fn
  return cache[ref]


def _exit_with_group() -> None:
  """Exits, taking down the processes the rewards started: when the worker leads its own
  process group (as the parent starts it), the whole group; else just this process."""
  if os.getpgrp() == os.getpid():
    os.killpg(os.getpid(), signal.SIGKILL)
  os._exit(0)


def _exit_with_parent(parent_pid: int) -> None:
  # A reward stuck in a loop would never read the closed pipe; this thread still runs.
  while True:
    time.sleep(0.5)
    if os.getppid() != parent_pid:  # the parent died without closing us (SIGKILL, SIGTERM...)
      _exit_with_group()


def limit_memory(limit_mb: int) -> None:
  """Caps this process's address space at limit_mb MiB (soft and hard: a reward cannot lift it)."""
  limit = limit_mb * 2**20
  _, hard = resource.getrlimit(resource.RLIMIT_AS)
  if hard != resource.RLIM_INFINITY:
    limit = min(limit, hard)
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(read_fd: int, write_fd: int, parent_pid: int, memory_limit_mb: int = 0) -> None:
  """memory_limit_mb <= 0: no cap."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
  if memory_limit_mb > 0:
    limit_memory(memory_limit_mb)
  threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
  inbox = Connection(read_fd, writable=False)
  outbox = Connection(write_fd, readable=False)
  cache: dict[str, Callable] = {}
  outbox.send(("ready",))
  while True:
    try:
      _, refs, completions, examples, start = inbox.recv()
    except (EOFError, OSError):  # the parent closed the pipe or died
      _exit_with_group()
    fns = [_resolve(ref, cache) for ref in refs]
    outbox.send(("resolved",))
    run_items(fns, completions, examples, start, lambda *result: outbox.send(result))


if __name__ == "__main__":
  main(*map(int, sys.argv[1:5]))
