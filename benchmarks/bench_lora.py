"""LoRA against full fine-tuning: the update's memory at Qwen2.5-7B shapes (compile only), and the update's, the
weight sync's and the decode's speed on the 27M model (CPU, A/B).

memory  compiles the trainer's update program (train_step.update_on_rollout via scale/compiled.py "update": one
        epoch, one minibatch, one micro-batch, clipped AdamW, KL term on) at Qwen2.5-7B shapes (scale.memory.QWEN25)
        on one device, bf16 compute over f32 master weights, per-layer remat, f32 LM head, one sequence of a
        --prompt_len prompt + a --completion_len completion, and prints XLA's figures for
          full FT  state = f32 params + Adam moments (donated); the KL reference (a bf16 copy of the model, the
                   LM head's weights kept f32, parts.reference_params) lives beside it but is no argument of the
                   update: its log-probs are an input of the batch
          LoRA     state = f32 adapters (--memory_rank, the default targets q,k,v,o,gate,up,down) + their Adam
                   moments (donated); frozen = the bf16 base with the f32 LM head (an undonated argument), which is
                   also the KL reference: no copy
        next to plan_memory's estimate of the same shape. Nothing is allocated (jax.ShapeDtypeStruct inputs).
        peak = arguments + temp + output - alias (memory_analysis: the donated state's outputs reuse its argument
        buffers, so they count once). XLA:CPU has no bf16 dot: it holds an f32 copy of the bf16 base's layer
        weights for the whole program (scale.compiled.cpu_upcast_bytes finds them in the HLO); "peak, bf16 dots"
        is the peak without them, what a GPU / TPU program holds. --layers N compiles N layers instead of 28 (and
        --layers A,B two depths, printing the per-layer slope).
speed   the 27M model of benchmarks/bench_update.py (hidden 512, 8 layers, f32 on CPU; batch 64 x (16 + 32) in
        groups of 8, CISPO, AdamW, num_iterations 2): the update, full FT vs LoRA rank --rank on the default
        targets; the weight sync (rollout/engine.py NativeEngine.load_weights of a new version with
        copy_weights=True: full FT copies the whole tree, LoRA the adapters only, the engine keeps the base it
        placed once; also LoRA with rollout_merged, which merges W + s * A @ B per version), with the bytes it
        moved (engine.sync_bytes); and a greedy 32-token decode at batch 64 with the adapters unmerged
        (base + s * (x @ A) @ B at every step) vs merged. The arms take turns call by call, --repeats rounds;
        medians and the ratios LoRA / full.

  python benchmarks/bench_lora.py --section memory                  # Qwen2.5-7B, 512 + 8192 tokens, rank 32
  python benchmarks/bench_lora.py --section memory --layers 2,4     # fewer layers: the per-layer slope
  python benchmarks/bench_lora.py --section speed --repeats 7 --rank 8
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GiB = 2 ** 30


# ----------------------------------------------------------------------------- memory


def memory_rows(cfg, lcfg, prompt_len: int, completion_len: int, kl_coef: float):
  """{"full FT": CompiledMemory, "LoRA": CompiledMemory} of the update at `cfg`, and the bf16 reference's bytes."""
  from cispo_jax.rl import losses
  from cispo_jax.scale.compiled import compiled_memory, frozen_base, single_device_mesh, tree_bytes

  mesh, loss = single_device_mesh(), losses.LossConfig(kl_coef=kl_coef)
  out = {}
  for name, lc in (("full FT", None), ("LoRA", lcfg)):
    out[name] = compiled_memory("update", cfg, mesh, batch=1, prompt_len=prompt_len, n_completion=completion_len,
                                loss=loss, lora=lc)
  return out, tree_bytes(frozen_base(cfg, mesh))


