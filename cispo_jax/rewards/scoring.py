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

Either way a failure gives reward 0 for that (item, reward), marks its item invalid (stats["valid"], which
the trainer masks out of the update under TaskConfig.on_reward_error='mask'), is counted in the stats and
logged once per call and reward with the failed items' indices and its first few examples. A failure is an exception,
a hang, a crashed worker, or a returned value that is not a usable reward: not a real
number (a str, None...), NaN or infinite, not finite as float32 (1e39), or larger in
magnitude than RewardConfig.max_abs_reward (see MAX_ABS_REWARD).

workers (RewardConfig.workers, "process" only): the items of a batch are split into contiguous shards,
one per ProcessRunner, each with the guarantees above (a hang kills and restarts only its worker). Only
when the rewards are slow enough for it to pay: a scorer whose previous batch's rewards took less than
SPLIT_MIN_ITEM_S per item (their own time, measured in the worker: not the messages, and not inflated by
workers sharing cores) keeps the next one on its first worker. Fast rewards (final_numeric: ~10 us an
item, nearly all of it the pickled batch and one result message per (item, reward), which the trainer's
process receives whatever the number of workers) are no faster split, and a little slower on a busy host;
slow ones (sympy in math-verify, ms to s an item) are W times faster (benchmarks/bench_rewards.py).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
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
MAX_AUTO_WORKERS = 8  # workers=0: one per core, at most this many
SPLIT_MIN_ITEM_S = 50e-6  # rewards' seconds per item below which a batch stays on one worker (bench_rewards.py)
_LOGGED_INDICES = 20  # failed item indices listed per reward and kind in each warning
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """rewards: (name or 'package.module:function', weight) pairs; the reward is the weighted sum.

  timeout_s bounds each single (item, reward) evaluation; batch_timeout_s bounds one
  score() call (what is left when it runs out counts as timed out); None = unbounded.
  max_abs_reward: a returned value beyond +-this is an error (reward 0); inf = only require
  it to be finite in float32. memory_limit_mb: the process worker's address-space cap
  (None = none; isolation="process" only). workers: process workers a batch is split over
  (0 = one per core, at most MAX_AUTO_WORKERS; thread / none isolation always use one).
  """

  rewards: tuple[tuple[str, float], ...] = (("exact_numeric", 1.0),)
  timeout_s: float = 5.0
  batch_timeout_s: float | None = 120.0
  isolation: str = "process"
  max_abs_reward: float = MAX_ABS_REWARD
  memory_limit_mb: int | None = MEMORY_LIMIT_MB
  workers: int = 1

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
    if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0:
      raise ValueError(f"RewardConfig.workers must be an int >= 0 (0 = by cores), got {self.workers!r}")


def resolve_workers(workers: int) -> int:
  """RewardConfig.workers as a count: 0 = the cores this process may use, at most MAX_AUTO_WORKERS."""
  if workers:
    return workers
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return max(1, min(cores, MAX_AUTO_WORKERS))


