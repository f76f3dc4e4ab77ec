"""The memory of experiments/recipes/qwen3_1p7b_dapo.gin at its real shapes, compile only (nothing runs).

Reads the recipe (plus --gin_param overrides), builds Qwen3-1.7B's config (scale.memory.QWEN3_1P7B_CONFIG_JSON) with
the recipe's ModelRunConfig resolved for a GPU ('auto' = bf16 compute, f32 master weights), and compiles on 1 and on
8 fake CPU devices (FSDP):
  update   one optimizer step (loss, gradient, AdamW) on one micro-batch: prompts_per_step / (num_minibatches x
           micro_batches) prompt groups x num_generations rows, at prompt bucket + max_new_tokens positions
  decode   the paged engine's decode burst: paged_slots slots, the recipe's pool (paged_num_pages), weights in the
           decode layout
and prints XLA's per-device figures next to plan_memory's estimate of the update. XLA:CPU's figures, not a GPU's:
XLA:CPU keeps f32 copies beside bf16 ones and copies a donated pool instead of updating it in place, so they are
upper bounds of what the program needs rather than a GPU measurement.

  python benchmarks/bench_recipe.py
  python benchmarks/bench_recipe.py --prompt_len 1024 --gin_param "UpdateConfig.micro_batches = 48"
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GiB = 2 ** 30
RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "recipes", "qwen3_1p7b_dapo.gin")


def _mesh(n: int):
  import jax
  import numpy as np
  from jax.sharding import Mesh

  return Mesh(np.array(jax.devices()[:n]).reshape(1, n, 1), ("data", "fsdp", "tensor"))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gin_file", default=RECIPE)
  p.add_argument("--gin_param", action="append", default=[])
  p.add_argument("--prompt_len", type=int, default=512, help="the prompt bucket of the compiled programs")
  p.add_argument("--devices", default="1,8", help="mesh sizes (FSDP) to compile for")
  args = p.parse_args(argv)

  from cispo_jax import cli
  from cispo_jax.model.hf_io.config import config_from_hf_dict
  from cispo_jax.scale.compiled import compiled_memory
  from cispo_jax.scale.decode import compiled_decode
  from cispo_jax.scale.memory import QWEN3_1P7B_CONFIG_JSON, param_count, plan_memory

  built = cli.parse([args.gin_file], gin_params=args.gin_param)
  rl, ro, up = built["RLConfig"], built["RLConfig"].rollout, built["RLConfig"].update
  cfg = config_from_hf_dict(QWEN3_1P7B_CONFIG_JSON, **rl.model_run.overrides(platform="gpu"))
  rows = rl.prompts_per_step // (up.num_minibatches * up.micro_batches) * ro.num_generations
  width = args.prompt_len + ro.max_new_tokens
  print(f"Qwen3-1.7B ({param_count(cfg) / 1e9:.2f}B params), dtype={cfg.dtype} params={cfg.param_dtype} "
        f"remat={cfg.remat} logprob_chunk={cfg.logprob_chunk}; update micro-batch {rows} rows x {width} positions; "
        f"decode {ro.paged_slots} slots, pool {ro.paged_num_pages} pages of {ro.paged_page_size}")
  for n in (int(x) for x in args.devices.split(",")):
    m = compiled_memory("train_step", cfg, _mesh(n), batch=rows, prompt_len=args.prompt_len,
                        n_completion=ro.max_new_tokens, loss=built["LossConfig"])
    plan = plan_memory(cfg, {"fsdp": n}, rows, width, completion_len=ro.max_new_tokens)
    print(f"  update, {n} device(s): argument {m.argument / GiB:.2f} temp {m.temp / GiB:.2f} output "
          f"{m.output / GiB:.2f} (aliased {m.alias / GiB:.2f}) peak {m.peak / GiB:.2f} GiB a device, compiled in "
          f"{m.compile_s:.1f} s; plan_memory: params+optimizer {(plan.params + plan.optimizer) / GiB:.2f} "
          f"grads+activations {(plan.grads + plan.activations) / GiB:.2f} GiB")
    d = compiled_decode("paged", cfg, _mesh(n), layout="decode", slots=ro.paged_slots, prompt_len=args.prompt_len,
                        budget=ro.max_new_tokens, page_size=ro.paged_page_size,
                        pool_pages=ro.paged_num_pages or None, steps=ro.paged_steps_per_sync)
    print(f"  decode burst, {n} device(s): weights {d.weights / GiB:.2f} pool {d.kv / GiB:.2f} temp "
          f"{d.temp / GiB:.2f} GiB a device, {len(d.weight_gathers)} weight all-gathers")


if __name__ == "__main__":
  main()
