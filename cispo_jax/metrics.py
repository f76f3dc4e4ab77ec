"""Metric sinks: JSONL (the record of truth), TensorBoard event files, and a PNG of the curves.

Only the main process writes (the caller passes enabled=False elsewhere).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping


def _finite_or_none(v: float):
  return v if math.isfinite(v) else None


class MetricWriter:
  def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(run_dir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

  def write(self, iteration: int, metrics: Mapping[str, float]):
    if not self.enabled:
      return
    row = {"iteration": iteration, **{k: _finite_or_none(float(v)) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), iteration)
      self._tb.flush()

  def truncate_after(self, iteration: int):
    """On resume: drop rows logged after the checkpoint we resume from (they will be redone)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line)["iteration"] <= iteration]
    with open(self.path, "w") as f:
      f.writelines(rows)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(run_dir: str, out_name: str = "curves.png") -> str | None:
  """Reward and eval pass@1 against iteration, from metrics.jsonl."""
  rows = read_metrics(run_dir)
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  series = [("reward/mean", "train reward (mean)"), ("eval/pass_at_1", "held-out greedy pass@1")]
  for ax, (key, title) in zip(axes, series):
    pts = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
    if pts:
      xs, ys = zip(*pts)
      ax.plot(xs, ys, marker="o" if key.startswith("eval") else None)
    ax.set_title(title)
    ax.set_xlabel("RL iteration")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(run_dir, out_name)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
