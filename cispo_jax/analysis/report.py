"""Runs over seeds: intervals, threshold crossings, the ScaleRL curve fit, and plots.

    python -m cispo_jax.analysis runs/quick --out experiments/results/quick [--threshold 0.5]

A run directory is what the trainer writes (metrics.jsonl, operative_config.gin, summary.json
when finished). Directories named <arm>-s<seed> (the sweep's layout) are grouped into arms;
any other directory is an arm of its own. The statistics are in stats.py (pure numpy).

Compute axes (x of the curves and of the fit), all cumulative up to an eval point:
  iteration        RL iterations (one rollout batch each)
  rollout_tokens   completion tokens sampled (tokens/generated summed), the sampler's work
  update_tokens    rollout tokens x passes over each rollout (UpdateConfig.num_iterations): the
                   forward+backward work, which the off-policy depth sweep changes

ScaleRL's fit (stats.fit_scalerl): R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B), R0 the first eval
(C = 0). Fitted per run, then reported as mean and 95% interval over the arm's seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re

import numpy as np

from cispo_jax.runtime.metrics import read_metrics
from cispo_jax.config.operative import read_bindings
from cispo_jax.analysis.stats import fit_scalerl, mean_ci

COMPUTE_AXES = ("iteration", "rollout_tokens", "update_tokens")
EVAL_KEY = "eval/pass_at_1"
_RUN_NAME = re.compile(r"^(?P<arm>.+)-s(?P<seed>\d+)$")


# ---------------------------------------------------------------------------------------- runs

@dataclasses.dataclass
class Run:
  """One run directory, reduced to its eval curve and the compute at each eval point."""
  path: str
  arm: str
  seed: int | None
  finished: bool
  eval_iteration: np.ndarray  # [E] iterations with an eval (0 = before RL)
  pass_at_1: np.ndarray  # [E]
  compute: dict  # axis name -> [E] cumulative compute at the eval points
  updates_per_rollout: int
  seconds: float | None
  # The fork-token diagnostic (diagnostics.py), mean over the iterations that updated: the share of
  # the unclipped gradient weight the loss removed, and the share of tokens zeroed with A > 0 and
  # r > 1.2 (the clipped "fork" tokens of claim (a)). None for runs logged before it existed.
  diag_removed: float | None = None
  diag_zeroed_pos_high: float | None = None
  # The same per iteration: {iteration: (removed, zeroed with A > 0 and r > 1.2)}.
  diag_series: dict = dataclasses.field(default_factory=dict)

  @property
  def final(self) -> float:
    return float(self.pass_at_1[-1])

  @property
  def best(self) -> float:
    return float(self.pass_at_1.max())


def read_run(run_dir: str, arm: str | None = None) -> Run:
  """A run's eval curve and cumulative compute. Errors name the directory."""
  if not os.path.isdir(run_dir):
    raise ValueError(f"{run_dir}: not a run directory")
  rows = read_metrics(run_dir)
  if not rows:
    raise ValueError(f"{run_dir}: no metrics.jsonl rows (not a run directory, or the run never started)")
  name = os.path.basename(os.path.normpath(run_dir))
  m = _RUN_NAME.match(name)
  seed = int(m["seed"]) if m else None
  arm = arm or (m["arm"] if m else name)
  bindings = read_bindings(run_dir)
  passes = int(bindings.get("UpdateConfig.num_iterations", 1))
  updates = passes * int(bindings.get("UpdateConfig.num_minibatches", 1))
  by_iter: dict[int, dict] = {}
  for r in rows:  # the iteration-0 eval row and iteration rows; a later row of an iteration wins
    by_iter.setdefault(int(r["iteration"]), {}).update(r)
  iters = sorted(by_iter)
  tokens = np.cumsum([by_iter[i].get("tokens/generated") or 0.0 for i in iters])
  evals = [(k, i) for k, i in enumerate(iters) if by_iter[i].get(EVAL_KEY) is not None]
  if not evals:
    raise ValueError(f"{run_dir}/metrics.jsonl: no {EVAL_KEY} rows")
  idx = np.array([k for k, _ in evals])
  eval_iteration = np.array([i for _, i in evals])
  compute = {"iteration": eval_iteration.astype(np.float64), "rollout_tokens": tokens[idx],
             "update_tokens": tokens[idx] * passes}
  summary_path = os.path.join(run_dir, "summary.json")
  seconds = None
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      seconds = json.load(f).get("seconds")
  def zeroed_high(row):
    return (row.get("train/diag/zeroed_pos_hi") or 0.0) + (row.get("train/diag/zeroed_pos_xhi") or 0.0)
  series = {i: (by_iter[i]["train/diag/removed"], zeroed_high(by_iter[i]))
            for i in iters if by_iter[i].get("train/diag/removed") is not None}
  removed = float(np.mean([v[0] for v in series.values()])) if series else None
  zeroed = float(np.mean([v[1] for v in series.values()])) if series else None
  return Run(run_dir, arm, seed, seconds is not None, eval_iteration,
             np.array([by_iter[i][EVAL_KEY] for i in eval_iteration], np.float64), compute, updates, seconds,
             removed, zeroed, series)


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
  """Arms in first-seen order, each with its runs sorted by seed."""
  arms: dict[str, list[Run]] = {}
  seen: dict[tuple, str] = {}
  for r in runs:
    if r.seed is not None and (r.arm, r.seed) in seen:  # e.g. the same arm from two sweep roots
      raise ValueError(f"two runs of arm {r.arm!r} with seed {r.seed}: {seen[(r.arm, r.seed)]} and {r.path}; "
                       "pass one of them")
    seen[(r.arm, r.seed)] = r.path
    arms.setdefault(r.arm, []).append(r)
  return {a: sorted(rs, key=lambda r: (r.seed is None, r.seed or 0, r.path)) for a, rs in arms.items()}


