"""How close the training update and the sampler run to this machine's matmul peak.

The update is the trainer's program: `cispo_jax.rl.train_step.update_on_rollout`, jitted with the
state donated, CISPO loss, AdamW with global-norm clipping (`cispo_jax.rl.optim.make_optimizer`),
num_iterations=2, num_minibatches=1, micro_batches=1, float32. The batch is 64 sequences of a
left-padded 16-token prompt (12-16 real tokens) + 32 completion tokens, 8 completions a prompt,
old log-probs from the model itself (as the trainer computes them). The sampler is
`cispo_jax.rollout.sampling`'s compiled program (prefill + while-loop decode, no stop token, so every
one of the 32 decode steps runs) at batch 64.

Models (random weights, Qwen2 layout, the 86-token character vocabulary of cispo_jax.model.tiny):
  3m:  hidden 256, 4 layers, 4 heads / 2 KV heads (head_dim 64), MLP 768   (3.2M params)
  27m: hidden 512, 8 layers, 8 heads / 8 KV heads (head_dim 64), MLP 1536  (27M params)

FLOPs are analytic (multiply-add = 2), counted as the programs execute them:
  update forward  = 2 * W * B * L                     W: non-embedding matmul weights (q, k, v, o,
                  + 2 * E * V * B * N                    gate, up, down; biases/norms not counted)
                  + layers * 4 * B * L * L * H * D     attention q.k and p.v over the full L x L
                                                         square (the dense path computes it all)
  update          = steps * 3 * forward                backward = 2 x forward; steps = 2
  sampler         = prefill: 2 * W * B * (P - 1) + layers * 4 * B * (P - 1) * S * H * D
                  + decode:  N * (2 * (W + E * V) * B + layers * 4 * B * S * H * D)
with B sequences of L = P + N tokens (P prompt bucket, N completion), E hidden, V vocab, H heads,
D head_dim, S = P + N - 1 cache slots (dense attention reads all of them every step).

The peak is measured in the same process: a jitted f32 square matmul (1024^3 and 2048^3, 5 calls
each) before and after the timed runs. A median run time is set against the median of those 20
rates, a best run time against the best one (this 2-core machine, quiet: ~260-300 / ~290-335).

A/B against another version of the model code: `--against REV` loads cispo_jax/model/transformer.py
as it is at git revision REV (e.g. HEAD; or a .py file; repeatable) and times each against the
working tree in the same process, alternating call by call (each variant has its own state and
params, in its own parameter layout), so machine load hits both alike; it prints medians, bests
and the ratios (on a shared machine the best of N is the steadier figure).

`--profile DIR` writes a jax.profiler trace of a few calls per variant and program and prints the
share of the traced op time per op type (matmuls, layout copies/transposes, slices, elementwise
fusions) and the top ops. XLA:CPU traces each thunk; YNNPACK GEMMs (`ynn_fusion`) are timed in
full, but Eigen GEMMs (`dot`: XLA:CPU gives Eigen the GEMMs whose left operand is transposed, i.e.
the weight gradients) return before their work is done, so that work is in no event: the shares
are of the traced time, which is printed next to 2 threads x wall.

  python benchmarks/bench_update.py --model 27m [--runs 7] [--what update,sampler]
  python benchmarks/bench_update.py --model 3m --against HEAD --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import gzip
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

MODELS = {
    "3m": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768),
    "27m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1536),
}
BATCH, PROMPT, NEW, GROUP = 64, 16, 32, 8


# ----------------------------------------------------------------------------- model variants


def load_transformer_at(rev: str):
  """cispo_jax/model/transformer.py as of git revision `rev` (or the .py file `rev`), as a separate module."""
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
  if rev.endswith(".py") and os.path.isfile(rev):
    with open(rev) as f:
      src = f.read()
  else:
    src = subprocess.run(["git", "show", f"{rev}:cispo_jax/model/transformer.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
  name = f"cispo_jax.model._transformer_at_{len(sys.modules)}"
  spec = importlib.util.spec_from_loader(name, loader=None)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod  # before exec: dataclasses look their module up while the classes are built
  exec(compile(src, rev, "exec"), mod.__dict__)
  return mod


@contextlib.contextmanager
def model_code(mod):
  """Trace the trainer's and sampler's programs with the model functions of `mod`."""
  from cispo_jax.rollout import sampling
  from cispo_jax.rl import train_step
  saved = [(m, k, getattr(m, k)) for m, k in ((train_step, "hidden_states"), (train_step, "lm_head"),
                                              (sampling, "forward"), (sampling, "init_cache"))]
  for m, k, _ in saved:
    setattr(m, k, getattr(mod, k))
  try:
    yield
  finally:
    for m, k, v in saved:
      setattr(m, k, v)


def random_params(mod, cfg, seed):
  """N(0, 0.02) kernels, unit norm scales, zero biases, in `mod`'s parameter layout (numpy draws)."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "scale":
      return jnp.ones(s.shape, s.dtype)
    if name.endswith("bias"):
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray((0.02 * rng.standard_normal(s.shape)).astype(np.float32), s.dtype)

  return jax.tree_util.tree_map_with_path(draw, mod.param_shapes(cfg))


