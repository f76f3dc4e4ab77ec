"""Score completions with weighted reward functions, isolated from their failures.

isolation (RewardConfig.isolation):
  "process" (default) - rewards run in a reused worker interpreter. An exception costs
      one item; a hang costs timeout_s, after which the worker is killed and restarted
      (startup ~0.3 s) and the batch continues. Handles anything, including C code
      stuck in a loop or a crash. Cost: pickling the batch, ~10 us per (item, reward).
      The worker is its own process group: processes a reward starts are killed with
      it (on a timeout, a restart, close() and at exit). Its address space is capped at
      RewardConfig.memory_limit_mb: an allocation past it is an error for that item and
      the worker is replaced (a leak does not carry over).
  "thread" - rewards run in a daemon thread. No startup or IPC; exceptions and hangs
      give 0 just the same, but a hung thread cannot be killed: it is abandoned and
      keeps taking CPU and the GIL for the rest of the run. For trusted, fast rewards,
      or rewards defined where another process cannot import them (__main__).
  "none" - called inline: exceptions are caught, hangs are not. For debugging.

Either way a failure gives reward 0 for that (item, reward), is counted in the stats and
logged once per call and reward with its first few examples. A failure is an exception,
a hang, a crashed worker, or a returned value that is not a usable reward: not a real
number (a str, None...), NaN or infinite, not finite as float32 (1e39), or larger in
magnitude than RewardConfig.max_abs_reward (see MAX_ABS_REWARD).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from typing import Any, Sequence

import numpy as np

from cispo_jax.data.example import Example
from cispo_jax.rewards.registry import get_reward, importable_ref
from cispo_jax.rewards.runners import DIED, TIMEOUT, MEMORY_LIMIT_MB, ProcessRunner, ThreadRunner
from cispo_jax.rewards.worker import OUT_OF_MEMORY

ISOLATIONS = ("process", "thread", "none")
MAX_ABS_REWARD = 1e6
"""Default RewardConfig.max_abs_reward: a reward beyond +-1e6 is taken for a bug (a verifier
returning a count, an id, an overflow), given 0 and counted as an error rather than allowed to
swamp the group's advantages; verifiable rewards are O(1). Raise it per config if you mean it."""
_LOGGED_EXAMPLES = 3  # failures quoted per reward and kind in each warning
_FLOAT32_MAX = float(np.finfo(np.float32).max)
STARTUP_TIMEOUT_S = 120.0  # interpreter start plus importing the reward modules (sympy...)
_MIN_BOOT_S = 10.0  # a restart late in a batch still gets this long to boot
_RECYCLE = object()
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """rewards: (name or 'package.module:function', weight) pairs; the reward is the weighted sum.

  timeout_s bounds each single (item, reward) evaluation; batch_timeout_s bounds one
  score() call (what is left when it runs out counts as timed out); None = unbounded.
  max_abs_reward: a returned value beyond +-this is an error (reward 0); inf = only require
  it to be finite in float32. memory_limit_mb: the process worker's address-space cap
  (None = none; isolation="process" only).
  """

  rewards: tuple[tuple[str, float], ...] = (("exact_numeric", 1.0),)
  timeout_s: float = 5.0
  batch_timeout_s: float | None = 120.0
  isolation: str = "process"
  max_abs_reward: float = MAX_ABS_REWARD
  memory_limit_mb: int | None = MEMORY_LIMIT_MB

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
    if isinstance(self.max_abs_reward, bool) or not self.max_abs_reward > 0:
      raise ValueError(f"RewardConfig.max_abs_reward must be > 0 (inf allowed), got {self.max_abs_reward!r}")
    if self.memory_limit_mb is not None and (not isinstance(self.memory_limit_mb, int)
                                             or isinstance(self.memory_limit_mb, bool)
                                             or self.memory_limit_mb < 1):
      raise ValueError(f"RewardConfig.memory_limit_mb must be a positive int (MiB) or None, "
                       f"got {self.memory_limit_mb!r}")


def reward_value_error(value: float, max_abs: float) -> str | None:
  """Why a reward function's (float) value cannot be used as a reward, or None if it can."""
  if not math.isfinite(value):
    return f"returned {value}"
  if abs(value) > _FLOAT32_MAX:
    return f"returned {value:g}, which is not finite as float32 (the rewards' dtype)"
  if abs(value) > max_abs:
    return f"returned {value:g}, beyond RewardConfig.max_abs_reward={max_abs:g}"
  return None


