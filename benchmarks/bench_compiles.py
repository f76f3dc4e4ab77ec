"""How many update programs a run can compile, per completion budget: every (rows, width) bucket the update
planner can return (rl/update_plan.update_shapes), on the fine ladder (the planner before coarse buckets) and
with the buckets UpdateConfig gives that budget (coarse from coarse_buckets_from = 1024 positions on). The
row gather and the old / reference forwards compile one program per bucket likewise; each count is per
prompt bucket. Host only, no devices.

  python benchmarks/bench_compiles.py [--prompts 64] [--generations 8] [--minibatches 1] [--quantum 1]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
  from cispo_jax.rl.config import UpdateConfig
  from cispo_jax.rl.update_plan import Buckets, update_shapes

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--prompts", type=int, default=64, help="RLConfig.prompts_per_step (default.gin: 64)")
  p.add_argument("--generations", type=int, default=8, help="RolloutConfig.num_generations")
  p.add_argument("--minibatches", type=int, default=1, help="UpdateConfig.num_minibatches")
  p.add_argument("--quantum", type=int, default=1, help="the group quantum (1 on one device, micro_batches 1)")
  p.add_argument("--budgets", type=int, nargs="+", default=[24, 1024, 8192], help="RolloutConfig.max_new_tokens")
  args = p.parse_args()
  up = UpdateConfig(num_minibatches=args.minibatches)
  print(f"prompts_per_step={args.prompts} num_generations={args.generations} num_minibatches={args.minibatches} "
        f"quantum={args.quantum}, compact_groups and trim_completions on")
  print(f"{'max_new_tokens':>14} {'fine ladder':>12} {'now':>5}  buckets now (rows x widths)")
  for budget in args.budgets:
    common = dict(groups=args.prompts, num_generations=args.generations, num_minibatches=args.minibatches,
                  quantum=args.quantum, width=budget, compact=True, trim=True)
    fine = update_shapes(**common, buckets=Buckets())
    now = update_shapes(**common, buckets=Buckets.for_run(up, budget))
    rows, widths = sorted({r for r, _ in now}), sorted({w for _, w in now})
    print(f"{budget:>14} {len(fine):>12} {len(now):>5}  {rows} x {widths}")


if __name__ == "__main__":
  main()