# ----------------------------------------------------------------------------- FLOPs, peak


def matmul_weights(cfg) -> int:
  E, F, H, K, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  return cfg.num_layers * (E * (H + 2 * K) * D + H * D * E + 3 * E * F)


def update_flops(cfg, B, P, N, steps) -> float:
  L = P + N
  W, E, V = matmul_weights(cfg), cfg.hidden_size, cfg.vocab_size
  attn = cfg.num_layers * 4 * B * L * L * cfg.num_heads * cfg.head_dim
  return steps * 3 * (2 * W * B * L + 2 * E * V * B * N + attn)


def sampler_flops(cfg, B, P, N) -> float:
  S = P + N - 1
  W, E, V, HD = matmul_weights(cfg), cfg.hidden_size, cfg.vocab_size, cfg.num_heads * cfg.head_dim
  prefill = 2 * W * B * (P - 1) + cfg.num_layers * 4 * B * (P - 1) * S * HD
  decode = N * (2 * (W + E * V) * B + cfg.num_layers * 4 * B * S * HD)
  return prefill + decode


def matmul_rates(reps: int = 5) -> list[float]:
  """GFLOP/s of `reps` calls each of a jitted float32 square matmul, 1024^3 and 2048^3."""
  rates = []
  for n in (1024, 2048):
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    for _ in range(reps):
      t0 = time.perf_counter()
      f(a, a).block_until_ready()
      rates.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
  return rates


# ----------------------------------------------------------------------------- programs


