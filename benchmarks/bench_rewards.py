"""Reward scoring of one default-run batch: 1 worker against the default worker count, warm.

The batch is the default run's (cispo_jax/config/default.gin): 64 prompts x 8 completions = 512 completions
of 2-digit addition (data.ArithmeticTask, max_operand 99, '+'), scored by final_numeric, the run's reward.
The completions look like the bootstrapped model's (<= 24 characters): a worked solution ("8+7=15,6+1+1=8:85")
or a bare answer, one in three wrong. Each scorer is a rewards.RewardScorer as task.Scorer builds it
(process isolation, the default timeouts); all are booted and scored once before timing, then timed in
alternation (round r times every arm once, in a rotated order) so that drift on a shared machine hits the
arms alike. Arms:
  1           workers=1: one worker scores the whole batch (the code before reward_workers)
  W           workers=0 (one per core, at most scoring.MAX_AUTO_WORKERS; --workers sets W), split as the
              default does: only while the previous batch cost >= scoring.SPLIT_MIN_ITEM_S per item
  W-forced    the same workers, every batch split W ways (SPLIT_MIN_ITEM_S = 0), which is what a pool
              without that rule would do
--reward_ms adds a reward that sleeps that long per item (a stand-in for a slow verifier such as math-verify's
sympy) to see what the split buys when rewards cost more than their messages.

  python benchmarks/bench_rewards.py                   # the default run's batch
  python benchmarks/bench_rewards.py --reward_ms 2     # a slow verifier
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

from cispo_jax.data import make_task
from cispo_jax.rewards import RewardConfig, RewardScorer
from cispo_jax.rewards import scoring


def default_batch(prompts: int = 64, n: int = 8, seed: int = 0):
  """(completions, examples) of one default-run rollout: `prompts` x `n` completions, a third wrong."""
  examples = list(make_task("arithmetic", prompts, seed=seed, split="train", max_operand=99, ops="+"))
  completions, rows = [], []
  for i, ex in enumerate(examples):
    for j in range(n):
      answer = ex.answer if (i + j) % 3 else str(int(ex.answer) + 1)
      completions.append(ex.meta["scratchpad"].rsplit(":", 1)[0] + ":" + answer if j % 2 else answer)
      rows.append(ex)
  return completions, rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--prompts", type=int, default=64)
  parser.add_argument("--n", type=int, default=8)
  parser.add_argument("--reward_ms", type=float, default=0.0, help="add a reward sleeping this long per item")
  parser.add_argument("--workers", type=int, default=0, help="the pool's size (0 = by cores, the default)")
  args = parser.parse_args(argv)
  completions, examples = default_batch(args.prompts, args.n)
  rewards = (("final_numeric", 1.0),)
  if args.reward_ms:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the worker imports bench_rewards:sleepy
    rewards += (("bench_rewards:sleepy", 0.0),)
    examples = [dataclasses.replace(e, meta={**e.meta, "sleep_s": args.reward_ms / 1e3}) for e in examples]
  workers = scoring.resolve_workers(args.workers)
  default_split = scoring.SPLIT_MIN_ITEM_S
  arms = {"1": (1, default_split), f"{workers}": (workers, default_split), f"{workers}-forced": (workers, 0.0)}
  scorers = {name: RewardScorer(RewardConfig(rewards, workers=w)) for name, (w, _) in arms.items()}
  try:
    for s in scorers.values():
      s.start()
    reference = None
    for name, s in scorers.items():  # warm: booted, rewards imported, one batch each; all arms agree
      scoring.SPLIT_MIN_ITEM_S = arms[name][1]
      out, stats = s.score(completions, examples)
      assert stats["failed_rows"] == 0, stats
      reference = out if reference is None else reference
      assert (out == reference).all(), name
    times = {name: [] for name in scorers}
    names = list(scorers)
    for r in range(args.rounds):
      for name in names[r % len(names):] + names[:r % len(names)]:
        scoring.SPLIT_MIN_ITEM_S = arms[name][1]
        t0 = time.perf_counter()
        scorers[name].score(completions, examples)
        times[name].append(time.perf_counter() - t0)
  finally:
    scoring.SPLIT_MIN_ITEM_S = default_split
    for s in scorers.values():
      s.close()
  base = statistics.median(times["1"])
  print(f"{len(completions)} completions, rewards {[n for n, _ in rewards]}, {args.rounds} rounds, "
        f"pool of {workers} workers, SPLIT_MIN_ITEM_S = {default_split * 1e6:g} us")
  for name, ts in times.items():
    med, s = statistics.median(ts), scorers[name]
    used = len(scoring.shards(len(completions), len(s.runners) if s.item_s >= arms[name][1] else 1))
    print(f"  workers {name:>10}: median {med * 1e3:8.2f} ms  min {min(ts) * 1e3:8.2f} ms  "
          f"median / 1 worker = {med / base:.3f}  (last batch: {s.item_s * 1e6:.1f} us/item, {used} used)")


def sleepy(completion, example):
  """The --reward_ms stand-in for a slow verifier: sleeps example.meta['sleep_s'], returns 0."""
  time.sleep(example.meta.get("sleep_s", 0.0))
  return 0.0


if __name__ == "__main__":
  main()
