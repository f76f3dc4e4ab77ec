"""Memory at real sizes, compile only: the update, the old-log-prob forward and the sampler.

For a grid of completion lengths and meshes, each program of an RL iteration is lowered and
compiled on abstract inputs (`cispo_jax.scale.compiled`), nothing is run, and XLA's own
per-device figures are printed: temp, argument and output bytes, and the compile seconds,
next to what `plan_memory` predicts for the update's activations. Meshes of 8 devices are
fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here).

  python benchmarks/bench_scale.py                                # Qwen2.5-0.5B shapes, the default grid
  python benchmarks/bench_scale.py --shape qwen2.5-7b --lengths 4096,16384 --meshes fsdp8,fsdp4_tp2
  python benchmarks/bench_scale.py --model_dir /data/Qwen2.5-1.5B  # shapes from a config.json
  python benchmarks/bench_scale.py --run_iteration                # also one real RL iteration on CPU

Batch: one sequence per batch shard (global batch = data x fsdp), prompt 128 tokens; bf16
compute, float32 master weights, per-layer remat (nothing_saveable) unless flags say otherwise.
`--run_iteration` writes a random Qwen2.5-0.5B-shaped HF directory (2 GB, float32) and runs one
real RL iteration of the trainer on it (default: 2 prompts x 2 completions x 256 new tokens),
printing its wall time and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GiB = 2 ** 30
_QWEN = dict(rope_theta=1e6, qkv_bias=True, architecture="Qwen2ForCausalLM")
SHAPES = {  # public config.json values
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True, **_QWEN),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                       num_heads=28, num_kv_heads=4, head_dim=128, **_QWEN),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                         num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                         rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                       ("original_max_position_embeddings", 8192), ("rope_type", "llama3")),
                         architecture="LlamaForCausalLM"),
}
MESHES = {"1": dict(fsdp=1), "fsdp8": dict(fsdp=8), "fsdp4_tp2": dict(fsdp=4, tensor=2)}


def _config(args):
  from cispo_jax.model import ModelConfig, load_config

  run = dict(dtype=args.dtype, param_dtype=args.param_dtype, remat=not args.no_remat,
             remat_policy=args.remat_policy, attention_impl=args.attention_impl,
             logprob_chunk=args.logprob_chunk)
  if args.model_dir:
    return os.path.basename(os.path.normpath(args.model_dir)), load_config(args.model_dir, **run)
  return args.shape, ModelConfig(**SHAPES[args.shape], **run)


def _mesh(name):
  import jax
  from cispo_jax.sharding import MeshConfig, make_mesh

  spec = MESHES[name]
  n = spec.get("fsdp", 1) * spec.get("tensor", 1)
  return make_mesh(MeshConfig(data=1, fsdp=spec.get("fsdp", 1), tensor=spec.get("tensor", 1)),
                   jax.devices()[:n])


def compile_grid(args, name, cfg):
  from cispo_jax.scale.memory import plan_memory
  from cispo_jax.scale.compiled import compiled_memory

  print(f"\n{name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; "
        f"dtype {cfg.dtype}, params {cfg.param_dtype}, remat {cfg.remat} ({cfg.remat_policy}), "
        f"attention {cfg.attention_impl}, logprob_chunk {cfg.logprob_chunk}; prompt {args.prompt_len}")
  print("| completion | mesh | program | temp GiB | argument GiB | output GiB | planner act. GiB | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for n in args.lengths:
    for mesh_name in args.meshes:
      mesh = _mesh(mesh_name)
      batch = mesh.shape["data"] * mesh.shape["fsdp"]
      for program in args.programs:
        try:
          m = compiled_memory(program, cfg, mesh, batch=batch, prompt_len=args.prompt_len, n_completion=n)
        except Exception as e:  # a shape this machine cannot compile: say so, go on
          print(f"| {n} | {mesh_name} | {program} | failed: {type(e).__name__}: {str(e)[:120]} |||||")
          continue
        plan = ""
        if program in ("loss_grad", "train_step"):
          p = plan_memory(cfg, dict(mesh.shape), batch, args.prompt_len + n, completion_len=n)
          plan = f"{p.activations / GiB:.2f}"
        print(f"| {n} | {mesh_name} | {program} | {m.temp / GiB:.2f} | {m.argument / GiB:.2f} | "
              f"{m.output / GiB:.2f} | {plan} | {m.compile_s:.1f} |", flush=True)


def varied_reward(completion, example):
  """A reward with variance on random-weight text (crc32 parity), so the update really runs:
  with the task's own reward a random model scores 0 everywhere and the update is skipped."""
  import zlib
  return float(zlib.crc32(completion.encode()) % 2)


