"""Why a run stops before total_steps. SIGTERM / SIGINT: a preemptible VM's SIGTERM, or Ctrl-C, lets the
iteration finish, then the run saves and exits (EXIT_PREEMPTED); a second Ctrl-C stops at once. Too many
optimizer steps in a row with a non-finite loss or gradient: NonFiniteTraining."""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

from cispo_jax import sharding

log = logging.getLogger(__name__)


class StopSignals:
  """Installs the handlers (from the main thread only) until `close()`; `received` names the signal."""

  def __init__(self, iteration=lambda: 0):
    self.received: str | None = None
    self._iteration = iteration  # the iteration now running, for the log line
    self._handlers: dict = {}
    if threading.current_thread() is threading.main_thread():
      self._handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

  def _on_signal(self, signum, frame):
    name = signal.Signals(signum).name
    if self.received is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.received = name
    log.warning("%s received: finishing iteration %d, then saving a checkpoint and exiting", name,
                self._iteration() + 1)

  def should_stop(self) -> bool:
    """Whether any process got SIGTERM/SIGINT. A signal reaches one host first; all must stop at the same
    iteration, so the flag is shared (one tiny collective per iteration, only with several processes)."""
    mine = self.received is not None
    if jax.process_count() == 1:
      return mine
    return bool(sharding.allgather_host(np.array([mine])).any())

  def close(self):
    for sig, old in self._handlers.items():
      signal.signal(sig, old)
    self._handlers = {}


class NonFiniteTraining(RuntimeError):
  """Too many optimizer steps in a row had a non-finite loss or gradient."""


def count_nonfinite(counts: dict, skipped_S, *, iteration: int, limit: int, latest_checkpoint):
  """Adds an update's skipped optimizer steps to counts {"total", "consecutive"}; raises
  NonFiniteTraining when more than `limit` in a row were skipped."""
  if skipped_S is None:
    return
  skipped_S = np.asarray(skipped_S, bool).reshape(-1)
  counts["total"] += int(skipped_S.sum())
  if skipped_S.all():
    counts["consecutive"] += len(skipped_S)
  else:  # the skips at the end of this update (after its last good step)
    counts["consecutive"] = len(skipped_S) - 1 - int(np.flatnonzero(~skipped_S)[-1])
  if skipped_S.any():
    log.warning("iteration %d: %d of %d optimizer steps skipped (non-finite loss or gradient)",
                iteration, int(skipped_S.sum()), len(skipped_S))
  if counts["consecutive"] > limit:
    raise NonFiniteTraining(
        f"{counts['consecutive']} optimizer steps in a row had a non-finite loss or gradient "
        f"(UpdateConfig.max_nonfinite_skips={limit}); stopping at iteration {iteration}. "
        f"The newest checkpoint ({latest_checkpoint}) holds the last finite state; lower the learning "
        f"rate or check the rewards (metrics.jsonl: train/skipped_nonfinite).")


ZERO_VARIANCE_PATIENCE = 10  # iterations in a row with no group carrying signal before the warning


class RolloutWatch:
  """Warnings about rollouts that cannot teach: every completion truncated (a model that never stops), and
  every group's rewards equal for ZERO_VARIANCE_PATIENCE iterations in a row (no advantage anywhere). Each
  names the fields to look at. The streak restarts on resume."""

  def __init__(self, rl, stops, tokenizer):
    self.rl, self.stops, self.tokenizer = rl, stops, tokenizer
    self.flat_streak = 0

  def check(self, iteration: int, rewards_B: np.ndarray, stopped_B: np.ndarray) -> None:
    ro = self.rl.rollout
    if not stopped_B.any():
      log.warning("iteration %d: none of the %d completions stopped on its own (all ran to max_new_tokens=%d); "
                  "stop tokens: %s. A chat model whose end of turn is not among them never stops: add it with "
                  "RolloutConfig.stop_token_ids or RolloutConfig.stop_strings, or raise RolloutConfig.max_new_tokens",
                  iteration, len(stopped_B), ro.max_new_tokens, self.stops.describe(self.tokenizer))
    groups = np.asarray(rewards_B, np.float64).reshape(-1, ro.num_generations)
    flat = bool((groups.max(1) == groups.min(1)).all())
    self.flat_streak = self.flat_streak + 1 if flat else 0
    if self.flat_streak and self.flat_streak % ZERO_VARIANCE_PATIENCE == 0:
      log.warning("iteration %d: every group's rewards have been equal for %d iterations in a row (reward mean "
                  "%.3g now): no completion is better than its group's others, so every advantage is 0 and nothing "
                  "is learned. Check TaskConfig.rewards (does the reward ever differ?), the task's difficulty for "
                  "this model, RolloutConfig.temperature=%g, RolloutConfig.num_generations=%d and "
                  "RolloutConfig.max_new_tokens=%d", iteration, self.flat_streak, float(groups.mean()),
                  ro.temperature, ro.num_generations, ro.max_new_tokens)
