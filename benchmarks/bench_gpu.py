"""Update MFU and decode tokens/s on an accelerator, at Qwen2.5-0.5B shapes in bf16.

Random weights in the Qwen2.5-0.5B layout (hidden 896, 24 layers, 14 / 2 heads, MLP 4864, vocab
151,936, tied embeddings), bf16 compute with float32 master weights, on the first device.

- peak: a jitted bf16 8192^3 matmul on random data, median of 10 calls (the same process).
- update: the trainer's program, `train_step.update_on_rollout` (CISPO + AdamW, 2 optimizer
  steps, state donated), on B sequences of P prompt + N completion tokens. MFU = model FLOPs
  (bench_update.update_flops: 6 x weights x tokens, the LM head on completion tokens, attention
  over the full L x L square) / time / peak; remat recomputation is not counted as useful work.
- decode: the sampler's compiled program (`sampling._generate_core`: prefill + while-loop decode),
  no stop token so all N steps run, tokens/s = B x N / time; with the float32 master params the
  trainer hands it, and with params cast to bf16 once beforehand.

Each section prints as it finishes and is skipped (with the error) if it fails, so one run
gives what it can.

  python benchmarks/bench_gpu.py [--batch 32 --prompt 128 --new 1024] [--decode_batches 64,256]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_scale import SHAPES  # noqa: E402
from bench_update import random_params, rollout_batch, sampler_flops, update_flops  # noqa: E402


def timed(fn, reps):
  fn()  # warm-up
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), ts


def peak_bf16(n=8192, reps=10):
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal((n, n)), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  med, _ = timed(lambda: f(a, b).block_until_ready(), reps)
  return 2 * n ** 3 / med


NUM_LAYERS = None  # --num_layers: fewer layers for a smoke test


def model_cfg(remat: bool):
  from cispo_jax.model import ModelConfig
  shape = dict(SHAPES["qwen2.5-0.5b"])
  shape.pop("architecture")
  if NUM_LAYERS:
    shape["num_layers"] = NUM_LAYERS
  return ModelConfig(**shape, dtype="bfloat16", param_dtype="float32", remat=remat, lm_head_f32=True)


def bench_update(args, peak, remat):
  from cispo_jax.rl import losses
  from cispo_jax.model import transformer
  from cispo_jax.rl.optim import OptimConfig, make_optimizer
  from cispo_jax.model.logprobs import completion_logps
  from cispo_jax.rl.train_step import StepConfig, TrainState, update_on_rollout

  cfg = model_cfg(remat)
  B, P, N = args.batch, args.prompt, args.new
  params = random_params(transformer, cfg, 0)
  loss = losses.LossConfig(loss_type="cispo", max_completion_length=N).resolved()
  step_cfg = StepConfig(model=cfg, loss=loss, temperature=1.0, micro_batches=1, num_generations=min(8, B),
                        use_ref=False)
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-6), 1000)
  batch = rollout_batch(cfg, 0, B=B, P=P, N=N, group=min(8, B), min_prompt=P // 2)
  logps = jax.jit(lambda p, b: completion_logps(p, cfg, b.tokens_BxL, b.kv_valid_BxL, N, 1.0)[0])
  batch = batch._replace(old_logps_BxN=logps(params, batch))
  state = jax.jit(functools.partial(TrainState.create, tx=tx, seed=0))(params)
  t0 = time.perf_counter()
  update = jax.jit(functools.partial(update_on_rollout, cfg=step_cfg, tx=tx, schedule=schedule,
                                     num_iterations=2, num_minibatches=1), donate_argnums=0)
  compiled = update.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  box = [state]

  def run():
    box[0], metrics = compiled(box[0], batch)
    jax.block_until_ready((box[0], metrics))

  med, ts = timed(run, args.reps)
  flops = update_flops(cfg, B, P, N, steps=2)
  tok = 2 * B * (P + N)
  print(f"update remat={remat}: B={B} x (P={P} + N={N}), 2 optimizer steps, {flops / 1e12:.1f} TFLOP; "
        f"median {med * 1e3:.1f} ms (runs {' '.join(f'{t * 1e3:.0f}' for t in ts)}), "
        f"{flops / med / 1e12:.0f} TFLOP/s = MFU {100 * flops / med / peak:.1f}% of the measured bf16 peak; "
        f"{tok / med:,.0f} train tokens/s; compile {compile_s:.1f} s; temp {mem.temp_size_in_bytes / 2**30:.1f} GiB",
        flush=True)


def bench_decode(args, peak, B):
  from cispo_jax.rollout import sampling
  from cispo_jax.model import transformer

  cfg = model_cfg(False)
  P, N = args.prompt, args.decode_new
  params32 = random_params(transformer, cfg, 0)
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
  sc = sampling.SamplingConfig(max_new_tokens=N, temperature=1.0)
  rng = np.random.default_rng(1)
  plen = rng.integers(P // 2, P + 1, B)
  mask = (np.arange(P)[None, :] >= P - plen[:, None]).astype(np.int32)
  tokens = np.where(mask > 0, rng.integers(3, cfg.vocab_size, (B, P)), 0).astype(np.int32)
  flops = sampler_flops(cfg, B, P, N)
  unrolled = dataclasses.replace(cfg, scan_unroll=cfg.num_layers)
  variants = {"f32": ("f32 master params", params32, cfg), "bf16": ("bf16 params", params16, cfg),
              "unroll": ("f32 master params, layer loop unrolled", params32, unrolled)}
  for label, params, mcfg in (variants[v] for v in args.decode_variants.split(",")):
    a = (params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(0))
    core = jax.jit(functools.partial(sampling._generate_core, model_cfg=mcfg, cfg=sc, share_prefill=False,
                                     sharding=None))
    t0 = time.perf_counter()
    fn = core.lower(*a).compile()
    compile_s = time.perf_counter() - t0
    med, ts = timed(lambda: jax.block_until_ready(fn(*a).tokens_BxN), args.reps)
    print(f"decode B={B}, prompt {P}, {N} new tokens, {label}: median {med * 1e3:.0f} ms "
          f"(runs {' '.join(f'{t * 1e3:.0f}' for t in ts)}) = {B * N / med:,.0f} tokens/s, "
          f"{med / N * 1e3:.2f} ms a step, {flops / med / 1e12:.1f} TFLOP/s ({100 * flops / med / peak:.1f}% of peak); "
          f"compile {compile_s:.1f} s", flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--new", type=int, default=1024, help="completion tokens of the update batch")
  ap.add_argument("--decode_new", type=int, default=512)
  ap.add_argument("--decode_batches", default="64,256")
  ap.add_argument("--decode_variants", default="f32,bf16,unroll",
                  help="f32 (the trainer's master params), bf16 (cast once), unroll (scan_unroll = layers)")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--sections", default="update,decode,update_remat")
  ap.add_argument("--num_layers", type=int, default=None, help="override the 24 layers (smoke tests)")
  ap.add_argument("--peak_n", type=int, default=8192)
  args = ap.parse_args()
  global NUM_LAYERS
  NUM_LAYERS = args.num_layers
  dev = jax.devices()[0]
  print(f"jax {jax.__version__}, device {dev.device_kind} ({dev.platform}), {jax.device_count()} device(s)", flush=True)
  peak = peak_bf16(args.peak_n)
  print(f"measured bf16 matmul peak ({args.peak_n}^3, median of 10): {peak / 1e12:.0f} TFLOP/s", flush=True)
  sections = args.sections.split(",")
  jobs = []
  if "update" in sections:
    jobs.append(("update", lambda: bench_update(args, peak, remat=False)))
  if "decode" in sections:
    for b in args.decode_batches.split(","):
      jobs.append((f"decode B={b}", functools.partial(bench_decode, args, peak, int(b))))
  if "update_remat" in sections:
    jobs.append(("update remat", lambda: bench_update(args, peak, remat=True)))
  for name, job in jobs:
    try:
      job()
    except Exception:  # report and go on: one run should give every figure it can
      print(f"{name}: FAILED\n{traceback.format_exc()[-2000:]}", flush=True)


if __name__ == "__main__":
  main()