def print_memory(cfg, lcfg, rows, reference: int, prompt_len: int, completion_len: int):
  from cispo_jax.model import lora, param_shapes
  from cispo_jax.scale.memory import param_count, plan_memory

  trained = {"full FT": param_count(cfg), "LoRA": lora.count(lora.adapter_shapes(param_shapes(cfg), lcfg))}
  refs = {"full FT": reference, "LoRA": 0}
  print(f"| {cfg.num_layers} layers | trained params | arguments | temp | of temp: XLA:CPU f32 copy of the bf16 base "
        "| output | alias | peak | peak, bf16 dots | + KL reference copy | resident, bf16 dots | plan_memory | "
        "compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name, m in rows.items():
    plan = plan_memory(cfg, {}, 1, prompt_len + completion_len, completion_len=completion_len,
                       lora=lcfg if name == "LoRA" else None, reference=name == "full FT")
    cells = [m.argument, m.temp, m.cpu_upcast, m.output, m.alias, m.peak, m.peak - m.cpu_upcast, refs[name],
             m.peak - m.cpu_upcast + refs[name], plan.peak]
    print(f"| {name} | {trained[name] / 1e6:,.1f}M | " + " | ".join(f"{c / GiB:.2f}" for c in cells)
          + f" | {m.compile_s:.0f} |")
  full, low = rows["full FT"], rows["LoRA"]
  print(f"\npeak = arguments + temp + output - alias: the outputs that reuse the donated state's buffers (alias) "
        f"count once. Full FT's arguments are the f32 params + Adam moments ({full.alias / GiB:.2f} GiB, donated) and "
        f"the batch; LoRA's the adapters' state ({low.alias / GiB:.2f} GiB, donated), the batch and the frozen base "
        f"({reference / GiB:.2f} GiB, bf16 with the LM head f32, not donated). Full FT with a KL also holds the "
        f"reference's copy ({reference / GiB:.2f} GiB, the same layout as LoRA's base) beside the update: not an "
        "argument (its log-probs are in the batch), but resident; LoRA's reference is its base. plan_memory: the "
        "planner's peak of the same shape (full FT with its reference copy).")


def run_memory(args):
  from cispo_jax.model import lora
  from cispo_jax.scale.memory import QWEN25

  cfg = QWEN25["7B"].replace(remat=True)
  lcfg = lora.LoraConfig(rank=args.memory_rank)
  print(f"Qwen2.5-7B shapes, one device, 1 sequence x ({args.prompt_len} + {args.completion_len}) tokens, dtype "
        f"{cfg.dtype} over {cfg.param_dtype} params, remat {cfg.remat_policy}, lm_head_f32={cfg.lm_head_f32}, "
        f"logprob_chunk {cfg.logprob_chunk}; LoRA rank {lcfg.rank} on {','.join(lcfg.targets)}; update = 1 epoch x "
        f"1 minibatch x 1 micro-batch, clipped AdamW, KL coef {args.kl_coef}. GiB per device (XLA:CPU).\n")
  depths = [int(x) for x in args.layers.split(",")] if args.layers else [cfg.num_layers]
  results = {}
  for L in depths:
    c = cfg.replace(num_layers=L)
    rows, reference = memory_rows(c, lcfg, args.prompt_len, args.completion_len, args.kl_coef)
    results[L] = rows
    print_memory(c, lcfg, rows, reference, args.prompt_len, args.completion_len)
    print()
  if len(depths) >= 2:
    a, b = depths[0], depths[-1]
    for name in results[a]:
      ma, mb = results[a][name], results[b][name]
      per = {k: (getattr(mb, k) - getattr(ma, k)) / (b - a) for k in ("argument", "temp", "cpu_upcast")}
      at = {k: getattr(mb, k) + per[k] * (cfg.num_layers - b) for k in per}
      print(f"{name}: per layer ({a} -> {b} layers) arguments {per['argument'] / GiB:.3f} temp {per['temp'] / GiB:.3f} "
            f"(upcast {per['cpu_upcast'] / GiB:.3f}) GiB; linear to {cfg.num_layers} layers: arguments "
            f"{at['argument'] / GiB:.2f} temp {at['temp'] / GiB:.2f} (upcast {at['cpu_upcast'] / GiB:.2f}) GiB")


# ----------------------------------------------------------------------------- speed


class Arm:
  """One side of the A/B: its state, its compiled update, its engines and its sampler."""

  def __init__(self, name, cfg, base, lcfg, batch, seed=0):
    import jax
    import jax.numpy as jnp
    from cispo_jax.model import lora
    from cispo_jax.rl import losses
    from cispo_jax.rl.optim import OptimConfig, make_optimizer
    from cispo_jax.rl.train_step import StepConfig, TrainState, update_on_rollout

    self.name, self.lcfg = name, lcfg
    self.cfg = cfg.replace(lora_scaling=lcfg.scaling) if lcfg else cfg
    loss = losses.LossConfig(loss_type="cispo").resolved()
    step_cfg = StepConfig(model=self.cfg, loss=loss, temperature=1.0, micro_batches=1, num_generations=8,
                          use_ref=False)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-5), 1000)
    if lcfg:
      shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
      trained, self.frozen = lora.init_adapters(jax.random.PRNGKey(seed + 1), shapes, lcfg), base
    else:
      trained, self.frozen = jax.tree.map(jnp.copy, base), None
    self.trained_count = lora.count(trained)
    self.state = jax.jit(functools.partial(TrainState.create, tx=tx, seed=seed))(trained)
    update = functools.partial(update_on_rollout, cfg=step_cfg, tx=tx, schedule=schedule, num_iterations=2,
                               num_minibatches=1)
    self.batch = batch
    self.update_fn = jax.jit(lambda state, batch, frozen: update(state, batch, frozen=frozen),
                             donate_argnums=0).lower(self.state, batch, self.frozen).compile()
    self.engines = {"": self._engine(False)} if not lcfg else {"": self._engine(False), " merged": self._engine(True)}
    self.times: dict[str, list[float]] = {}
    self.sync_bytes: dict[str, int] = {}
    self.version = 0

  def _engine(self, merged: bool):
    from cispo_jax import sharding
    from cispo_jax.model import lora
    from cispo_jax.rollout.engine import NativeEngine
    from cispo_jax.trainer import adapters

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), __import__("jax").devices()[:1])
    logical, shapes = adapters.policy_layout(self.lcfg or lora.LoraConfig(), self.cfg)
    layout = sharding.param_shardings(logical, shapes, mesh, sharding.DECODE_RULES)
    return NativeEngine(self.cfg, None, mesh, layout, apply_chat_template=False, copy_weights=True,
                        rollout_merged=merged)

  def policy(self):
    from cispo_jax.model import lora
    return lora.combine(self.frozen, self.state.params) if self.frozen is not None else self.state.params

  def timed(self, key, fn):
    t0 = time.perf_counter()
    out = fn()
    self.times.setdefault(key, []).append(time.perf_counter() - t0)
    return out

  def run_update(self):
    import jax
    self.state, metrics = self.update_fn(self.state, self.batch, self.frozen)
    jax.block_until_ready((self.state, metrics))

  def run_sync(self, suffix):
    """load_weights of the state's current params as a new version (the next update donates them)."""
    engine = self.engines[suffix]
    self.version += 1
    engine.load_weights(self.policy(), self.version)
    engine.release_below(self.version)
    self.sync_bytes["sync" + suffix] = engine.sync_bytes


