"""Print the per-device memory table: `python -m cispo_jax.sharding [--seq_len 4096 ...]`.

`--lora_rank R` prints full fine-tuning next to LoRA of rank R (the default targets: q, k, v, o, gate, up, down),
one device added to the meshes, and names the largest model of the table whose peak fits one device of
`--device_gib` GiB either way; `--kl` counts full fine-tuning's KL reference copy (LoRA's reference is its base).
"""

from __future__ import annotations

import argparse

from cispo_jax.scale.memory import QWEN25, LoraConfig, plan_memory  # the planner's, not the model's (layers)

# (devices, mesh shape) rows of the table.
MESHES = (
    (8, {"fsdp": 8}),
    (8, {"data": 2, "fsdp": 4}),
    (8, {"fsdp": 4, "tensor": 2}),
    (64, {"fsdp": 32, "tensor": 2}),
    (256, {"fsdp": 64, "tensor": 4}),
    (256, {"data": 4, "fsdp": 32, "tensor": 2}),
)
ONE_DEVICE = (1, {})
GIB = 1024**3


def _plan(cfg, shape, seq_len, seqs_per_shard, rollout_seqs_per_shard, rollout_len, optimizer, **kw):
  shards = shape.get("data", 1) * shape.get("fsdp", 1)
  return plan_memory(cfg, shape, seqs_per_shard * shards, seq_len, optimizer=optimizer,
                     rollout_batch=rollout_seqs_per_shard * shards, rollout_len=rollout_len, **kw)


def _mesh(shape) -> str:
  return ",".join(f"{k}={v}" for k, v in shape.items()) or "-"


def table(seq_len: int, seqs_per_shard: int, rollout_seqs_per_shard: int, rollout_len: int,
          optimizer: str = "adamw") -> str:
  head = (f"| model | devices | mesh | params | grads | {optimizer} | activations | KV cache | peak |\n"
          "|---|---|---|---|---|---|---|---|---|")
  rows = [head]
  for name, cfg in QWEN25.items():
    for n, shape in MESHES:
      p = _plan(cfg, shape, seq_len, seqs_per_shard, rollout_seqs_per_shard, rollout_len, optimizer)
      cells = [p.params, p.grads, p.optimizer, p.activations, p.kv_cache, p.peak]
      rows.append(f"| {name} | {n} | {_mesh(shape)} | " + " | ".join(f"{c / GIB:.2f}" for c in cells) + " |")
  return "\n".join(rows)


def lora_table(seq_len: int, seqs_per_shard: int, rollout_seqs_per_shard: int, rollout_len: int,
               optimizer: str = "adamw", *, lora_rank: int, kl: bool = False, device_gib: float = 80.0):
  """(the table of full FT and LoRA rows, {training: the largest model whose one-device peak <= device_gib})."""
  lcfg = LoraConfig(rank=lora_rank)
  rows = [f"| model | devices | mesh | training | trained params | params | grads | {optimizer} | activations | "
          "KV cache | reference | peak |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  largest: dict[str, str | None] = {"full FT": None, f"LoRA r{lora_rank}": None}
  for name, cfg in QWEN25.items():
    for n, shape in (ONE_DEVICE,) + MESHES:
      for training, kw in (("full FT", {"reference": kl}), (f"LoRA r{lora_rank}", {"lora": lcfg})):
        p = _plan(cfg, shape, seq_len, seqs_per_shard, rollout_seqs_per_shard, rollout_len, optimizer, **kw)
        cells = [p.params, p.grads, p.optimizer, p.activations, p.kv_cache, p.reference, p.peak]
        rows.append(f"| {name} | {n} | {_mesh(shape)} | {training} | {p.trained_param_count / 1e6:,.1f}M | "
                    + " | ".join(f"{c / GIB:.2f}" for c in cells) + " |")
        if n == 1 and p.peak <= device_gib * GIB:
          largest[training] = name  # QWEN25 goes from the smallest model to the largest
  return "\n".join(rows), largest


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--seq_len", type=int, default=4096, help="training tokens per sequence")
  ap.add_argument("--seqs_per_shard", type=int, default=1, help="training micro-batch rows per data x fsdp shard")
  ap.add_argument("--rollout_seqs_per_shard", type=int, default=16, help="rollout rows per data x fsdp shard")
  ap.add_argument("--rollout_len", type=int, default=4096, help="KV cache slots (prompt + completion)")
  ap.add_argument("--optimizer", default="adamw")
  ap.add_argument("--lora_rank", type=int, default=0, help="> 0: full fine-tuning next to LoRA of this rank")
  ap.add_argument("--kl", action="store_true", help="with --lora_rank: count full FT's KL reference copy")
  ap.add_argument("--device_gib", type=float, default=80.0, help="with --lora_rank: one device's memory, GiB")
  args = ap.parse_args(argv)
  print(f"Per-device GiB. Params/grads float32, {args.optimizer} moments float32, bf16 activations and KV "
        f"cache, per-block remat. Train micro-batch: {args.seqs_per_shard} x {args.seq_len} tokens per "
        f"data x fsdp shard; rollout: {args.rollout_seqs_per_shard} x {args.rollout_len} cache slots per shard. "
        "peak = params + optimizer + max(grads + activations, KV cache).\n")
  sizes = (args.seq_len, args.seqs_per_shard, args.rollout_seqs_per_shard, args.rollout_len, args.optimizer)
  if not args.lora_rank:
    print(table(*sizes))
    return
  print(f"LoRA rank {args.lora_rank} (targets q,k,v,o,gate,up,down): params = the frozen base in bf16 (the LM "
        "head's weights, lm_head or the tied embed, kept float32 as the trainer keeps them) + the float32 adapters; "
        "grads and "
        f"{args.optimizer} moments of the adapters alone; no reference copy (the base is the reference). Full FT: "
        + ("reference = the KL reference's bf16 copy (LM head float32), counted in peak." if args.kl else
           "no KL reference copy counted (--kl counts it).") + " peak = params + reference + optimizer + "
        "max(grads + activations, KV cache).\n")
  text, largest = lora_table(*sizes, lora_rank=args.lora_rank, kl=args.kl, device_gib=args.device_gib)
  print(text)
  print(f"\nLargest model of the table whose peak fits one {args.device_gib:g} GiB device: "
        + "; ".join(f"{k}: {v or 'none'}" for k, v in largest.items()))


if __name__ == "__main__":
  main()