def first_crossing(x, y, threshold: float) -> float | None:
  """The first x where y >= threshold (an eval point), or None if never."""
  hit = np.flatnonzero(np.asarray(y) >= threshold)
  return float(np.asarray(x)[hit[0]]) if hit.size else None


# ---------------------------------------------------------------------------------------- summary

def summarize(arms: dict[str, list[Run]], threshold: float, compute: str = "rollout_tokens",
              reference: str | None = None, level: float = 0.95) -> dict:
  """Per arm: seeds, start, final / best pass@1, iterations and compute to `threshold`, the fit,
  and the paired difference of final pass@1 to the reference arm (same seeds only)."""
  if compute not in COMPUTE_AXES:
    raise ValueError(f"compute={compute!r}; allowed: {COMPUTE_AXES}")
  ref_final = {r.seed: r.final for r in arms.get(reference, []) if r.finished}
  out = {}
  for arm, runs in arms.items():
    done = [r for r in runs if r.finished]
    row = {"seeds": [r.seed for r in done], "unfinished": [r.path for r in runs if not r.finished],
           "updates_per_rollout": sorted({r.updates_per_rollout for r in done})}
    row["start"] = mean_ci([r.pass_at_1[0] for r in done], level)
    row["final"] = mean_ci([r.final for r in done], level)
    row["best"] = mean_ci([r.best for r in done], level)
    for axis in ("iteration", compute):
      hits = [first_crossing(r.compute[axis], r.pass_at_1, threshold) for r in done]
      row[f"to_threshold_{axis}"] = {**dict(zip(("mean", "ci"), mean_ci([h for h in hits if h is not None], level))),
                                     "reached": sum(h is not None for h in hits), "of": len(hits)}
    fits = []
    for r in done:
      try:
        fits.append(fit_scalerl(r.compute[compute], r.pass_at_1))
      except ValueError:  # too few eval points: reported as a missing fit, not a failure
        fits.append(None)
    row["fit"] = {k: mean_ci([f[k] for f in fits if f], level) for k in ("A", "B", "C_mid", "rmse")}
    row["fit_per_seed"] = fits
    row["diag_removed"] = mean_ci([r.diag_removed for r in done], level)
    row["diag_zeroed_pos_high"] = mean_ci([r.diag_zeroed_pos_high for r in done], level)
    row["minutes"] = mean_ci([r.seconds / 60 for r in done if r.seconds is not None], level)
    if reference is not None and arm != reference:
      diffs = [r.final - ref_final[r.seed] for r in done if r.seed in ref_final]
      row["final_minus_reference"] = {**dict(zip(("mean", "ci"), mean_ci(diffs, level))), "pairs": len(diffs)}
    out[arm] = row
  return {"threshold": threshold, "compute": compute, "reference": reference, "level": level, "arms": out}


def _fmt(mc, digits=3, scale=1.0):
  mean, ci = mc if isinstance(mc, (tuple, list)) else (mc["mean"], mc["ci"])
  if mean is None or not np.isfinite(mean):
    return "–"
  if ci is None or not np.isfinite(ci):
    return f"{mean * scale:.{digits}f}"
  return f"{mean * scale:.{digits}f} ± {ci * scale:.{digits}f}"


