"""Pipelined off-policy RL: the next rollouts are sampled while the current update runs.

Schedule. With s = RolloutConfig.max_staleness, the rollout of iteration i is sampled by policy version

    v(i) = max(base, i - s)            (version v = the params after v RL iterations)

and trained on at version i, so every update sees rollouts exactly s versions old once the run is
s iterations in (ScaleRL's PipelineRL bounds staleness by 8; verl's one-step-off-policy mode is
s = 1). With weights synced every k updates (RolloutConfig.weight_sync_every) only the versions
that are multiples of k reach the engine, and v(i) = max(base, k * floor((i - s) / k)): staleness
s .. s + k - 1. The schedule is fixed rather than "whatever weights are newest": a run is then a pure
function of its config, s = 0 is the synchronous loop bit for bit, and a resumed run continues
exactly. The price: while sampling is the bottleneck the engine holds up to s + 1 versions of
the weights (the one it samples with and the newer ones the trainer has published; fewer with k > 1).

Threads. A producer thread makes the rollouts in order (draws prompts, samples on the rollout
engine, scores, and for a stale rollout recomputes the behaviour policy's log-probs); the trainer's
thread takes them in order, updates, and publishes each new version to the engine (a copy: the
next update donates the buffers). With a rollout sub-mesh (RolloutConfig.rollout_devices) the two run
on disjoint devices at the same time; colocated, they share the devices.

Resume. A checkpoint after iteration j holds the rollouts j, j+1, ... that versions older than j
sampled (j .. j+s-1 with k = 1; the checkpoint does not keep those versions) and the prompt
stream's position after them; the later rollouts are sampled again from the restored params (or
the versions trained from them), identically.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np

from cispo_jax.rollout.engine import Rollout, RolloutEngine

log = logging.getLogger(__name__)


class Pipeline:
  """Makes `make_rollout(i, version, rng_data)` for i = first .. total-1 on a background thread."""

  def __init__(self, make_rollout: Callable[[int, int, np.ndarray], Rollout], engine: RolloutEngine, *,
               staleness: int, first: int, total: int, base_version: int, pending: list[Rollout] = (),
               sync_every: int = 1):
    self._make, self.engine, self.s, self.k = make_rollout, engine, staleness, sync_every
    self.first, self.total, self.base = first, total, base_version
    self._ready = {r.iteration: r for r in pending}
    self._rngs: dict[int, np.ndarray] = {}
    self._cond = threading.Condition()
    self._error: BaseException | None = None
    self._stop = False
    self.busy: list[tuple[float, float]] = []  # (start, end) of each rollout made, perf_counter seconds
    self._thread = threading.Thread(target=self._run, name="cispo_jax-rollouts", daemon=True)

  def version_for(self, i: int) -> int:
    return max(self.base, (i - self.s) // self.k * self.k)

  def needs(self, version: int) -> bool:
    """Whether a rollout still to be made is sampled by `version`."""
    later = range(max(self.first, version), min(self.total, version + self.s + self.k))
    return any(self.version_for(i) == version for i in later)

  def first_sampled_by(self, version: int) -> int:
    """The first rollout from iteration `version` on that `version` or a newer one samples (the schedule
    never goes back): rollouts `version` .. this - 1 come from older versions. At most `total`."""
    return next((i for i in range(version, self.total) if self.version_for(i) >= version), self.total)

  def publish(self, params, rng_data: np.ndarray, version: int) -> None:
    """Hand the engine the trainer's params after `version` iterations, if a rollout to come needs them.
    Called from the trainer's thread; returns once the engine holds its own copy."""
    if not self.needs(version):
      return
    self.engine.load_weights(params, version)
    with self._cond:
      self._rngs[version] = np.asarray(rng_data)
      self._cond.notify_all()

  @property
  def started(self) -> bool:
    return self._thread.is_alive() or self._thread.ident is not None

  def start(self) -> None:
    self._thread.start()

  def _run(self):
    try:
      for i in range(self.first, self.total):
        v = self.version_for(i)
        with self._cond:
          self._cond.wait_for(lambda: self._stop or v in self._rngs)
          if self._stop:
            return
          rng = self._rngs[v]
        t0 = time.perf_counter()
        rollout = self._make(i, v, rng)
        self.busy.append((t0, time.perf_counter()))
        with self._cond:
          self._ready[i] = rollout
          for old in [u for u in self._rngs if u < v]:
            del self._rngs[old]
          self._cond.notify_all()
        self.engine.release_below(v)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the trainer's thread)
      log.exception("rollout thread failed")
      with self._cond:
        self._error = e
        self._cond.notify_all()

  def _wait(self, done: Callable[[], bool], what: str):
    with self._cond:
      self._cond.wait_for(lambda: done() or self._error is not None or not self._thread.is_alive())
      if not done():
        raise RuntimeError(f"the rollout thread stopped before {what}") from self._error

  def take(self, i: int) -> Rollout:
    """Rollout i (waits for it)."""
    self._wait(lambda: i in self._ready, f"rollout {i} was made")
    with self._cond:
      return self._ready.pop(i)

  def pending(self, lo: int, hi: int) -> list[Rollout]:
    """Rollouts lo .. hi-1 (waits for them; they stay queued): what a checkpoint after iteration lo keeps."""
    self._wait(lambda: all(i in self._ready for i in range(lo, hi)), f"rollouts {lo}..{hi - 1} were made")
    with self._cond:
      return [self._ready[i] for i in range(lo, hi)]

  def close(self, timeout_s: float = 600.0) -> None:
    with self._cond:
      self._stop = True
      self._cond.notify_all()
    if self.started:
      self._thread.join(timeout_s)  # a rollout in progress finishes first