def shards(n_items: int, workers: int) -> list[tuple[int, int]]:
  """Contiguous [start, stop) item ranges, one per worker used (at most one per item, at least one range),
  sizes differing by at most one."""
  used = max(1, min(workers, n_items))
  bounds = [n_items * k // used for k in range(used + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


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
              max_abs_reward=MAX_ABS_REWARD, started=None, cancel=None):
  """(values_NxR, per-pair failures {flat: (kind, message)}, seconds the rewards took: the worker's time for
  each evaluation, timeout_s for each that hung); drives the runner to the end.
  started: the time.monotonic() the batch began (its shards share one batch deadline); None = now.
  cancel: a threading.Event that ends the loop early (the caller was interrupted; values are moot)."""
  total = len(completions) * len(names)
  values = np.zeros((len(completions), len(names)), np.float32)
  failures: dict[int, tuple[str, str]] = {}
  spent, started = 0.0, time.monotonic() if started is None else started
  deadline = None if batch_timeout_s is None else started + batch_timeout_s

  def fail_rest(start: int, kind: str, message: str) -> None:
    for rest in range(start, total):
      failures[rest] = (kind, message)

  flat = 0
  while flat < total and not (cancel is not None and cancel.is_set()):
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
      index, value, error, seconds = result
      spent, flat = spent + seconds, index + 1
      if error is None:
        error = reward_value_error(value, max_abs_reward)
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
      failures[flat], spent = ("timeout", f"no result within {timeout_s:g}s"), spent + timeout_s
    if deadline is not None and time.monotonic() >= deadline:
      fail_rest(flat + 1, "timeout", f"score() ran past batch_timeout_s={batch_timeout_s:g}s")
      flat = total
    flat += 1
    runner.restart()
  return values, failures, spent


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
        indices = [i for i, _ in failed]
        listed = ", ".join(map(str, indices[:_LOGGED_INDICES])) + (", ..." if len(indices) > _LOGGED_INDICES else "")
        _log.warning("reward %r: %d %s(s) in %d items (scored 0 and marked invalid), items [%s]; e.g. %s",
                     name, len(failed), kind, n_items, listed, examples)
  stats["mean"] = float((values @ weights).mean()) if n_items else 0.0
  valid = np.ones(n_items, bool)
  valid[[flat // len(names) for flat in failures]] = False
  stats["failed_rows"] = int((~valid).sum())
  stats["valid"] = valid  # [N] bool: no reward of the mix failed for this item
  return stats


class RewardScorer:
  """Scores batches under one RewardConfig; owns its workers (start them early with start())."""

  def __init__(self, config: RewardConfig):
    self.config = config
    self.names = [name for name, _ in config.rewards]
    self.weights = np.asarray([w for _, w in config.rewards], np.float32)
    self._lock = threading.Lock()
    if config.isolation == "process":
      self.runners = [ProcessRunner(config.memory_limit_mb) for _ in range(resolve_workers(config.workers))]
      self.jobs = [importable_ref(name) for name in self.names]
    else:
      self.runners = [ThreadRunner(inline=config.isolation == "none")]
      self.jobs = [get_reward(name) for name in self.names]
    self.runner = self.runners[0]  # the one an unsplit batch runs on
    self.item_s: float | None = None  # the rewards' seconds per item in the last batch (None: none yet, so split)

  def start(self) -> None:
    """Boots the workers in the background (no-op for thread/none)."""
    for runner in self.runners:
      if isinstance(runner, ProcessRunner):
        runner.start()

  def score(self, completions: Sequence[str], examples: Sequence[Example]) -> tuple[np.ndarray, dict[str, Any]]:
    """(rewards_N float32 = sum_j weight_j * reward_j, stats) for paired completions/examples. stats["valid"]
    [N] bool is False for the items whose rewards failed (any reward of the mix); see _report for the rest."""
    if len(completions) != len(examples):
      raise ValueError(f"score: {len(completions)} completions but {len(examples)} examples")
    completions, examples = list(completions), list(examples)
    with self._lock:
      restarts_before = sum(r.restarts for r in self.runners)
      split = self.item_s is None or self.item_s >= SPLIT_MIN_ITEM_S
      parts = shards(len(completions), len(self.runners) if split else 1)
      try:
        values_NxR, failures, spent = self._evaluate_sharded(completions, examples, parts)
      except BaseException:
        for runner in self.runners:  # e.g. Ctrl-C mid-batch: results still in a pipe must not leak into the next call
          runner.restart()
        raise
      restarts = sum(r.restarts for r in self.runners) - restarts_before
      if completions:
        self.item_s = spent / len(completions)
    rewards_N = (values_NxR @ self.weights).astype(np.float32)
    return rewards_N, _report(self.names, values_NxR, self.weights, failures, len(completions), restarts,
                              completions)

  __call__ = score

  def _evaluate_sharded(self, completions, examples, parts):
    """_evaluate over the item ranges `parts`, one worker each, under one batch deadline: the first on this
    thread, the others on helper threads (each waits on its worker's pipe, not on the GIL). Returns what
    _evaluate does, for the whole batch."""
    cfg, started, n_rewards = self.config, time.monotonic(), len(self.names)
    results: list[Any] = [None] * len(parts)
    cancel = threading.Event()

    def run(k: int) -> None:
      a, b = parts[k]
      try:
        results[k] = _evaluate(self.runners[k], self.jobs, self.names, completions[a:b], examples[a:b],
                               cfg.timeout_s, cfg.batch_timeout_s, cfg.max_abs_reward, started, cancel)
      except BaseException as e:  # re-raised on the caller's thread
        results[k] = e

    helpers = [threading.Thread(target=run, args=(k,), daemon=True, name=f"reward-shard-{k}")
               for k in range(1, len(parts))]
    for thread in helpers:
      thread.start()
    try:
      run(0)
      for thread in helpers:
        thread.join()
    except BaseException:  # interrupted: stop the helpers (their workers killed) before score() restarts them
      cancel.set()
      for k in range(1, len(parts)):
        self.runners[k].interrupt()
      for thread in helpers:
        thread.join()
      raise
    values, failures, spent = [], {}, 0.0
    for (a, _), result in zip(parts, results):
      if isinstance(result, BaseException):
        raise result
      values.append(result[0])
      failures.update({flat + a * n_rewards: failure for flat, failure in result[1].items()})
      spent += result[2]
    return np.concatenate(values) if len(values) > 1 else values[0], failures, spent

  def close(self) -> None:
    for runner in self.runners:
      runner.close()


_SCORERS: dict[RewardConfig, RewardScorer] = {}
_SCORERS_LOCK = threading.Lock()


def score(completions: Sequence[str], examples: Sequence[Example],
          rewards: Sequence[tuple[str, float]] = (("exact_numeric", 1.0),), timeout_s: float = 5.0,
          batch_timeout_s: float | None = 120.0, isolation: str = "process",
          max_abs_reward: float = MAX_ABS_REWARD, memory_limit_mb: int | None = MEMORY_LIMIT_MB,
          workers: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
  """Functional form of RewardScorer.score; reuses one scorer (and its workers) per config."""
  config = RewardConfig(tuple(rewards), timeout_s, batch_timeout_s, isolation, max_abs_reward, memory_limit_mb,
                        workers)
  with _SCORERS_LOCK:
    if config not in _SCORERS:
      _SCORERS[config] = RewardScorer(config)
    scorer = _SCORERS[config]
  return scorer.score(completions, examples)