def _sampler(cfg, params, prompts):
  import jax
  from cispo_jax.rollout import sampling

  # No stop token: every one of the 32 decode steps runs in both arms.
  sc = sampling.SamplingConfig(max_new_tokens=32, greedy=True, prompt_buckets=(prompts[0].shape[1],))
  core = jax.jit(functools.partial(sampling._generate_core, model_cfg=cfg, cfg=sc, share_prefill=False, sharding=None))
  args = (params, *prompts, jax.random.PRNGKey(0))
  fn = core.lower(*args).compile()
  return lambda: jax.block_until_ready(fn(*args).tokens_BxN)


def _prompts(cfg, B=64, P=16, seed=1):
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(seed)
  plen = rng.integers(12, P + 1, B)
  mask = (np.arange(P)[None, :] >= P - plen[:, None]).astype(np.int32)
  tokens = np.where(mask > 0, rng.integers(3, cfg.vocab_size, (B, P)), 0).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(mask)


def run_speed(args):
  import jax
  import jax.numpy as jnp
  from bench_update import MODELS, random_params, rollout_batch
  from cispo_jax.model import lora, transformer
  from cispo_jax.model.logprobs import completion_logps
  from cispo_jax.model.tiny import DEFAULT_ALPHABET, tiny_config

  cfg = tiny_config("qwen2", vocab_size=3 + len(DEFAULT_ALPHABET), head_dim=64, **MODELS["27m"])
  base = random_params(transformer, cfg, 0)
  batch = rollout_batch(cfg, 0)
  batch = batch._replace(old_logps_BxN=jax.jit(
      lambda p, b: completion_logps(p, cfg, b.tokens_BxL, b.kv_valid_BxL, b.mask_BxN.shape[1], 1.0)[0])(base, batch))
  t0 = time.perf_counter()
  full, low = Arm("full FT", cfg, base, None, batch), Arm("LoRA", cfg, base, lora.LoraConfig(rank=args.rank), batch)
  for arm in (full, low):  # warm-up: first calls allocate; the engines place the base
    arm.run_update()
    for suffix in arm.engines:
      arm.run_sync(suffix)
  # The decode arms sample with a copy of the updated adapters (B off zero; the next update donates the state's).
  policy = lora.combine(base, jax.tree.map(jnp.copy, low.state.params))
  prompts = _prompts(cfg)
  merged = jax.jit(functools.partial(lora.merged, scaling=low.cfg.lora_scaling))(policy)
  decode = {"decode unmerged": _sampler(low.cfg, policy, prompts), "decode merged": _sampler(cfg, merged, prompts)}
  print(f"27M model (hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.param_dtype}); full FT trains "
        f"{full.trained_count / 1e6:.2f}M params, LoRA rank {args.rank} on {','.join(low.lcfg.targets)} trains "
        f"{low.trained_count / 1e6:.3f}M; compiled in {time.perf_counter() - t0:.1f} s; jax {jax.__version__}, "
        f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}")
  for fn in decode.values():
    fn()
  for _ in range(args.repeats):
    for arm in (full, low):
      arm.timed("update", arm.run_update)
      for suffix in arm.engines:
        arm.timed("sync" + suffix, functools.partial(arm.run_sync, suffix))
    for key, fn in decode.items():
      low.timed(key, fn)
  print_speed(full, low, args.repeats)


