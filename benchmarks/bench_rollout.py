"""Rollout at long-tailed lengths: the paged engine (continuous batching) vs the static sampler.

--mode budgets (issue 20's scheduling target): a random model (default the 27M shape: hidden 512, 8 layers,
8 heads / 8 KV, MLP 1536, vocab 1024), `--requests` prompts of 16-48 tokens, per-request budgets drawn with a
fixed seed from a long-tailed (log-normal) distribution scaled to mean `--mean`, capped at `--max`, and no
stop ids, so every length is exact. The static sampler runs one batch to the largest budget (it has one
budget); only each request's own budget of tokens counts as useful for either. Both run in one process,
taking turns, after a warm-up call each (the compiles); medians.

--mode live: the same completions under two budgets. A random 2-layer model (vocab 128, hidden 128) whose
rows stop on their own (on token 1), 64 rows; useful tokens/s under --budgets (default 1024 and 4096), and
the fraction of row-steps that produced a kept token, for both engines.

  python benchmarks/bench_rollout.py --mode budgets [--requests 256 --mean 256 --max 2048 --slots 64 --runs 2]
  python benchmarks/bench_rollout.py --mode live [--budgets 1024 4096]

--mode memory (compile only, no run): Qwen2.5-0.5B shapes in f32, --slots 256 rows, a 16k budget. The paged
decode program with a pool sized for --live_tokens (4096) live tokens a slot on average, against the static
sampler's program for the same 256 rows and budget: argument (the KV pool / nothing), temp and output bytes
from XLA's memory_analysis().

  python benchmarks/bench_rollout.py --mode memory [--slots 256 --budget 16384 --live_tokens 4096]

--mode sync: the paged engine alone on the budgets workload with each k of --ks (decode steps between two
host checks), taking turns. --mode layout (compile only, 8 fake CPU devices): Qwen2.5-0.5B shapes in f32,
the static sampler and the paged burst for --slots rows and a --layout_budget budget, with the weights in
the trainer's layout and in the decode layout, on fsdp=8 and fsdp=4 x tensor=2: weight all-gathers in the
compiled HLO, per-device weight, KV and temp bytes.

  python benchmarks/bench_rollout.py --mode sync --requests 128 --mean 64 --max 512 [--ks 1 4 8 16 32]
  python benchmarks/bench_rollout.py --mode layout --slots 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def long_tailed_budgets(n: int, mean: float, cap: int, seed: int = 0):
  import numpy as np
  rs = np.random.RandomState(seed)
  x = rs.lognormal(0.0, 1.0, n)
  b = np.clip(np.round(x / x.mean() * mean), 1, cap).astype(int)
  return b.tolist()


def _model(hidden, layers, heads, kv, mlp, vocab, scale):
  import jax
  from cispo_jax.model import ModelConfig, init_params
  cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv, head_dim=hidden // heads, qkv_bias=True)
  params = init_params(cfg, jax.random.PRNGKey(0))
  return cfg, jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, params)


def _static(params, cfg, prompts, key, sc):
  import jax
  import numpy as np
  from cispo_jax.rollout import sampling
  W = max(map(len, prompts))
  tok, mask = np.zeros((len(prompts), W), np.int32), np.zeros((len(prompts), W), np.int32)
  for i, p in enumerate(prompts):
    tok[i, W - len(p):], mask[i, W - len(p):] = p, 1
  return jax.block_until_ready(sampling.generate(params, cfg, tok, mask, key, sc))


def budgets_mode(args):
  import jax
  import numpy as np
  from cispo_jax.rollout.paged import PagedConfig, generate_paged
  from cispo_jax.rollout.sampling import SamplingConfig

  cfg, params = _model(512, 8, 8, 8, 1536, 1024, 1.0)
  rs = np.random.RandomState(1)
  prompts = [rs.randint(2, cfg.vocab_size, rs.randint(16, 49)).tolist() for _ in range(args.requests)]
  budgets = long_tailed_budgets(args.requests, args.mean, args.max)
  useful = sum(budgets)
  sc = SamplingConfig(max_new_tokens=max(budgets), stop_token_ids=(), prompt_buckets=(64,), num_samples=1)
  paged = PagedConfig(num_slots=args.slots, page_size=args.page_size, steps_per_sync=args.k)
  key = jax.random.PRNGKey(0)
  print(f"{args.requests} requests, budgets mean {np.mean(budgets):.0f} median {np.median(budgets):.0f} "
        f"max {max(budgets)}; {useful} useful tokens; static batch to {max(budgets)}; paged {paged}")
  run_static = lambda: _static(params, cfg, prompts, key, sc)  # noqa: E731
  run_paged = lambda: generate_paged(params, cfg, prompts, key, sc, paged, budgets=budgets)  # noqa: E731
  _time(run_static), _time(run_paged)  # the compiles
  ts, tp = [], []
  for _ in range(args.runs):
    ts.append(_time(run_static))
    tp.append(_time(run_paged))
  _, stats = run_paged()
  s, p = statistics.median(ts), statistics.median(tp)
  print(f"static: {s:.1f} s, {useful / s:.0f} useful tokens/s; paged: {p:.1f} s, {useful / p:.0f} useful tokens/s; "
        f"paged / static = {s / p:.2f}x; paged row-steps useful {stats['useful_row_steps'] / stats['row_steps']:.1%}, "
        f"static {useful / (args.requests * max(budgets)):.1%}; peak pages {stats['peak_used']} of {stats['num_pages']}; "
        f"{stats['burst_shapes']} burst programs")


def live_mode(args):
  import jax
  import numpy as np
  from cispo_jax.rollout.paged import PagedConfig, generate_paged
  from cispo_jax.rollout.sampling import SamplingConfig

  cfg, params = _model(128, 2, 4, 2, 256, 128, 1.0)
  rs = np.random.RandomState(0)
  prompts = [rs.randint(2, cfg.vocab_size, 8).tolist() for _ in range(64)]
  key = jax.random.PRNGKey(3)
  for budget in args.budgets:
    sc = SamplingConfig(max_new_tokens=budget, stop_token_ids=(1,), prompt_buckets=(8,), num_samples=1)
    paged = PagedConfig(num_slots=args.slots, page_size=args.page_size, steps_per_sync=args.k)
    run_static = lambda: _static(params, cfg, prompts, key, sc)  # noqa: E731
    run_paged = lambda: generate_paged(params, cfg, prompts, key, sc, paged)  # noqa: E731
    out_s, (out_p, stats) = run_static(), run_paged()
    ts, tp = [], []
    for _ in range(args.runs):  # taking turns
      ts.append(_time(run_static))
      tp.append(_time(run_paged))
    ts, tp = statistics.median(ts), statistics.median(tp)
    # the engines key their randomness differently (paged: per prompt, sample and position), so each
    # draws its own completions: each is credited with its own tokens
    n_s, n_p = int(np.asarray(out_s.lengths_B).sum()), int(out_p.lengths_B.sum())
    steps = int(np.asarray(out_s.lengths_B).max())
    print(f"budget {budget}: static {n_s} tokens (mean {n_s / 64:.0f}, longest {steps}), {n_s / ts:.0f} tokens/s, "
          f"row-steps useful {n_s / (64 * steps):.1%}; paged {n_p} tokens (longest {int(out_p.lengths_B.max())}), "
          f"{n_p / tp:.0f} tokens/s, row-steps useful {stats['useful_row_steps'] / stats['row_steps']:.1%}")


def memory_mode(args):
  import dataclasses

  import jax
  import jax.numpy as jnp
  from cispo_jax.model import param_shapes
  from cispo_jax.rollout import sampling
  from cispo_jax.rollout.paged import step
  from cispo_jax.scale.memory import QWEN25

  # float32 (see layout_mode: XLA:CPU's bf16 dots would add a hoisted f32 copy of the weights to temp)
  cfg = dataclasses.replace(QWEN25["0.5B"], dtype="float32", param_dtype="float32", remat=False)
  params = param_shapes(cfg)
  S, ps, N = args.slots, args.page_size, args.budget
  pages = 1 + S * args.live_tokens // ps
  pool = jax.eval_shape(lambda: step.init_pool(cfg, pages, ps))
  M = -(-(N + 128) // ps)  # the worst burst: some slot at its full budget after a 128-token prompt
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  state = {"token": i32(S), "pos": i32(S), "t": i32(S), "active": jax.ShapeDtypeStruct((S,), bool),
           "budget": i32(S), "key": jax.ShapeDtypeStruct((S, 2), jnp.uint32), "table": i32(S, M), "recent": i32(S, 1)}
  sc = sampling.SamplingConfig(max_new_tokens=N, temperature=1.0, stop_token_ids=(1,), prompt_buckets=(128,))
  gib = 2 ** 30
  paged = step.decode_burst.lower(params, pool, state, cfg=cfg, scfg=sc, steps=args.k).compile().memory_analysis()
  pool_b = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pool))
  print(f"paged: pool {pages} pages x {ps} = {pages * ps / S:.0f} live tokens a slot on average: {pool_b / gib:.2f} GiB; "
        f"decode program temp {paged.temp_size_in_bytes / gib:.2f} GiB (a burst whose longest row holds {M} pages, "
        f"read 2048 positions a slot at a time, one layer at a time), arguments {paged.argument_size_in_bytes / gib:.2f} GiB")
  core = jax.jit(lambda p, t, m, r: sampling._generate_core(p, t, m, r, model_cfg=cfg, cfg=sc, share_prefill=False,
                                                             sharding=None))
  static = core.lower(params, i32(S, 128), i32(S, 128), jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
  mem = static.memory_analysis()
  print(f"static: decode program temp {mem.temp_size_in_bytes / gib:.2f} GiB (its KV cache is "
        f"[{cfg.num_layers}, {S}, {128 + N - 1}, {cfg.num_kv_heads}, {cfg.head_dim}] x 2, sized by the budget), "
        f"arguments {mem.argument_size_in_bytes / gib:.2f} GiB")


def sync_mode(args):
  """The paged engine alone on the budgets workload, for each k (decode steps between host checks)."""
  import jax
  import numpy as np
  from cispo_jax.rollout.paged import PagedConfig, generate_paged
  from cispo_jax.rollout.sampling import SamplingConfig

  cfg, params = _model(512, 8, 8, 8, 1536, 1024, 1.0)
  rs = np.random.RandomState(1)
  prompts = [rs.randint(2, cfg.vocab_size, rs.randint(16, 49)).tolist() for _ in range(args.requests)]
  budgets = long_tailed_budgets(args.requests, args.mean, args.max)
  sc = SamplingConfig(max_new_tokens=max(budgets), stop_token_ids=(), prompt_buckets=(64,), num_samples=1)
  key = jax.random.PRNGKey(0)
  print(f"{args.requests} requests, budgets mean {np.mean(budgets):.0f} max {max(budgets)}, {args.slots} slots")
  runs = {k: (lambda k=k: generate_paged(params, cfg, prompts, key, sc, PagedConfig(
      num_slots=args.slots, page_size=args.page_size, steps_per_sync=k), budgets=budgets)) for k in args.ks}
  for run in runs.values():
    run()  # the compiles
  times = {k: [] for k in runs}
  for _ in range(args.runs):  # taking turns
    for k, run in runs.items():
      times[k].append(_time(run))
  for k, run in runs.items():
    stats = run()[1]
    t = statistics.median(times[k])
    print(f"k={k}: {t:.1f} s, {sum(budgets) / t:.0f} tokens/s, {stats['bursts']} host checks, "
          f"row-steps useful {stats['useful_row_steps'] / stats['row_steps']:.1%}, "
          f"{stats['burst_shapes']} burst programs")


def layout_mode(args):
  """Compile only, 8 fake CPU devices: each decode program in the trainer's layout and the decode layout."""
  import dataclasses

  from cispo_jax import sharding
  from cispo_jax.scale.decode import compiled_decode
  from cispo_jax.scale.memory import QWEN25

  # float32: XLA:CPU computes bf16 dots in f32 and hoists the weights' conversion out of the decode loop (a
  # whole f32 copy, in temp), which GPUs and TPUs do not; in f32 the temp bytes are the program's own
  cfg = dataclasses.replace(QWEN25["0.5B"], dtype="float32", param_dtype="float32", remat=False)
  mib = 2 ** 20
  print("| program | mesh | weights in | weight all-gathers (in a loop) | weights / device | KV / device | temp |")
  print("|---|---|---|---|---|---|---|")
  for mesh_cfg in (sharding.MeshConfig(fsdp=8), sharding.MeshConfig(fsdp=4, tensor=2)):
    mesh = sharding.make_mesh(mesh_cfg)
    name = ",".join(f"{a}={n}" for a, n in sharding.axis_sizes(mesh).items() if n > 1)
    for program in ("static", "paged"):
      for layout in ("train", "decode"):
        r = compiled_decode(program, cfg, mesh, layout=layout, slots=args.slots, prompt_len=128,
                            budget=args.layout_budget, max_pages=-(-(128 + args.layout_budget) // 16))
        print(f"| {program} | {name} | {layout} | {len(r.weight_gathers)} ({r.gathers_in_loop}) | "
              f"{r.weights / mib:.0f} MiB | {r.kv / mib:.0f} MiB | {r.temp / mib:.0f} MiB |", flush=True)


def _time(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mode", choices=("budgets", "live", "memory", "sync", "layout"), default="budgets")
  ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="sync mode: the k to compare")
  ap.add_argument("--layout_budget", type=int, default=1024)
  ap.add_argument("--budget", type=int, default=16384)
  ap.add_argument("--live_tokens", type=int, default=4096)
  ap.add_argument("--requests", type=int, default=256)
  ap.add_argument("--mean", type=float, default=256)
  ap.add_argument("--max", type=int, default=2048)
  ap.add_argument("--slots", type=int, default=64)
  ap.add_argument("--page_size", type=int, default=16)
  ap.add_argument("--k", type=int, default=8, help="decode steps between host checks")
  ap.add_argument("--runs", type=int, default=2)
  ap.add_argument("--budgets", type=int, nargs="+", default=[1024, 4096])
  args = ap.parse_args()
  if args.mode == "layout":  # before jax is imported
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  {"budgets": budgets_mode, "live": live_mode, "memory": memory_mode, "sync": sync_mode,
   "layout": layout_mode}[args.mode](args)


if __name__ == "__main__":
  main()
