"""The unbiased pass@k estimator (Chen et al., 2021, "Evaluating Large Language Models Trained on Code").

With n samples of a problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that a
k-subset drawn without replacement from the n holds at least one pass. The binomials overflow
float64 near n = 1030, so the ratio is taken as the product prod_{i=n-c+1}^{n} (1 - k/i).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem with `c` passing samples out of `n` (1 <= k <= n)."""
  if not 0 <= c <= n:
    raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
  if not 1 <= k <= n:
    raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
  if n - c < k:  # every k-subset holds a pass
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(n: int, correct_G: Sequence[int], k: int) -> float:
  """pass@k averaged over problems, each with n samples and correct_G[g] passes."""
  if len(correct_G) == 0:
    raise ValueError("mean_pass_at_k: no problems")
  return float(np.mean([pass_at_k(n, int(c), k) for c in correct_G]))
