"""Metric sinks: JSONL (the record of truth), TensorBoard event files, optionally Weights & Biases,
and a PNG of the curves.

Only the main process writes (the caller passes enabled=False elsewhere). The run's config goes to
TensorBoard as text and to wandb as the run's config (hyperparameters); wandb itself is in
metrics_wandb.py, imported only when a project is named.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping

log = logging.getLogger(__name__)


def _finite_or_none(v: float):
  return v if math.isfinite(v) else None


class MetricWriter:
  """Appends one JSON row per iteration to metrics.jsonl (and TensorBoard).

  `resume_from` is the iteration of the checkpoint the run starts from (None: from scratch).
  Rows after it were written by an attempt that died before saving; they are dropped now, so
  after any sequence of kills and resumes the file equals an uninterrupted run's, row for row.
  """

  def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True,
               resume_from: int | None = None, wandb_project: str = "", hparams: Mapping[str, str] | None = None):
    self.enabled = enabled
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self._tb = self._wandb = None
    if enabled:
      os.makedirs(run_dir, exist_ok=True)
      self._keep_rows_upto(-1 if resume_from is None else resume_from)
      if tensorboard:
        from tensorboardX import SummaryWriter
        # purge_step: TensorBoard hides the dead attempt's events from this step on.
        self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=0 if resume_from is None else resume_from + 1)
        if hparams:
          self._tb.add_text("config", "\n".join(f"    {k} = {v}" for k, v in hparams.items()), 0)
      if wandb_project:
        from cispo_jax.runtime.metrics_wandb import WandbSink
        self._wandb = WandbSink(run_dir, wandb_project, dict(hparams or {}), resume_from)

  def write(self, iteration: int, metrics: Mapping[str, float]):
    if not self.enabled:
      return
    row = {"iteration": iteration, **{k: _finite_or_none(float(v)) for k, v in metrics.items()}}
    with open(self.path, "a") as f:  # one write of a whole line: a kill leaves at most a torn last row
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), iteration)
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(iteration, {k: v for k, v in row.items() if k != "iteration" and v is not None})

  def _keep_rows_upto(self, iteration: int):
    if not os.path.exists(self.path):
      return
    rows = [r for r in _read_rows(self.path) if r["iteration"] <= iteration]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:  # replaced atomically: a kill here loses nothing
      f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, self.path)

  def close(self):
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.close()
      self._wandb = None


def _read_rows(path: str) -> list[dict]:
  """Rows of a metrics.jsonl. A torn last row (the process died mid-write) is dropped with a warning;
  a bad row anywhere else is an error naming the file and line."""
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().split("\n")
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if all(not rest.strip() for rest in lines[i + 1:]):
        log.warning("%s:%d: dropping a torn last row (%d bytes; the writer died mid-line)", path, i + 1, len(line))
        break
      raise ValueError(f"{path}:{i + 1}: not a JSON row ({e}); metrics.jsonl is damaged") from e
    if not isinstance(rows[-1], dict) or "iteration" not in rows[-1]:
      raise ValueError(f"{path}:{i + 1}: a metrics row must be an object with an 'iteration' key")
  return rows


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return _read_rows(path)


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
