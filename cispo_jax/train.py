"""Entry point: `python -m cispo_jax.train [--gin_file F] [--gin_param B] [--loss_type cispo ...]`.

With no arguments it runs the default experiment: bootstrap a small offline model (cached), then
CISPO RL on integer arithmetic, on whatever devices JAX sees, and print a summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys


def main(argv=None) -> dict:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "httpx"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from cispo_jax import cli, sharding
  dist, rest = cli.split_distributed_args(sys.argv[1:] if argv is None else argv)
  configs = cli.parse_args(rest)  # every config is built and validated before any compilation
  sharding.initialize_distributed(dist.coordinator_address, dist.num_processes, dist.process_id)
  from cispo_jax.runtime.compile_cache import enable_compilation_cache
  cache = enable_compilation_cache()  # a rerun of the same config loads its compiled programs from disk
  logging.getLogger("cispo_jax.train").info("compilation cache: %s", cache or "off")

  from cispo_jax.bootstrap import bootstrap_model
  from cispo_jax.trainer import EXIT_PREEMPTED, Trainer
  rl = configs["RLConfig"]
  if not rl.model_dir:
    import jax
    if jax.process_count() > 1:  # process 0 builds it (on a shared disk); the others then reuse it
      if jax.process_index() == 0:
        bootstrap_model(configs["TaskConfig"], configs["BootstrapConfig"])
      sharding.wait_for_all_processes("cispo_jax bootstrap")
    path = bootstrap_model(configs["TaskConfig"], configs["BootstrapConfig"])
    rl = dataclasses.replace(rl, model_dir=path)
    configs["operative"] += f"# bootstrap model: RLConfig.model_dir = {path!r}\n"
  trainer = Trainer(rl, configs["LossConfig"], configs["OptimConfig"], configs["MeshConfig"],
                    configs["TaskConfig"], operative_config=configs["operative"],
                    allow_config_change=dist.allow_config_change)
  try:
    summary = trainer.run()
  finally:
    trainer.close()
  if "preempted" in summary:
    logging.getLogger("cispo_jax.train").warning(
        "exiting with status %d (preempted); resume with the same command", EXIT_PREEMPTED)
    sys.exit(EXIT_PREEMPTED)
  if sharding.is_main_process():
    loss = configs["LossConfig"]
    print("\n=== cispo_jax summary ===")
    print(f"loss: {loss.loss_type} (epsilon_low={loss.epsilon_low}, epsilon_high={loss.epsilon_high})")
    print(f"held-out greedy pass@1: start {summary['eval_start']:.3f} -> end {summary['eval_end']:.3f} "
          f"({100 * (summary['eval_end'] - summary['eval_start']):+.1f} points)")
    print(f"RL iterations: {summary['iterations']} in {summary['seconds']:.0f} s; run dir: {rl.run_dir}")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("eval_start", "eval_end")}))
  return summary


if __name__ == "__main__":
  main()
