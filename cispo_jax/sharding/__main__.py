"""Print the per-device memory table: `python -m cispo_jax.sharding [--seq_len 4096 ...]`."""

from __future__ import annotations

import argparse

from cispo_jax.scale.memory import QWEN25, plan_memory

# (devices, mesh shape) rows of the table.
MESHES = (
    (8, {"fsdp": 8}),
    (8, {"data": 2, "fsdp": 4}),
    (8, {"fsdp": 4, "tensor": 2}),
    (64, {"fsdp": 32, "tensor": 2}),
    (256, {"fsdp": 64, "tensor": 4}),
    (256, {"data": 4, "fsdp": 32, "tensor": 2}),
)
GIB = 1024**3


def table(seq_len: int, seqs_per_shard: int, rollout_seqs_per_shard: int, rollout_len: int,
          optimizer: str = "adamw") -> str:
  head = (f"| model | devices | mesh | params | grads | {optimizer} | activations | KV cache | peak |\n"
          "|---|---|---|---|---|---|---|---|---|")
  rows = [head]
  for name, cfg in QWEN25.items():
    for n, shape in MESHES:
      shards = shape.get("data", 1) * shape.get("fsdp", 1)
      p = plan_memory(cfg, shape, seqs_per_shard * shards, seq_len, optimizer=optimizer,
                      rollout_batch=rollout_seqs_per_shard * shards, rollout_len=rollout_len)
      mesh = ",".join(f"{k}={v}" for k, v in shape.items())
      cells = [p.params, p.grads, p.optimizer, p.activations, p.kv_cache, p.peak]
      rows.append(f"| {name} | {n} | {mesh} | " + " | ".join(f"{c / GIB:.2f}" for c in cells) + " |")
  return "\n".join(rows)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--seq_len", type=int, default=4096, help="training tokens per sequence")
  ap.add_argument("--seqs_per_shard", type=int, default=1, help="training micro-batch rows per data x fsdp shard")
  ap.add_argument("--rollout_seqs_per_shard", type=int, default=16, help="rollout rows per data x fsdp shard")
  ap.add_argument("--rollout_len", type=int, default=4096, help="KV cache slots (prompt + completion)")
  ap.add_argument("--optimizer", default="adamw")
  args = ap.parse_args(argv)
  print(f"Per-device GiB. Params/grads float32, {args.optimizer} moments float32, bf16 activations and KV "
        f"cache, per-block remat. Train micro-batch: {args.seqs_per_shard} x {args.seq_len} tokens per "
        f"data x fsdp shard; rollout: {args.rollout_seqs_per_shard} x {args.rollout_len} cache slots per shard. "
        "peak = params + optimizer + max(grads + activations, KV cache).\n")
  print(table(args.seq_len, args.seqs_per_shard, args.rollout_seqs_per_shard, args.rollout_len, args.optimizer))


if __name__ == "__main__":
  main()
