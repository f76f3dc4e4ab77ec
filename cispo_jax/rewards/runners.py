"""Where reward functions run: a reusable worker interpreter (killed and restarted on a hang, capped in
memory, its own process group) or a daemon thread (inline for debugging). scoring.py drives them; the
isolation modes are described there."""

from __future__ import annotations

import atexit
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from cispo_jax.rewards.worker import run_items

MEMORY_LIMIT_MB = 4096
"""Default RewardConfig.memory_limit_mb: the process worker's address-space cap (RLIMIT_AS),
4 GiB. The worker needs ~0.2 GiB (Python, numpy, sympy); BLAS/OpenMP thread pools, which reserve
address space per thread, are held to one thread there unless the environment says otherwise."""
TIMEOUT, DIED = object(), object()  # what a runner's get() returns instead of results


# Library thread pools reserve address space per thread; under the worker's RLIMIT_AS a
# 100-core host would otherwise fail in `import numpy`. Rewards run one at a time anyway.
_WORKER_ENV_DEFAULTS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                        "MALLOC_ARENA_MAX": "2"}


class ProcessRunner:
  """A reusable worker interpreter; killed and restarted when an evaluation hangs.

  The worker leads its own session (start_new_session), so killing its process group
  also kills whatever the reward functions started.
  """

  recycle_after_oom = True

  def __init__(self, memory_limit_mb: int | None = MEMORY_LIMIT_MB):
    self.proc: subprocess.Popen | None = None
    self.memory_limit_mb = memory_limit_mb
    self.restarts = 0
    atexit.register(self.close)

  def start(self) -> None:
    if self.proc is not None:
      return
    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    env = {**_WORKER_ENV_DEFAULTS, **os.environ,
           "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
    code = "import sys; from cispo_jax.rewards.worker import main; main(*map(int, sys.argv[1:5]))"
    # subprocess forks and execs at once (no Python between them), so JAX threads are safe.
    self.proc = subprocess.Popen(
        [sys.executable, "-c", code, str(to_worker_r), str(from_worker_w), str(os.getpid()),
         str(self.memory_limit_mb or 0)],
        pass_fds=(to_worker_r, from_worker_w), stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    os.close(to_worker_r)
    os.close(from_worker_w)
    self.outbox = Connection(to_worker_w, readable=False)
    self.inbox = Connection(from_worker_r, writable=False)
    self.ready = False

  def _recv(self, timeout: float):
    if not self.inbox.poll(max(timeout, 0.0)):
      return TIMEOUT
    try:
      return self.inbox.recv()
    except (EOFError, OSError):
      return DIED

  def submit(self, refs, completions, examples, start: int, boot_s: float) -> Any:
    """Sends a job; returns None once the worker has loaded the rewards, else DIED/TIMEOUT."""
    self.start()
    boot_deadline = time.monotonic() + boot_s
    if not self.ready:
      reply = self._recv(boot_s)
      if reply is not TIMEOUT and reply is not DIED:
        self.ready = True
      else:
        return reply
    try:
      self.outbox.send(("job", refs, completions, examples, start))
    except (BrokenPipeError, OSError):
      return DIED
    reply = self._recv(boot_deadline - time.monotonic())
    return None if reply == ("resolved",) else reply

  def get(self, timeout: float):
    return self._recv(timeout)

  def restart(self) -> None:
    self.close()
    self.restarts += 1
    self.start()  # starts booting now, so the next submit waits less

  def _kill_group(self) -> None:
    """SIGKILL the worker and everything in its process group. Sent before the worker is
    reaped, so its pid (the group's id) cannot have been reused by then."""
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
      pass

  def interrupt(self) -> None:
    """Kills the worker's group (not reaped: close() or restart() does that), so a get() waiting on it
    returns DIED at once."""
    if self.proc is not None and self.proc.returncode is None:
      self._kill_group()

  def exit_note(self) -> str:
    self._kill_group()  # what the dead worker's rewards started goes with it
    try:
      code = self.proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
      code = None
    limit = f"; its memory limit is {self.memory_limit_mb} MiB" if self.memory_limit_mb else ""
    return f"reward worker died (exit code {code}{limit})"

  def close(self) -> None:
    if self.proc is None:
      return
    for conn in (self.outbox, self.inbox):
      conn.close()
    if self.proc.returncode is None:  # not reaped yet: the group id is still ours
      self._kill_group()  # a stuck reward would never see the closed pipe; its children neither
    self.proc.kill()
    self.proc.wait()
    self.proc = None


class ThreadRunner:
  """Evaluates in a daemon thread; a hung one is abandoned with its private queue."""

  recycle_after_oom = False  # the memory is the trainer's own: nothing to replace
  memory_limit_mb = None

  def __init__(self, inline: bool = False):
    self.inline = inline
    self.restarts = 0
    self.results: queue.Queue = queue.Queue()

  def submit(self, fns, completions, examples, start: int, boot_s: float) -> None:
    self.results = queue.Queue()
    if self.inline:
      run_items(fns, completions, examples, start, lambda *r: self.results.put(r))
    else:
      threading.Thread(target=run_items, daemon=True, name="reward",
                       args=(fns, completions, examples, start, lambda *r, q=self.results: q.put(r))).start()

  def get(self, timeout: float):
    try:
      return self.results.get(timeout=max(timeout, 0.0))
    except queue.Empty:
      return TIMEOUT

  def restart(self) -> None:
    self.restarts += 1
    self.results = queue.Queue()

  def interrupt(self) -> None:
    pass  # a thread cannot be stopped; its queue is replaced by restart()

  def exit_note(self) -> str:
    return "reward thread died"

  def close(self) -> None:
    pass