def run_iteration(args):
  """One real RL iteration of the trainer on a random Qwen2.5-0.5B-shaped directory (CPU)."""
  import jax

  from cispo_jax import sharding
  from cispo_jax.rl import losses
  from cispo_jax.model.tiny import DEFAULT_ALPHABET, make_tiny_model_dir
  from cispo_jax.rl.optim import OptimConfig
  from cispo_jax.task import TaskConfig
  from cispo_jax.trainer import (CheckpointConfig, EvalConfig, ModelRunConfig, RLConfig, RolloutConfig,
                                   UpdateConfig)
  from cispo_jax.trainer import Trainer

  shape = dict(SHAPES["qwen2.5-0.5b"])
  shape.pop("architecture")
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    # One character per model token: with the small default alphabet almost every sampled id would
    # decode to "" and every reward (hence every advantage) would be 0, so the update would be skipped.
    extra = (chr(c) for c in range(0x100, 0x110000) if not 0xD800 <= c < 0xE000)
    alphabet = DEFAULT_ALPHABET + "".join(itertools.islice(
        (ch for ch in extra if ch not in DEFAULT_ALPHABET), shape["vocab_size"] - 3 - len(DEFAULT_ALPHABET)))
    model_dir = make_tiny_model_dir(os.path.join(tmp, "model"), "qwen2", tokenizer=alphabet,
                                    hidden_size=shape.pop("hidden_size"),
                                    intermediate_size=shape.pop("intermediate_size"),
                                    num_layers=shape.pop("num_layers"), num_heads=shape.pop("num_heads"),
                                    num_kv_heads=shape.pop("num_kv_heads"), head_dim=shape.pop("head_dim"),
                                    tie_word_embeddings=shape.pop("tie_word_embeddings"),
                                    max_position_embeddings=32768, **shape)
    t1 = time.perf_counter()
    rl = RLConfig(run_dir=os.path.join(tmp, "run"), model_dir=model_dir, total_steps=1,
                  prompts_per_step=args.prompts,
                  rollout=RolloutConfig(num_generations=args.generations, max_new_tokens=args.new_tokens,
                                        temperature=1.0),
                  update=UpdateConfig(num_iterations=1, num_minibatches=1), eval=EvalConfig(eval_every=10 ** 6),
                  checkpoint=CheckpointConfig(save_every=10 ** 6, export_final=False),
                  model_run=ModelRunConfig(dtype=args.dtype, param_dtype=args.param_dtype, remat=not args.no_remat,
                                           remat_policy=args.remat_policy))
    here = os.path.dirname(os.path.abspath(__file__))  # the reward worker imports bench_scale from here
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    task = TaskConfig(rewards=(("bench_scale:varied_reward", 1.0),))
    trainer = Trainer(rl, losses.LossConfig(), OptimConfig(learning_rate=1e-6),
                      sharding.MeshConfig(fsdp=1), task, devices=jax.devices()[:1])
    t2 = time.perf_counter()
    metrics = trainer.step()
    t3 = time.perf_counter()
    trainer.close()
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB (Linux)
  print(f"\none RL iteration, Qwen2.5-0.5B shapes (random weights), 1 CPU device, {args.prompts} prompts x "
        f"{args.generations} completions x <= {args.new_tokens} new tokens, {args.dtype} compute:")
  print(f"  write model dir {t1 - t0:.1f} s, load + set up {t2 - t1:.1f} s, iteration {t3 - t2:.1f} s "
        f"(compiles included)")
  keys = [k for k in sorted(metrics) if k.startswith(("time/", "completion/length", "train/loss", "reward/mean"))]
  print("  " + ", ".join(f"{k} {metrics[k]:.3g}" for k in keys))
  print(f"  peak RSS {rss:.2f} GiB")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
  ap.add_argument("--model_dir", default="", help="take the shapes from this HF directory's config.json")
  ap.add_argument("--lengths", default="1024,4096,16384,32768", help="completion lengths")
  ap.add_argument("--meshes", default="1,fsdp8,fsdp4_tp2", help=f"of {sorted(MESHES)}")
  ap.add_argument("--programs", default="train_step,logps,sampler",
                  help="of loss_grad, train_step, logps, sampler")
  ap.add_argument("--prompt_len", type=int, default=128)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--param_dtype", default="float32")
  ap.add_argument("--no_remat", action="store_true")
  ap.add_argument("--remat_policy", default="nothing_saveable")
  ap.add_argument("--attention_impl", default="auto")
  ap.add_argument("--logprob_chunk", type=int, default=1024)
  ap.add_argument("--run_iteration", action="store_true", help="also run one real RL iteration (0.5B shapes)")
  ap.add_argument("--iteration_only", action="store_true", help="only the real iteration, no compile grid")
  ap.add_argument("--prompts", type=int, default=2)
  ap.add_argument("--generations", type=int, default=2)
  ap.add_argument("--new_tokens", type=int, default=256)
  args = ap.parse_args(argv)
  args.lengths = [int(x) for x in args.lengths.split(",")]
  args.meshes = args.meshes.split(",")
  args.programs = args.programs.split(",")
  bad = [m for m in args.meshes if m not in MESHES]
  if bad:
    ap.error(f"--meshes {bad} unknown; allowed: {sorted(MESHES)}")

  import jax
  print(f"jax {jax.__version__}, {jax.default_backend()}, {len(jax.devices())} devices")
  if not args.iteration_only:
    compile_grid(args, *_config(args))
  if args.run_iteration or args.iteration_only:
    run_iteration(args)


if __name__ == "__main__":
  main()
