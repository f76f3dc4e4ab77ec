"""Truncated completions (DAPO, arXiv:2503.14476, section 3.4), as pure functions of the rollout's lengths.

A completion that ran to its budget without stopping has a reward that says little about its reasoning
(it was cut off), and training on it teaches the policy noise. DAPO offers two remedies:

  overlong filtering   the truncated rows' tokens leave the loss (mask 0); their rewards still count in
                       their group's statistics, as scored
  soft overlong        a length penalty added to the reward, 0 up to L_max - L_cache, then linear down to
  punishment           -factor at L_max: R_len(y) = clip(((L_max - L_cache) - |y|) / L_cache, -1, 0) * factor

(ScaleRL's forced interruption, the third remedy, changes the sampling: see the paged engine.)
"""

from __future__ import annotations

import numpy as np


def overlong_penalty(lengths_B, max_len, buffer: int, factor: float = 1.0) -> np.ndarray:
  """DAPO's soft overlong punishment of each completion (<= 0), float32 [B]. max_len: the budget (an int or
  one per row); buffer: L_cache, the positions before the budget over which the penalty grows (0 = none)."""
  lengths = np.asarray(lengths_B, np.float64)
  if buffer <= 0:
    return np.zeros(lengths.shape, np.float32)
  max_len = np.broadcast_to(np.asarray(max_len, np.float64), lengths.shape)
  if np.any(buffer > max_len):
    raise ValueError(f"overlong buffer {buffer} is longer than a budget ({int(max_len.min())} tokens)")
  excess = lengths - (max_len - buffer)
  return (-factor * np.clip(excess / buffer, 0.0, 1.0)).astype(np.float32)


def overlong_keep(stopped_B) -> np.ndarray:
  """Overlong filtering's row weights, float32 [B]: 1 for a completion that stopped, 0 for a truncated one."""
  return np.asarray(stopped_B, bool).astype(np.float32)