def _evaluate(runner, jobs, names, completions, examples, timeout_s, batch_timeout_s,
              max_abs_reward=MAX_ABS_REWARD):
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
      kind = "timeout" if outcome is TIMEOUT else "error"
      limit = f"; its memory limit is {runner.memory_limit_mb} MiB" if runner.memory_limit_mb else ""
      fail_rest(flat, kind, f"reward worker did not start and load the rewards ({kind}{limit})")
      runner.restart()
      break
    while flat < total:
      left = timeout_s if deadline is None else min(timeout_s, deadline - time.monotonic())
      result = runner.get(left)
      if result is TIMEOUT or result is DIED:
        outcome = result
        break
      index, value, error = result
      if error is None:
        error = reward_value_error(value, max_abs_reward)
      flat = index + 1
      if error is None:
        values.flat[index] = value
        continue
      if error.startswith(OUT_OF_MEMORY) and runner.recycle_after_oom:
        failures[index] = ("error", f"{error} (over the reward worker's memory limit of "
                                    f"{runner.memory_limit_mb} MiB; worker replaced)")
        outcome = _RECYCLE  # whatever it leaked stays allocated: go on in a fresh worker
        break
      failures[index] = ("error", error)
    if outcome is None:
      break
    if outcome is _RECYCLE:
      runner.restart()
      continue
    # `flat` is the pair whose result never came: it hung or killed its process.
    if outcome is DIED:
      failures[flat] = ("error", runner.exit_note())
    else:
      failures[flat] = ("timeout", f"no result within {timeout_s:g}s")
    if deadline is not None and time.monotonic() >= deadline:
      fail_rest(flat + 1, "timeout", f"score() ran past batch_timeout_s={batch_timeout_s:g}s")
      flat = total
    flat += 1
    runner.restart()
  return values, failures


def _quote(text: str, width: int = 60) -> str:
  return repr(text if len(text) <= width else text[:width - 3] + "...")


def _report(names, values, weights, failures, n_items, restarts, completions=None) -> dict[str, Any]:
  stats: dict[str, Any] = {"errors": 0, "timeouts": 0, "worker_restarts": restarts}
  by_reward = collections.defaultdict(list)
  for flat, (kind, message) in sorted(failures.items()):
    by_reward[flat % len(names), kind].append((flat // len(names), message))
  for j, name in enumerate(names):
    stats[f"{name}/mean"] = float(values[:, j].mean()) if n_items else 0.0
    for kind in ("error", "timeout"):
      failed = by_reward.get((j, kind), [])
      stats[f"{name}/{kind}s"] = len(failed)
      stats[f"{kind}s"] += len(failed)
      if failed:
        examples = "; ".join(
            f"item {i}" + (f" (completion {_quote(completions[i])})" if completions is not None else "")
            + f": {message}" for i, message in failed[:_LOGGED_EXAMPLES])
        _log.warning("reward %r: %d %s(s) in %d items (reward 0 for those), e.g. %s",
                     name, len(failed), kind, n_items, examples)
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
      self.runner = ProcessRunner(config.memory_limit_mb)
      self.jobs = [importable_ref(name) for name in self.names]
    else:
      self.runner = ThreadRunner(inline=config.isolation == "none")
      self.jobs = [get_reward(name) for name in self.names]

  def start(self) -> None:
    """Boots the worker in the background (no-op for thread/none)."""
    if isinstance(self.runner, ProcessRunner):
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
                                         self.config.timeout_s, self.config.batch_timeout_s,
                                         self.config.max_abs_reward)
      except BaseException:
        self.runner.restart()  # e.g. Ctrl-C mid-batch: results still in the pipe must not leak into the next call
        raise
      restarts = self.runner.restarts - restarts_before
    rewards_N = (values_NxR @ self.weights).astype(np.float32)
    return rewards_N, _report(self.names, values_NxR, self.weights, failures, len(completions), restarts,
                              completions)

  __call__ = score

  def close(self) -> None:
    self.runner.close()


_SCORERS: dict[RewardConfig, RewardScorer] = {}
_SCORERS_LOCK = threading.Lock()


def score(completions: Sequence[str], examples: Sequence[Example],
          rewards: Sequence[tuple[str, float]] = (("exact_numeric", 1.0),), timeout_s: float = 5.0,
          batch_timeout_s: float | None = 120.0, isolation: str = "process",
          max_abs_reward: float = MAX_ABS_REWARD,
          memory_limit_mb: int | None = MEMORY_LIMIT_MB) -> tuple[np.ndarray, dict[str, Any]]:
  """Functional form of RewardScorer.score; reuses one scorer (and worker) per config."""
  config = RewardConfig(tuple(rewards), timeout_s, batch_timeout_s, isolation, max_abs_reward, memory_limit_mb)
  with _SCORERS_LOCK:
    if config not in _SCORERS:
      _SCORERS[config] = RewardScorer(config)
    scorer = _SCORERS[config]
  return scorer.score(completions, examples)
