"""A jax.profiler trace of chosen RL iterations (RLConfig.profile_iterations = (i, j)).

The trace covers iterations i..j inclusive (1-based, as metrics.jsonl counts them): everything the
loop does in them, eval and checkpointing included. It is written under <run_dir>/profile in the
TensorBoard profile plugin's layout (plugins/profile/<timestamp>/*.xplane.pb); open it with
TensorBoard's profile tab or Perfetto. Only the main process traces.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax

log = logging.getLogger(__name__)


def check_iterations(span: Sequence[int], field: str = "RLConfig.profile_iterations") -> None:
  if span and not (len(span) == 2 and 1 <= span[0] <= span[1]):
    raise ValueError(f"{field}={tuple(span)}; expected () (off) or (first, last) with 1 <= first <= last")


class IterationProfiler:

  def __init__(self, span: Sequence[int], log_dir: str, enabled: bool = True):
    check_iterations(span)
    self.span, self.log_dir, self.enabled, self.active = tuple(span), log_dir, enabled and bool(span), False

  def before(self, iteration: int) -> None:
    """Call before iteration `iteration` (1-based) starts."""
    if self.enabled and not self.active and iteration == self.span[0]:
      os.makedirs(self.log_dir, exist_ok=True)
      jax.profiler.start_trace(self.log_dir)
      self.active = True
      log.info("profiling iterations %d..%d into %s", *self.span, self.log_dir)

  def after(self, iteration: int) -> None:
    """Call when iteration `iteration` is done."""
    if self.active and iteration >= self.span[1]:
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      log.info("profile written to %s", self.log_dir)