def rollout_batch(cfg, seed=0, B=BATCH, P=PROMPT, N=NEW, group=GROUP, min_prompt=12):
  """B rows of a left-padded prompt (min_prompt..P real tokens) + N completion positions (N/2..N real),
  random tokens and advantages, grouped by `group`; old log-probs to be filled in by the caller."""
  from cispo_jax.rl.train_step import RolloutBatch
  rng = np.random.default_rng(seed)
  V = cfg.vocab_size
  plen = rng.integers(min_prompt, P + 1, B)
  pmask = (np.arange(P)[None, :] >= P - plen[:, None]).astype(np.int32)
  clen = rng.integers(N // 2, N + 1, B)
  cmask = (np.arange(N)[None, :] < clen[:, None]).astype(np.int32)
  tokens = np.where(np.concatenate([pmask, np.ones((B, N), np.int32)], 1) > 0,
                    rng.integers(3, V, (B, P + N)), 0).astype(np.int32)
  adv = np.repeat(rng.standard_normal(B).astype(np.float32)[:, None], N, 1)
  return RolloutBatch(
      tokens_BxL=jnp.asarray(tokens), kv_valid_BxL=jnp.asarray(np.concatenate([pmask, cmask], 1) > 0),
      mask_BxN=jnp.asarray(cmask, jnp.float32), old_logps_BxN=jnp.zeros((B, N), jnp.float32),
      ref_logps_BxN=jnp.zeros((B, N), jnp.float32), adv_BxN=jnp.asarray(adv),
      group_ids_B=jnp.asarray(np.arange(B) // group, jnp.int32))


class Variant:
  """One version of the model code: its params, its compiled update and sampler."""

  def __init__(self, name, mod, cfg, what, seed=0):
    from cispo_jax.rl import losses
    from cispo_jax.rollout import sampling
    from cispo_jax.rl.optim import OptimConfig, make_optimizer
    from cispo_jax.model.logprobs import completion_logps
    from cispo_jax.rl.train_step import StepConfig, TrainState, update_on_rollout

    self.name, self.mod, self.cfg = name, mod, cfg
    params = random_params(mod, cfg, seed)
    t0 = time.perf_counter()
    with model_code(mod):
      if "update" in what:
        loss = losses.LossConfig(loss_type="cispo", max_completion_length=NEW).resolved()
        step_cfg = StepConfig(model=cfg, loss=loss, temperature=1.0, micro_batches=1,
                              num_generations=GROUP, use_ref=False)
        tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-5), 1000)
        batch = rollout_batch(cfg, seed)
        logps = jax.jit(lambda p, b: completion_logps(p, cfg, b.tokens_BxL, b.kv_valid_BxL, NEW, 1.0)[0])
        self.batch = batch._replace(old_logps_BxN=logps(params, batch))
        self.state = jax.jit(functools.partial(TrainState.create, tx=tx, seed=seed))(
            jax.tree.map(jnp.copy, params))
        update = jax.jit(functools.partial(update_on_rollout, cfg=step_cfg, tx=tx, schedule=schedule,
                                           num_iterations=2, num_minibatches=1), donate_argnums=0)
        self.update_fn = update.lower(self.state, self.batch).compile()
      if "sampler" in what:
        sc = sampling.SamplingConfig(max_new_tokens=NEW, temperature=1.0)
        rng = np.random.default_rng(seed + 1)
        plen = rng.integers(12, PROMPT + 1, BATCH)
        mask = (np.arange(PROMPT)[None, :] >= PROMPT - plen[:, None]).astype(np.int32)
        tokens = np.where(mask > 0, rng.integers(3, cfg.vocab_size, (BATCH, PROMPT)), 0).astype(np.int32)
        self.sample_args = (params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(seed))
        core = jax.jit(functools.partial(sampling._generate_core, model_cfg=cfg, cfg=sc, share_prefill=False,
                                         sharding=None))
        self.sample_fn = core.lower(*self.sample_args).compile()
    self.compile_s = time.perf_counter() - t0
    self.times = {"update": [], "sampler": []}

  def run_update(self):
    self.state, metrics = self.update_fn(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return metrics

  def run_sampler(self):
    return jax.block_until_ready(self.sample_fn(*self.sample_args).tokens_BxN)


# ----------------------------------------------------------------------------- profile


_CONTAINERS = {"cond", "conditional", "while", "call"}  # thunks that hold other thunks


def _op_kind(name: str) -> str:
  """Op type of an XLA:CPU thunk by its HLO name (fusion names list their ops)."""
  n = name.lower().split(".")[0]
  if n.startswith(("ynn", "dot", "convolution", "onednn")):  # YNNPACK / Eigen / oneDNN GEMMs
    return "matmul"
  if "copy" in n or "transpose" in n:
    return "layout (copy/transpose)"
  if any(k in n for k in ("slice", "concatenate", "pad", "gather", "scatter", "dynamic-update")):
    return "slice/concat/pad/gather"
  if "reduce" in n:
    return "reductions"
  return "elementwise fusions"


def trace_op_times(trace_file: str) -> dict[str, float]:
  """Microseconds per HLO op (thunk) in a perfetto trace written by jax.profiler (XLA:CPU).

  Counts the leaf thunks only: executor/wait events, Python frames and control-flow thunks that
  contain other thunks are skipped; thunks on both worker threads add up (op time, not wall).
  """
  with gzip.open(trace_file, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op: dict[str, float] = {}
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or "dur" not in e or not re.fullmatch(r"[A-Za-z_][\w\-]*(\.\d+)?", name):
      continue
    if name.split(".")[0] in _CONTAINERS:
      continue
    per_op[name] = per_op.get(name, 0.0) + e["dur"]
  return per_op


def print_shares(label: str, per_op: dict[str, float], calls: int, top: int = 10) -> dict[str, float]:
  total = sum(per_op.values())
  kinds: dict[str, float] = {}
  for name, t in per_op.items():
    kinds[_op_kind(name)] = kinds.get(_op_kind(name), 0.0) + t
  print(f"  profile {label}: {total / calls / 1e3:.1f} ms of op time per call (both threads)")
  for k, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
    print(f"    {k:26s} {100 * t / total:5.1f}%")
  print("    top ops:")
  for name, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
    print(f"      {100 * t / total:5.1f}%  {name}")
  return {k: t / total for k, t in kinds.items()}


def profile_shares(variant: Variant, out_dir: str, kind: str = "update", calls: int = 3):
  """Per-op-type shares of one program's op time (jax.profiler trace of `calls` calls)."""
  d = os.path.join(out_dir, f"{kind}_{re.sub(r'[^A-Za-z0-9_.-]', '_', variant.name)}")
  os.makedirs(d, exist_ok=True)
  run = variant.run_update if kind == "update" else variant.run_sampler
  with jax.profiler.trace(d, create_perfetto_trace=True):
    t0 = time.perf_counter()
    for _ in range(calls):
      run()
    wall = (time.perf_counter() - t0) / calls
  files = sorted(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
  if not files:
    print(f"  (no perfetto trace under {d})")
    return None
  per_op = trace_op_times(files[-1])
  traced_ms = sum(per_op.values()) / calls / 1e3
  print(f"  {kind} {variant.name}: {wall * 1e3:.0f} ms a call under the profiler; traced op time {traced_ms:.0f} ms"
        f" = {100 * traced_ms / (2e3 * wall):.0f}% of 2 threads x wall (the rest: Eigen GEMMs, which run untraced,"
        " and idle threads)")
  return print_shares(f"{kind} {variant.name} ({files[-1]})", per_op, calls)


# ----------------------------------------------------------------------------- main


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", choices=sorted(MODELS), default="27m")
  ap.add_argument("--what", default="update,sampler", help="comma list of update, sampler")
  ap.add_argument("--runs", type=int, default=7)
  ap.add_argument("--against", action="append", default=[],
                  help="git revision (or .py file) of transformer.py to time against (A/B); repeatable")
  ap.add_argument("--profile", default=None, help="directory for jax.profiler traces + per-op-type shares")
  args = ap.parse_args()
  what = set(args.what.split(","))
  if not what <= {"update", "sampler"}:
    ap.error(f"--what: {args.what}; allowed: update, sampler")

  from cispo_jax.model import transformer
  from cispo_jax.model.tiny import DEFAULT_ALPHABET, tiny_config

  cfg = tiny_config("qwen2", vocab_size=3 + len(DEFAULT_ALPHABET), head_dim=64, **MODELS[args.model])
  variants = []
  for rev in args.against:
    variants.append(Variant(os.path.basename(rev)[:14], load_transformer_at(rev), cfg, what))
  variants.append(Variant("working tree", transformer, cfg, what))
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(variants[-1].mod.param_shapes(cfg)))

  rates = matmul_rates()
  for v in variants:  # warm-up (first calls allocate)
    if "update" in what:
      v.run_update()
    if "sampler" in what:
      v.run_sampler()
  for _ in range(args.runs):
    for kind in ("update", "sampler"):
      if kind not in what:
        continue
      for v in variants:
        t0 = time.perf_counter()
        v.run_update() if kind == "update" else v.run_sampler()
        v.times[kind].append(time.perf_counter() - t0)
  rates += matmul_rates()
  peak, typical = max(rates), statistics.median(rates)

  flops = {"update": update_flops(cfg, BATCH, PROMPT, NEW, steps=2), "sampler": sampler_flops(cfg, BATCH, PROMPT, NEW)}
  print(f"model {args.model}: Qwen2, {n_params / 1e6:.2f}M params (hidden {cfg.hidden_size}, {cfg.num_layers} "
        f"layers, {cfg.num_heads}/{cfg.num_kv_heads} heads, MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}), "
        f"f32; jax {jax.__version__}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}")
  print(f"matmul peak (f32 square 1024/2048, 20 calls before + after the runs): best {peak:.1f} GFLOP/s, "
        f"median {typical:.1f} GFLOP/s")
  print(f"batch {BATCH} x (prompt {PROMPT} + {NEW}); update: 2 steps CISPO+AdamW, {flops['update'] / 1e9:.1f} GFLOP; "
        f"sampler: prefill + {NEW} decode steps, {flops['sampler'] / 1e9:.1f} GFLOP; median of {args.runs} "
        f"runs, alternating")
  med, best = {}, {}
  for kind in ("update", "sampler"):
    if kind not in what:
      continue
    for v in variants:
      m, b = statistics.median(v.times[kind]), min(v.times[kind])
      med[kind, v.name], best[kind, v.name] = m, b
      gf, gfb = flops[kind] / m / 1e9, flops[kind] / b / 1e9
      print(f"  {kind:7s} {v.name:14s} median {m * 1e3:8.1f} ms {gf:6.1f} GFLOP/s = {100 * gf / typical:5.1f}% of "
            f"median peak; best {b * 1e3:8.1f} ms {gfb:6.1f} GFLOP/s = {100 * gfb / peak:5.1f}% of best peak  "
            f"(runs ms: {' '.join(f'{t * 1e3:.0f}' for t in v.times[kind])}; compile {v.compile_s:.1f}s)")
    last = variants[-1].name
    for v in variants[:-1]:
      print(f"  {kind:7s} speed-up working tree vs {v.name}: median {med[kind, v.name] / med[kind, last]:.3f}x, "
            f"best {best[kind, v.name] / best[kind, last]:.3f}x")
  if args.profile:
    for kind in ("update", "sampler"):
      if kind in what:
        for v in variants:
          profile_shares(v, args.profile, kind)


if __name__ == "__main__":
  main()
