"""How much of the time rollouts and updates run at once: the pipelined loop against the synchronous one.

Runs the default experiment's config (bootstrap model, 64 prompts x 8, 24 new tokens, CISPO) for a few
iterations in three layouts on 8 devices (fake CPU devices here, XLA_FLAGS set below):

  sync        colocated, max_staleness 0: sample on all 8, then update on all 8 (today's loop)
  split-s0    rollout_devices=4 (FSDP over 4), train on the other 4, max_staleness 0: lock-step
  split-s2    the same with max_staleness 2: rollouts of version k train at version k + 2

From the trainer's timestamps (each rollout made: sampling + scoring + behaviour log-probs, on the rollout
thread; each update: dispatch to finish) it prints, over the timed iterations (after --warmup), the
fraction of wall time the rollout side was busy, the update side was busy, and both at once. On fake
CPU devices both sides share the same 2 cores, so "both busy" is the figure that says the overlap
happens; a speed-up needs real devices.

  python benchmarks/bench_pipeline.py [--iterations 6 --warmup 2] [--layouts sync,split-s0,split-s2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("CISPO_JAX_COMPILATION_CACHE", "")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LAYOUTS = {"sync": dict(), "split-s0": dict(rollout_devices=4), "split-s2": dict(rollout_devices=4, max_staleness=2)}


def union(intervals):
  out = []
  for a, b in sorted(intervals):
    if out and a <= out[-1][1]:
      out[-1] = (out[-1][0], max(out[-1][1], b))
    else:
      out.append((a, b))
  return out


def clip(intervals, lo, hi):
  return [(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi]


def length(intervals):
  return sum(b - a for a, b in intervals)


def intersect(xs, ys):
  out, i, j = [], 0, 0
  while i < len(xs) and j < len(ys):
    a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
    if a < b:
      out.append((a, b))
    if xs[i][1] < ys[j][1]:
      i += 1
    else:
      j += 1
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--iterations", type=int, default=6)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--layouts", default="sync,split-s0,split-s2")
  args = ap.parse_args()

  import jax
  from cispo_jax import cli
  from cispo_jax.bootstrap import bootstrap_model
  from cispo_jax.trainer import Trainer

  configs = cli.parse_args([])
  model_dir = bootstrap_model(configs["TaskConfig"], configs["BootstrapConfig"])
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, {os.cpu_count()} cores; "
        f"default config, {args.iterations} iterations after {args.warmup} warm-up; model {model_dir}")
  print("| layout | s/iteration | rollout side busy | update side busy | both busy | staleness |")
  print("|---|---|---|---|---|---|")
  for name in args.layouts.split(","):
    with tempfile.TemporaryDirectory() as tmp:
      rl = configs["RLConfig"].replace(model_dir=model_dir, run_dir=tmp, export_final=False,
                                       total_steps=args.warmup + args.iterations, eval_every=10 ** 6,
                                       save_every=10 ** 6, **LAYOUTS[name])
      trainer = Trainer(rl, configs["LossConfig"], configs["OptimConfig"], configs["MeshConfig"], configs["TaskConfig"])
      staleness = []
      try:
        for _ in range(args.warmup):
          trainer.step()
        t0 = time.perf_counter()
        for _ in range(args.iterations):
          staleness.append(trainer.step().get("pipeline/staleness", 0.0))
        t1 = time.perf_counter()
      finally:
        trainer.close()
      roll = clip(union(trainer.rollout_intervals), t0, t1)
      upd = clip(union(trainer.update_intervals), t0, t1)
      wall = t1 - t0
      both = length(intersect(roll, upd))
      print(f"| {name} | {wall / args.iterations:.2f} | {100 * length(roll) / wall:.0f}% | "
            f"{100 * length(upd) / wall:.0f}% | {100 * both / wall:.0f}% | "
            f"{min(staleness):.0f}-{max(staleness):.0f} |", flush=True)


if __name__ == "__main__":
  main()