def _fmt_big(mc):
  mean, ci = mc if isinstance(mc, (tuple, list)) else (mc["mean"], mc["ci"])
  if mean is None or not np.isfinite(mean):
    return "–"
  return f"{mean:.3g}" + (f" ± {ci:.2g}" if ci is not None and np.isfinite(ci) else "")


def markdown_table(summary: dict) -> str:
  thr, comp, ref = summary["threshold"], summary["compute"], summary["reference"]
  pct = int(round(100 * summary["level"]))
  head = (f"| arm | seeds | updates / rollout | pass@1 start | final | best | iterations to {thr} | {comp} to {thr} "
          f"| fit A | fit B | fit C_mid | grad weight removed (%) | tokens A>0, r>1.2 zeroed (%) | minutes |")
  if ref:
    head += f" final − {ref} (paired) |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for arm, r in summary["arms"].items():
    it, ct = r["to_threshold_iteration"], r[f"to_threshold_{comp}"]
    cells = [arm, str(len(r["seeds"])), "/".join(map(str, r["updates_per_rollout"])) or "–",
             _fmt(r["start"]), _fmt(r["final"]), _fmt(r["best"]),
             f"{_fmt_big(it)} ({it['reached']}/{it['of']})", f"{_fmt_big(ct)} ({ct['reached']}/{ct['of']})",
             _fmt(r["fit"]["A"]), _fmt(r["fit"]["B"], 2), _fmt_big(r["fit"]["C_mid"]),
             _fmt(r["diag_removed"], 2, 100), _fmt(r["diag_zeroed_pos_high"], 3, 100), _fmt(r["minutes"], 1)]
    if ref:
      d = r.get("final_minus_reference")
      cells.append(f"{_fmt(d, 1, 100)} pts ({d['pairs']} pairs)" if d else "(reference)")
    lines.append("| " + " | ".join(cells) + " |")
  notes = [f"\nMean ± {pct}% t-interval over seeds (no interval with one seed). Iterations / {comp} to {thr}: "
           "mean over the seeds that reached it (reached / seeds). Fit: ScaleRL's "
           f"R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B) per seed on C = {comp}, then mean ± interval. "
           "Gradient weight removed and tokens zeroed: the fork-token diagnostic (train/diag/removed, "
           "train/diag/zeroed_pos_hi + _pos_xhi), mean over a run's iterations (each the mean of its optimizer steps)."]
  for arm, r in summary["arms"].items():
    fits = [f for f in r["fit_per_seed"] if f]
    flat = sum(f["B"] is None for f in fits)
    beyond = sum(bool(f["beyond_data"]) for f in fits)
    if flat or beyond:
      notes.append(f"{arm}: of {len(fits)} fits, {flat} had no gain (B, C_mid undetermined, left out) and {beyond} "
                   "put C_mid beyond the last eval (A and C_mid extrapolated).")
    if r["unfinished"]:
      notes.append(f"{arm}: unfinished runs left out: {', '.join(r['unfinished'])}")
  return "\n".join(lines) + "\n" + "\n".join(notes) + "\n"


# ---------------------------------------------------------------------------------------- plots

def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _band(ax, xs, ys_SxE, label: str, level: float, marker="o"):
  """The mean over seeds (rows) with its t-interval as a shaded band."""
  stats = [mean_ci(col, level) for col in np.asarray(ys_SxE, np.float64).T]
  mean = np.array([m for m, _ in stats])
  half = np.nan_to_num(np.array([h for _, h in stats]))
  line, = ax.plot(xs, mean, marker=marker, ms=3, label=label)
  ax.fill_between(xs, mean - half, mean + half, color=line.get_color(), alpha=0.2)


def _save(fig, ax_list, path: str, title: str) -> str:
  for ax in ax_list:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=90)
  _pyplot().close(fig)
  return path


def plot_mean_curves(arms: dict[str, list[Run]], path: str, x_axis: str = "iteration", level: float = 0.95) -> str:
  """Mean held-out pass@1 per arm with its t-interval band, against x_axis. Seeds are aligned on
  the eval iterations they share; on a compute axis x is the seeds' mean compute there."""
  if x_axis not in COMPUTE_AXES:
    raise ValueError(f"x_axis={x_axis!r}; allowed: {COMPUTE_AXES}")
  fig, ax = _pyplot().subplots(figsize=(6, 4))
  for arm, runs in arms.items():
    done = [r for r in runs if r.finished] or runs
    common = sorted(set.intersection(*(set(r.eval_iteration.tolist()) for r in done)))
    if not common:
      continue
    pos = [[list(r.eval_iteration).index(i) for i in common] for r in done]
    ys = np.array([r.pass_at_1[p] for r, p in zip(done, pos)])
    xs = np.array([r.compute[x_axis][p] for r, p in zip(done, pos)]).mean(0)
    _band(ax, xs, ys, f"{arm} (n={len(done)})", level)
  ax.set(xlabel=x_axis.replace("_", " "), ylabel="held-out greedy pass@1")
  return _save(fig, [ax], path, f"mean ± {int(round(100 * level))}% interval over seeds")


