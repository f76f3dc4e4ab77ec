"""Score completions with weighted reward functions, isolated from their failures.

isolation (RewardConfig.isolation):
  "process" (default) - rewards run in a reused worker interpreter. An exception costs
      one item; a hang costs timeout_s, after which the worker is killed and restarted
      (startup ~0.3 s) and the batch continues. Handles anything, including C code
      stuck in a loop or a crash. Cost: pickling the batch, ~10 us per (item, reward).
  "thread" - rewards run in a daemon thread. No startup or IPC; exceptions and hangs
      give 0 just the same, but a hung thread cannot be killed: it is abandoned and
      keeps taking CPU and the GIL for the rest of the run. For trusted, fast rewards,
      or rewards defined where another process cannot import them (__main__).
  "none" - called inline: exceptions are caught, hangs are not. For debugging.

Either way a failure gives reward 0 for that (item, reward), is counted in the stats and
logged once per call and reward with an example message.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import math
import os
import queue
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Sequence

import numpy as np

from cispo_jax.data.example import Example
from cispo_jax.rewards.registry import get_reward, importable_ref
from cispo_jax.rewards.worker import run_items

ISOLATIONS = ("process", "thread", "none")
STARTUP_TIMEOUT_S = 120.0  # interpreter start plus importing the reward modules (sympy...)
_MIN_BOOT_S = 10.0  # a restart late in a batch still gets this long to boot
_TIMEOUT, _DIED = object(), object()
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """rewards: (name or 'package.module:function', weight) pairs; the reward is the weighted sum.

  timeout_s bounds each single (item, reward) evaluation; batch_timeout_s bounds one
  score() call (what is left when it runs out counts as timed out); None = unbounded.
  """

  rewards: tuple[tuple[str, float], ...] = (("exact_numeric", 1.0),)
  timeout_s: float = 5.0
  batch_timeout_s: float | None = 120.0
  isolation: str = "process"

  def __post_init__(self):
    object.__setattr__(self, "rewards", tuple((str(n), float(w)) for n, w in self.rewards))
    if not self.rewards:
      raise ValueError("RewardConfig.rewards must name at least one (reward, weight)")
    names = [name for name, _ in self.rewards]
    if len(set(names)) != len(names):
      raise ValueError(f"RewardConfig.rewards names a reward twice: {names}")
    for name, weight in self.rewards:
      get_reward(name)  # unknown names fail here, before any rollout
      if not math.isfinite(weight):
        raise ValueError(f"RewardConfig.rewards: weight of {name!r} must be finite, got {weight}")
    if self.isolation not in ISOLATIONS:
      raise ValueError(f"RewardConfig.isolation must be one of {ISOLATIONS}, got {self.isolation!r}")
    if self.isolation == "process":
      for name in names:
        importable_ref(name)
    if not self.timeout_s > 0:
      raise ValueError(f"RewardConfig.timeout_s must be > 0, got {self.timeout_s}")
    if self.batch_timeout_s is not None and not self.batch_timeout_s > 0:
      raise ValueError(f"RewardConfig.batch_timeout_s must be > 0 or None, got {self.batch_timeout_s}")


class _ProcessRunner:
  """A reusable worker interpreter; killed and restarted when an evaluation hangs."""

  def __init__(self):
    self.proc: subprocess.Popen | None = None
    self.restarts = 0
    atexit.register(self.close)

  def start(self) -> None:
    if self.proc is not None:
      return
    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    code = "import sys; from cispo_jax.rewards.worker import main; main(*map(int, sys.argv[1:4]))"
    # subprocess forks and execs at once (no Python between them), so JAX threads are safe.
    self.proc = subprocess.Popen(
        [sys.executable, "-c", code, str(to_worker_r), str(from_worker_w), str(os.getpid())],
        pass_fds=(to_worker_r, from_worker_w), stdin=subprocess.DEVNULL, env=env)
    os.close(to_worker_r)
    os.close(from_worker_w)
    self.outbox = Connection(to_worker_w, readable=False)
    self.inbox = Connection(from_worker_r, writable=False)
    self.ready = False

  def _recv(self, timeout: float):
    if not self.inbox.poll(max(timeout, 0.0)):
      return _TIMEOUT
    try:
      return self.inbox.recv()
    except (EOFError, OSError):
      return _DIED

  def submit(self, refs, completions, examples, start: int, boot_s: float) -> Any:
    """Sends a job; returns None once the worker has loaded the rewards, else _DIED/_TIMEOUT."""
    self.start()
    boot_deadline = time.monotonic() + boot_s
    if not self.ready:
      reply = self._recv(boot_s)
      if reply is not _TIMEOUT and reply is not _DIED:
        self.ready = True
      else:
        return reply
    try:
      self.outbox.send(("job", refs, completions, examples, start))
    except (BrokenPipeError, OSError):
      return _DIED
    reply = self._recv(boot_deadline - time.monotonic())
    return None if reply == ("resolved",) else reply

  def get(self, timeout: float):
    return self._recv(timeout)

  def restart(self) -> None:
    self.close()
    self.restarts += 1
    self.start()  # starts booting now, so the next submit waits less

  def exit_note(self) -> str:
    try:
      code = self.proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
      code = None
    return f"reward worker died (exit code {code})"

  def close(self) -> None:
    if self.proc is None:
      return
    for conn in (self.outbox, self.inbox):
      conn.close()
    self.proc.kill()  # a stuck reward would never see the closed pipe
    self.proc.wait()
    self.proc = None


class _ThreadRunner:
  """Evaluates in a daemon thread; a hung one is abandoned with its private queue."""

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
      return _TIMEOUT

  def restart(self) -> None:
    self.restarts += 1
    self.results = queue.Queue()

  def exit_note(self) -> str:
    return "reward thread died"

  def close(self) -> None:
    pass


def _evaluate(runner, jobs, names, completions, examples, timeout_s, batch_timeout_s):
  """values_NxR plus per-pair failures {flat: (kind, message)}; drives the runner to the end."""
  n_items, n_rewards = len(completions), len(names)
  total = n_items * n_rewards
  values = np.zeros((n_items, n_rewards), np.float32)
  failures: dict[int, tuple[str, str]] = {}
  deadline = None if batch_timeout_s is None else time.monotonic() + batch_timeout_s

  def fail_rest(start: int, kind: str, message: str) -> None:
    for rest in range(start, total):
      failures[rest] = (kind, message)

  flat = 0
  while flat < total:
    # Booting and importing rewards is not an evaluation: it gets its own, longer limit.
    boot_s = STARTUP_TIMEOUT_S if deadline is None else min(
        STARTUP_TIMEOUT_S, max(deadline - time.monotonic(), _MIN_BOOT_S))
    outcome = runner.submit(jobs, completions, examples, flat, boot_s)
    if outcome is not None:  # cannot even load the rewards: retrying per item would not help
      kind = "timeout" if outcome is _TIMEOUT else "error"
      fail_rest(flat, kind, f"reward worker did not start and load the rewards ({kind})")
      runner.restart()
      break
    while flat < total:
      left = timeout_s if deadline is None else min(timeout_s, deadline - time.monotonic())
      result = runner.get(left)
      if result is _TIMEOUT or result is _DIED:
        outcome = result
        break
      index, value, error = result
      values.flat[index] = value
      if error is not None:
        failures[index] = ("error", error)
      flat = index + 1
    if outcome is None:
      break
    # `flat` is the pair whose result never came: it hung or killed its process.
    if outcome is _DIED:
      failures[flat] = ("error", runner.exit_note())
    else:
      failures[flat] = ("timeout", f"no result within {timeout_s:g}s")
    if deadline is not None and time.monotonic() >= deadline:
      fail_rest(flat + 1, "timeout", f"score() ran past batch_timeout_s={batch_timeout_s:g}s")
      flat = total
    flat += 1
    runner.restart()
  return values, failures


def _report(names, values, weights, failures, n_items, restarts) -> dict[str, Any]:
  stats: dict[str, Any] = {"errors": 0, "timeouts": 0, "worker_restarts": restarts}
  by_reward = collections.defaultdict(list)
  for flat, (kind, message) in sorted(failures.items()):
    by_reward[flat % len(names), kind].append(message)
  for j, name in enumerate(names):
    stats[f"{name}/mean"] = float(values[:, j].mean()) if n_items else 0.0
    for kind in ("error", "timeout"):
      messages = by_reward.get((j, kind), [])
      stats[f"{name}/{kind}s"] = len(messages)
      stats[f"{kind}s"] += len(messages)
      if messages:
        _log.warning("reward %r: %d %s(s) in %d items (reward 0 for those), e.g. %s",
                        name, len(messages), kind, n_items, messages[0])
  stats["mean"] = float((values @ weights).mean()) if n_items else 0.0
  return stats


class RewardScorer:
  """Scores batches under one RewardConfig; owns its worker (start it early with start())."""

  def __init__(self, config: RewardConfig):
    self.config = config
    self.names = [name for name, _ in config.rewards]
    self.weights = np.asarray([w for _, w in config.rewards], np.float32)
    self._lock = threading.Lock()
    if config.isolation == "process":
      self.runner = _ProcessRunner()
      self.jobs = [importable_ref(name) for name in self.names]
    else:
      self.runner = _ThreadRunner(inline=config.isolation == "none")
      self.jobs = [get_reward(name) for name in self.names]

  def start(self) -> None:
    """Boots the worker in the background (no-op for thread/none)."""
    if isinstance(self.runner, _ProcessRunner):
      self.runner.start()

  def score(self, completions: Sequence[str], examples: Sequence[Example]) -> tuple[np.ndarray, dict[str, Any]]:
    """(rewards_N float32 = sum_j weight_j * reward_j, stats) for paired completions/examples."""
    if len(completions) != len(examples):
      raise ValueError(f"score: {len(completions)} completions but {len(examples)} examples")
    completions, examples = list(completions), list(examples)
    with self._lock:
      restarts_before = self.runner.restarts
      try:
        values_NxR, failures = _evaluate(self.runner, self.jobs, self.names, completions, examples,
                                         self.config.timeout_s, self.config.batch_timeout_s)
      except BaseException:
        self.runner.restart()  # e.g. Ctrl-C mid-batch: results still in the pipe must not leak into the next call
        raise
      restarts = self.runner.restarts - restarts_before
    rewards_N = (values_NxR @ self.weights).astype(np.float32)
    return rewards_N, _report(self.names, values_NxR, self.weights, failures, len(completions), restarts)

  __call__ = score

  def close(self) -> None:
    self.runner.close()


_SCORERS: dict[RewardConfig, RewardScorer] = {}
_SCORERS_LOCK = threading.Lock()


def score(completions: Sequence[str], examples: Sequence[Example],
          rewards: Sequence[tuple[str, float]] = (("exact_numeric", 1.0),), timeout_s: float = 5.0,
          batch_timeout_s: float | None = 120.0, isolation: str = "process") -> tuple[np.ndarray, dict[str, Any]]:
  """Functional form of RewardScorer.score; reuses one scorer (and worker) per config."""
  config = RewardConfig(tuple(rewards), timeout_s, batch_timeout_s, isolation)
  with _SCORERS_LOCK:
    if config not in _SCORERS:
      _SCORERS[config] = RewardScorer(config)
    scorer = _SCORERS[config]
  return scorer.score(completions, examples)
