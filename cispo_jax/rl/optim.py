"""Optimizer: AdamW with warmup + cosine/constant schedule and global-norm clipping."""

from __future__ import annotations

import dataclasses

import optax

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 1e-5
  schedule: str = "constant"  # after warmup
  warmup_steps: int = 0
  end_lr_ratio: float = 0.0  # cosine/linear decay to learning_rate * end_lr_ratio
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float | None = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"OptimConfig.schedule={self.schedule!r}; allowed: {SCHEDULES}")
    if not self.learning_rate > 0:
      raise ValueError(f"OptimConfig.learning_rate={self.learning_rate}; must be > 0")
    if self.warmup_steps < 0:
      raise ValueError(f"OptimConfig.warmup_steps={self.warmup_steps}; must be >= 0")
    if self.max_grad_norm is not None and not self.max_grad_norm > 0:
      raise ValueError(f"OptimConfig.max_grad_norm={self.max_grad_norm}; must be > 0 or None")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Learning rate per optimizer step (total_steps counts optimizer updates, not RL iterations)."""
  lr, warm = cfg.learning_rate, cfg.warmup_steps
  decay_steps = max(total_steps - warm, 1)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_lr_ratio)
  else:
    after = optax.linear_schedule(lr, lr * cfg.end_lr_ratio, decay_steps)
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.max_grad_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
  return optax.chain(*parts), schedule