def plot_diag_curves(arms: dict[str, list[Run]], path: str, level: float = 0.95) -> str | None:
  """The fork-token diagnostic per iteration, mean and band over seeds: the share of gradient weight
  each arm's loss removed, and the share of tokens zeroed with A > 0 and r > 1.2. None when no run
  logged it."""
  if not any(r.diag_series for runs in arms.values() for r in runs):
    return None
  fig, axes = _pyplot().subplots(1, 2, figsize=(10, 3.8))
  for arm, runs in arms.items():
    done = [r for r in runs if r.diag_series]
    common = sorted(set.intersection(*(set(r.diag_series) for r in done))) if done else []
    if not common:
      continue
    for j, ax in enumerate(axes):
      _band(ax, common, [[100 * r.diag_series[i][j] for i in common] for r in done], f"{arm} (n={len(done)})",
            level, marker=None)
  axes[0].set(xlabel="RL iteration", ylabel="%", title="policy-gradient weight removed by clip / mask")
  axes[1].set(xlabel="RL iteration", ylabel="% of tokens", title="tokens with A > 0, r > 1.2 given zero gradient")
  return _save(fig, axes, path, f"fork-token diagnostic, mean ± {int(round(100 * level))}% interval over seeds")


def expand_run_dirs(paths: list[str]) -> list[str]:
  """Run directories as given; a directory without metrics.jsonl that holds <arm>-s<seed> run
  directories (a sweep's root) stands for those."""
  out = []
  for p in paths:
    if not os.path.exists(os.path.join(p, "metrics.jsonl")) and os.path.isdir(p):
      runs = sorted(os.path.join(p, d) for d in os.listdir(p)
                    if _RUN_NAME.match(d) and os.path.exists(os.path.join(p, d, "metrics.jsonl")))
      if runs:
        out += runs
        continue
    out.append(p)
  return out


def analyze(run_dirs: list[str], out_dir: str, threshold: float = 0.5, compute: str = "rollout_tokens",
            reference: str | None = None) -> dict:
  """Read the runs (or sweep roots, expand_run_dirs), write results.md, results.json and the plots to
  out_dir; return the summary."""
  arms = group_runs([read_run(d) for d in expand_run_dirs(run_dirs)])
  if reference is not None and reference not in arms:
    raise ValueError(f"reference arm {reference!r} is not among the arms {list(arms)}")
  summary = summarize(arms, threshold, compute, reference)
  os.makedirs(out_dir, exist_ok=True)
  summary["plots"] = [plot_mean_curves(arms, os.path.join(out_dir, "curves_step.png"), "iteration"),
                      plot_mean_curves(arms, os.path.join(out_dir, f"curves_{compute}.png"), compute)]
  diag_plot = plot_diag_curves(arms, os.path.join(out_dir, "diag.png"))
  if diag_plot:
    summary["plots"].append(diag_plot)
  summary["runs"] = {arm: [r.path for r in rs] for arm, rs in arms.items()}
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(markdown_table(summary))
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(json_ready(summary), f, indent=1)
  return summary


def json_ready(x):
  """NaN -> None (JSON has no NaN), tuples -> lists, numpy scalars -> Python."""
  if isinstance(x, dict):
    return {k: json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_ready(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if np.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("run_dirs", nargs="+", help="run directories (<arm>-s<seed> names group into arms) or sweep roots")
  ap.add_argument("--out", required=True, help="directory for results.md, results.json and PNGs")
  ap.add_argument("--threshold", type=float, default=0.5, help="held-out pass@1 to count steps / compute to")
  ap.add_argument("--compute", default="rollout_tokens", choices=COMPUTE_AXES)
  ap.add_argument("--reference", default=None, help="arm for the paired difference of final pass@1")
  args = ap.parse_args(argv)
  summary = analyze(args.run_dirs, args.out, args.threshold, args.compute, args.reference)
  with open(os.path.join(args.out, "results.md")) as f:
    print(f.read())
  return summary


if __name__ == "__main__":
  main()
