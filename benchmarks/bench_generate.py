"""Generation throughput: cispo_jax.rollout.sampling.generate vs transformers `generate`, same model dir.

Both sides: a random ~3.2M-parameter Qwen2 (hidden 256, 4 layers, MLP 768, 4 heads / 2 KV
heads) with a character-level tokenizer, float32, CPU, 64 prompts, exactly 32 new tokens each
(ours: no stop ids; HF: min_new_tokens=32), the same decoding on both sides (ancestral
sampling at temperature 1 with no top-k/top-p, or --greedy). Timed after one warm-up call
each (ours: the compile), runs interleaved ours/HF so machine load hits both alike; medians.

  python benchmarks/bench_generate.py [--runs 7] [--greedy] [--batch 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make_prompts(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [f"Q: {rng.randint(0, 999)}+{rng.randint(0, 99)}=? A:" for _ in range(n)]  # 12-17 chars


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--runs", type=int, default=7)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=32)
  ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  ap.add_argument("--greedy", action="store_true")
  args = ap.parse_args()

  import jax
  import numpy as np
  import torch
  from transformers import AutoModelForCausalLM

  from cispo_jax.model.hf_io import load_model, load_tokenizer
  from cispo_jax.model.tiny import make_tiny_model_dir
  from cispo_jax.rollout.sampling import SamplingConfig, compile_count, encode_prompts, generate

  torch.set_num_threads(args.threads)
  B, N = args.batch, args.new_tokens
  with tempfile.TemporaryDirectory() as path:
    make_tiny_model_dir(path, family="qwen2", hidden_size=256, intermediate_size=768, num_layers=4,
                        num_heads=4, num_kv_heads=2, seed=0)
    cfg, params = load_model(path)
    tokenizer = load_tokenizer(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  texts = make_prompts(B)

  sc = SamplingConfig(max_new_tokens=N, greedy=args.greedy, temperature=1.0)
  tokens, mask = encode_prompts(tokenizer, texts, sc)
  rng = jax.random.PRNGKey(0)

  def ours():
    out = generate(params, cfg, tokens, mask, rng, sc)
    return jax.block_until_ready(out.tokens_BxN)

  tokenizer.padding_side = "left"
  enc = tokenizer(texts, return_tensors="pt", padding=True)
  sample_kw = dict(do_sample=False) if args.greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)

  def theirs():
    with torch.no_grad():
      return hf.generate(**enc, max_new_tokens=N, min_new_tokens=N, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **sample_kw)

  t0 = time.perf_counter()
  out_ours = ours()
  warm_ours = time.perf_counter() - t0
  out_hf = theirs()
  assert out_ours.shape == (B, N), out_ours.shape
  assert out_hf.shape[1] - enc["input_ids"].shape[1] == N, out_hf.shape
  times = {"ours": [], "hf": []}
  for _ in range(args.runs):
    for name, fn in (("ours", ours), ("hf", theirs)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)

  load = os.getloadavg()[0]
  med = {k: statistics.median(v) for k, v in times.items()}
  tps = {k: B * N / v for k, v in med.items()}
  print(f"model: Qwen2, {n_params / 1e6:.2f}M params, vocab {cfg.vocab_size} (chars), float32, CPU "
        f"({os.cpu_count()} cores; torch threads {args.threads}); jax {jax.__version__}, torch {torch.__version__}")
  print(f"batch {B} prompts of {int(mask.sum(1).min())}-{int(mask.sum(1).max())} tokens "
        f"(bucket {tokens.shape[1]}), {N} new tokens each, "
        f"{'greedy' if args.greedy else 'sampling T=1, no top-k/top-p'}; median of {args.runs} runs, "
        f"first call (compile) {warm_ours:.2f}s, programs compiled {compile_count()}")
  for k, label in (("ours", "cispo_jax generate"), ("hf", "transformers generate")):
    print(f"  {label:22s} {tps[k]:10.0f} tokens/s   ({med[k] * 1e3:7.1f} ms/batch; runs ms: "
          f"{' '.join(f'{t * 1e3:.0f}' for t in times[k])})")
  print(f"  ratio ours / transformers: {tps['ours'] / tps['hf']:.2f}x")
  # Both sides run the same dense matmuls; this says how close each is to the hardware.
  flops_tok = 2 * (n_params - cfg.vocab_size * cfg.hidden_size)  # embedding lookup is free
  fed = {"ours": B * (tokens.shape[1] + N - 1), "hf": B * (enc["input_ids"].shape[1] + N - 1)}
  print(f"  model FLOPs: {flops_tok / 1e6:.1f} MFLOP/token -> ours {fed['ours'] * flops_tok / med['ours'] / 1e9:.0f}"
        f" GFLOP/s, transformers {fed['hf'] * flops_tok / med['hf'] / 1e9:.0f} GFLOP/s (tokens through the"
        f" model incl. prompt padding: {fed['ours']} vs {fed['hf']}); 1-min load average {load:.1f}")


if __name__ == "__main__":
  main()
