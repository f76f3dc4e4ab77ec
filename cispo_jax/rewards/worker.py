"""The reward evaluation loop, and the worker process that runs it in isolation.

The worker is a fresh interpreter (not a fork: the trainer holds JAX threads) started
with `python -c` so it imports only this package and the reward modules, not the
trainer's __main__. It talks over two pipes with pickled tuples:

  parent -> worker: ("job", refs, completions, examples, start)
  worker -> parent: ("resolved",) once the reward functions are imported, then one
                    (flat_index, value, error) per (item, reward) pair, in order.

One message per pair lets the parent tell exactly which evaluation hung when a
result stops coming: that pair is the timeout, the rest of the job is resubmitted
to a fresh worker from the next pair.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Callable, Sequence

from cispo_jax.data.example import Example


def run_items(fns: Sequence[Callable], completions: Sequence[str], examples: Sequence[Example],
              start: int, emit: Callable[[int, float, str | None], None]) -> None:
  """Evaluates pair flat = i * len(fns) + j as fns[j](completions[i], examples[i]), for
  every flat >= start, calling emit(flat, value, error); an exception is error text."""
  for flat in range(start, len(completions) * len(fns)):
    i, j = divmod(flat, len(fns))
    try:
      value = float(fns[j](completions[i], examples[i]))
      error = None if math.isfinite(value) else f"returned {value}"
    except Exception as e:  # a reward bug must cost one item, not the run
      value, error = 0.0, f"{type(e).__name__}: {e}"
    emit(flat, value if error is None else 0.0, error)


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


def _exit_with_parent(parent_pid: int) -> None:
  # A reward stuck in a loop would never read the closed pipe; this thread still runs.
  while True:
    time.sleep(0.5)
    if os.getppid() != parent_pid:
      os._exit(0)


def main(read_fd: int, write_fd: int, parent_pid: int) -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
  threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
  inbox = Connection(read_fd, writable=False)
  outbox = Connection(write_fd, readable=False)
  cache: dict[str, Callable] = {}
  outbox.send(("ready",))
  while True:
    try:
      _, refs, completions, examples, start = inbox.recv()
    except (EOFError, OSError):
      return
    fns = [_resolve(ref, cache) for ref in refs]
    outbox.send(("resolved",))
    run_items(fns, completions, examples, start, lambda *result: outbox.send(result))


if __name__ == "__main__":
  main(*map(int, sys.argv[1:4]))
