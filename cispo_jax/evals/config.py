"""EvalConfig: the held-out evaluation during training."""

from __future__ import annotations

import dataclasses

from cispo_jax.config.fields import at_least


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The held-out evaluation during training (evals/evaluator.py; TaskConfig says on what)."""
  eval_every: int = 10  # iterations between evals (and at the last one)
  eval_size: int = 128  # held-out problems

  def __post_init__(self):
    at_least(self, ("eval_every", "eval_size"), 1)
