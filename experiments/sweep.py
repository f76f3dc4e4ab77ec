"""Run an ablation: each gin file (x each seed) as its own `python -m cispo_jax.train`, then a table.

    python experiments/sweep.py experiments/cispo.gin experiments/grpo.gin --seeds 0 1 \
        --out experiments/results/loss_types.md [--gin_param RLConfig.total_steps=40 ...]

Runs go one after another (the machine's cores belong to one run); each writes its run dir under
runs/sweep/<name>-s<seed>/, and a run already finished there (summary.json) is not redone, so an
interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def run_one(gin_file: str, seed: int, extra: list[str], root: str) -> dict:
  name = os.path.splitext(os.path.basename(gin_file))[0]
  run_dir = os.path.join(root, f"{name}-s{seed}")
  summary_path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(summary_path):
    cmd = [sys.executable, "-m", "cispo_jax.train", "--gin_file", gin_file, "--seed", str(seed),
           "--run_dir", run_dir] + [f"--gin_param={b}" for b in extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
  with open(summary_path) as f:
    return {"name": name, "seed": seed, **json.load(f)}


def table(rows: list[dict]) -> str:
  by_name: dict[str, list[dict]] = {}
  for r in rows:
    by_name.setdefault(r["name"], []).append(r)
  lines = ["| config | seeds | eval pass@1 start | eval pass@1 end | gain (points) | minutes |",
           "|---|---|---|---|---|---|"]
  for name, rs in by_name.items():
    start = statistics.mean(r["eval_start"] for r in rs)
    ends = [r["eval_end"] for r in rs]
    spread = f" ± {statistics.stdev(ends):.3f}" if len(ends) > 1 else ""
    gain = 100 * (statistics.mean(ends) - start)
    mins = statistics.mean(r["seconds"] for r in rs) / 60
    lines.append(f"| {name} | {len(rs)} | {start:.3f} | {statistics.mean(ends):.3f}{spread} | {gain:+.1f} | {mins:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("gin_files", nargs="+")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0])
  ap.add_argument("--gin_param", action="append", default=[], help="binding added to every run")
  ap.add_argument("--root", default="runs/sweep")
  ap.add_argument("--out", default=None, help="write the markdown table here too")
  args = ap.parse_args(argv)
  for f in args.gin_files:
    if not os.path.exists(f):
      raise SystemExit(f"sweep: no gin file {f}")
  rows = [run_one(f, s, args.gin_param, args.root) for f in args.gin_files for s in args.seeds]
  text = table(rows)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