def print_speed(full, low, repeats):
  med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
  print(f"\nmedians of {repeats} rounds, ms (runs in brackets); ratio = LoRA / full FT")
  print("| program | full FT | LoRA | ratio | bytes moved: full FT | LoRA |")
  print("|---|---|---|---|---|---|")
  runs = lambda xs: " ".join(f"{t * 1e3:.0f}" for t in xs)  # noqa: E731
  for key in ("update", "sync"):
    f, lo = med(full.times[key]), med(low.times[key])
    moved = (f"{full.sync_bytes[key] / 2**20:.1f} MiB | {low.sync_bytes[key] / 2**20:.2f} MiB" if key == "sync"
             else " | ")
    print(f"| {key} | {f:.1f} ({runs(full.times[key])}) | {lo:.1f} ({runs(low.times[key])}) | {lo / f:.3f} | {moved} |")
  m = med(low.times["sync merged"])
  print(f"| sync, LoRA rollout_merged | {med(full.times['sync']):.1f} | {m:.1f} ({runs(low.times['sync merged'])}) | "
        f"{m / med(full.times['sync']):.3f} | | {low.sync_bytes['sync merged'] / 2**20:.1f} MiB |")
  u, mg = med(low.times["decode unmerged"]), med(low.times["decode merged"])
  print(f"| greedy decode, 64 x 32 tokens: merged (= full FT's program) vs unmerged | {mg:.1f} "
        f"({runs(low.times['decode merged'])}) | {u:.1f} ({runs(low.times['decode unmerged'])}) | {u / mg:.3f} | | |")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--section", choices=("memory", "speed", "all"), default="all")
  p.add_argument("--repeats", type=int, default=7, help="speed: A/B rounds")
  p.add_argument("--rank", type=int, default=8, help="speed: the LoRA rank")
  p.add_argument("--memory_rank", type=int, default=32, help="memory: the LoRA rank")
  p.add_argument("--prompt_len", type=int, default=512)
  p.add_argument("--completion_len", type=int, default=8192)
  p.add_argument("--kl_coef", type=float, default=0.05, help="memory: the KL term's coefficient (> 0: KL on)")
  p.add_argument("--layers", default="", help="memory: compile this many layers (or A,B: two depths and the slope)")
  args = p.parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  if args.section in ("memory", "all"):
    run_memory(args)
  if args.section in ("speed", "all"):
    run_speed(args)


if __name__ == "__main__":
  main()
