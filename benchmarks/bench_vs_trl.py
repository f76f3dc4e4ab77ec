"""One RL iteration of cispo_jax next to TRL's GRPOTrainer doing the same work, on the same CPU.

  pip install -r requirements-bench.txt                      # trl (+ accelerate, datasets); torch from -dev
  python benchmarks/bench_vs_trl.py --model 3m --threads 1   # 2 warm-up + 6 timed iterations each
  python benchmarks/bench_vs_trl.py --model 27m --threads 1 --iterations 3 --warmup 1
  python benchmarks/bench_vs_trl.py --ours_only              # no torch/trl needed
  python benchmarks/bench_vs_trl.py --rl old_logps_in_update=False   # any field of our RLConfig or its sections

The work (identical on both sides)
  * One random Qwen2 HF directory (`cispo_jax.model.tiny.make_tiny_model_dir`, character tokenizer over
    `cispo_jax.data.ALPHABET`, 23 tokens), loaded by both: `--model 3m` = hidden 256, 4 layers, 4 heads /
    2 KV heads, MLP 768 (3.2M params); `--model 27m` = hidden 512, 8 layers, 8 heads / 8 KV heads (plain
    multi-head attention; that is what makes it 27M), MLP 1536. float32 everywhere (TRL's GRPOConfig
    defaults to bf16=True: set False here), no gradient checkpointing (TRL defaults it on: set off).
  * Prompts: the built-in arithmetic task (`make_sources(TaskConfig())`), 8 prompts x 8 generations,
    <= 32 new tokens, temperature 1, no top-k/top-p. The SAME prompts in the same order: ours draws them
    from its PromptStream; the TRL process rebuilds that stream with the same seed and feeds the
    prompts unshuffled (shuffle_dataset=False); the script checks that both saw the same prompts.
  * Reward: `hash_reward` below, a number in [0, 1) from the completion text's CRC-32 (EOS excluded), the
    same function on both sides: deterministic, cheap, varying within groups, and favouring no length
    (a length reward makes the generated lengths drift up during the run). Groups whose 8 rewards happen
    to be equal are not dropped by either side: ours runs with UpdateConfig.filter_zero_variance=False (TRL
    has no such filter; such a group gets advantage 0 on both sides, and its tokens are still computed).
  * Loss: CISPO, epsilon_high 5.0, no KL (TRL beta=0.0, so it builds no reference model; ours kl_coef=0),
    group-normalised (GRPO) advantages, AdamW (b1 .9, b2 .999, eps 1e-8, no weight decay), global-norm
    clip 1.0, constant learning rate (--lr, same on both).
  * Two passes over each rollout, one optimizer step per pass over all 64 completions.
    Ours: UpdateConfig(num_iterations=2, num_minibatches=1, micro_batches=1).
    TRL 1.16 (read from trl/trainer/grpo_config.py and grpo_trainer.py): an optimizer step is
    per_device_train_batch_size x gradient_accumulation_steps completions; a generation batch is
    per_device_train_batch_size x steps_per_generation completions, generated once every
    steps_per_generation x num_iterations calls of training_step and then reused. With
    per_device_train_batch_size=64, gradient_accumulation_steps=1, steps_per_generation=1 (so
    generation_batch_size=64 = 8 prompts x 8) and num_iterations=2, TRL generates 64 completions, then
    takes 2 optimizer steps over all 64 (one forward+backward each), then generates again: one TRL
    "iteration" = 2 optimizer steps = ours' one `Trainer.step()`. Because gradient_accumulation_steps (1)
    is not a multiple of steps_per_generation x num_iterations (2), TRL runs a separate no-grad forward
    for the old log-probs after generating. Ours, by default (UpdateConfig.old_logps_in_update, with one
    minibatch), takes them from the update's first forward, which runs the sampling params on every row
    anyway: one forward less per iteration (--rl old_logps_in_update=False brings the separate one back).

How it is run
  Two long-lived processes (multiprocessing, spawn), one per framework, driven over pipes by this
  coordinator, which lets them take turns one iteration at a time (ours, TRL, ours, TRL, ...), so the
  other one is idle (blocked on its pipe) and both see the same machine load. Ours builds
  `cispo_jax.trainer.Trainer` and calls `trainer.step()` per turn; TRL runs `GRPOTrainer.train()`,
  and a TrainerCallback blocks at each iteration boundary (on_step_end of every 2nd optimizer step,
  and on_train_begin) until the coordinator says go, and reports the iteration's timings.
  Set-up and the matmul peaks are measured in turn too. `--threads N` pins each worker to N CPUs
  (torch.set_num_threads(N); XLA sizes its pool from the affinity): on a machine that other jobs load,
  torch's OpenMP threads slow down badly when they outnumber the free cores (measured here: transformers
  `generate` 5-20x slower with 2 threads than with 1 at load 8 on 2 CPUs), so compare pinned runs there.
  The 1-minute load average before each turn is printed with the results. `--warmup` iterations (ours
  compiles its programs there) are reported apart from the `--iterations` timed ones. Worker logs go to
  --log_dir.

What is timed (seconds, wall clock, perf_counter)
  iteration   ours: around trainer.step(); TRL: from the callback's go to the next iteration boundary
              (includes fetching the batch from the dataloader).
  generation  ours: time/rollout_s (encode + jitted sampler + to host). TRL: its `_generate`
              (tokenise, transformers `generate` with KV cache, decode), wrapped on the instance.
  reward      ours: time/reward_s (decode, reward worker process, advantages). TRL: `_calculate_rewards`.
  old logps   ours: time/logps_s (with UpdateConfig.old_logps_in_update, on by default when num_minibatches=1,
              there is no separate forward: the update's first forward gives them, and this is only the
              update batch's host preparation). TRL: the no-grad calls of `_get_per_token_logps_and_entropies`.
  rollout     generation + reward + old log-probs. TRL: the whole `_generate_and_score_completions`
              (so also its padding, advantage and metric bookkeeping).
  update      ours: time/update_s (the jitted 2-pass update). TRL: iteration - rollout (the two
              training_step calls: forward, backward, clip, AdamW, TRL's loss metrics, + the batch fetch).
  Lengths: ours from the sampler's output (wrapped `Trainer._generate`), TRL from `_generate`'s token
  lists; both count the EOS token as a completion token.

FLOPs (counted analytically; a multiply-add = 2 FLOPs)
  Shape: hidden d, layers L, heads H, KV heads K, head dim h, MLP width F, vocab V.
  Weights per layer that multiply each token: W = d*H*h (q) + 2*d*K*h (k, v) + H*h*d (o) + 3*d*F (MLP).
  A forward over a batch of `tok` token positions, `pairs` (query, key) attention pairs and `lgt`
  positions whose logits are computed:
      fwd = 2*L*W*tok + 4*L*H*h*pairs + 2*d*V*lgt         (QK^T and AV: 2*h each per pair and head)
  (norms, rotary, softmax, biases and the loss are left out: < 1% here.)
  Training forward, per sequence of p prompt + c completion tokens: tok = p+c, pairs = causal
  (p+c)(p+c+1)/2, lgt = c. backward = 2 x forward, so the update = num_iterations x 3 x fwd over the
  batch and the old-log-prob pass = 1 x fwd (none for ours when the update's first forward gives them).
  Sampler: prefill of each distinct prompt's first p-1 tokens (tok p-1, causal pairs), then for each
  of the 64 rows c one-token forwards, the i-th (i = 0..c-1) attending to p+i keys, each with logits.
  "useful" = these formulas on the real (unpadded) lengths. "executed" = what the program computes on
  its padded shapes, with dense attention: ours trains on [rows, bucket(8) + width] (pairs = T^2, logits
  on all `width` completion slots; rows and width from the step's metrics update/rows and
  update/completion_width when the trainer reports them: UpdateConfig.trim_completions cuts the width to the
  longest completion rounded up to 8 x {1, 2, 3, 4, 6, ...}; else all 64 rows x 32), prefills 8 prompts
  once and decodes max(c) steps over all 64 rows, every step (and the prefill) attending to the whole
  cache of bucket + 32 - 1 slots; TRL trains on [64, max p + max c], prefills all 64 rows (max p tokens
  each, logits for the last) and decodes max(c) - 1 steps
  over all 64 rows with a growing cache. GFLOP/s = FLOPs / the phase's seconds (per iteration, median).
  Peak: an f32 2048x2048 matmul chain (best of 3 before and 3 after the iterations), in JAX for ours and
  in torch for TRL, measured in each worker in its turn.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

MODELS = {  # make_tiny_model_dir arguments
    "3m": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768),
    "27m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1536),
}
STEPS_PER_ITERATION = 2  # optimizer steps per RL iteration: num_iterations=2 passes x 1 minibatch
INSTALL_HINT = "pip install -r requirements-bench.txt"


# ------------------------------------------------------------------------------------------- reward

def hash_reward(completion: str, example=None) -> float:
  """A number in [0, 1) from the completion's CRC-32: cheap, deterministic, and it varies within a group
  (two different completions almost never tie), while favouring no length, so the generated lengths do
  not drift during the benchmark (a length reward makes both policies grow longer within a few
  iterations, by different amounts, and the timed work with them).

  ours: `TaskConfig.rewards=(("bench_vs_trl:hash_reward", 1.0),)`, called (completion, example) in
  its reward worker; TRL: `trl_hash_reward` below. Both get the text without the EOS token.
  """
  return (zlib.crc32(completion.encode()) % 1000) / 1000.0


def trl_hash_reward(prompts, completions, **kwargs) -> list[float]:
  return [hash_reward(c) for c in completions]


# -------------------------------------------------------------------------------------------- FLOPs

@dataclasses.dataclass(frozen=True)
class Shape:
  d: int
  L: int
  H: int
  K: int
  h: int
  F: int
  V: int

  @classmethod
  def from_model_dir(cls, model_dir: str) -> "Shape":
    with open(os.path.join(model_dir, "config.json")) as f:
      c = json.load(f)
    heads = c["num_attention_heads"]
    return cls(d=c["hidden_size"], L=c["num_hidden_layers"], H=heads, K=c.get("num_key_value_heads", heads),
               h=c.get("head_dim") or c["hidden_size"] // heads, F=c["intermediate_size"], V=c["vocab_size"])

  @property
  def W(self) -> int:  # weights per layer that multiply every token
    return self.d * self.H * self.h + 2 * self.d * self.K * self.h + self.H * self.h * self.d + 3 * self.d * self.F

  def fwd(self, tok: float, pairs: float, lgt: float) -> float:
    return 2 * self.L * self.W * tok + 4 * self.L * self.H * self.h * pairs + 2 * self.d * self.V * lgt


def _causal(t: int) -> int:
  return t * (t + 1) // 2


def iteration_flops(s: Shape, rep: dict, side: str, passes: int, group: int) -> dict[str, tuple[float, float]]:
  """{"update" | "logps" | "sampler": (useful FLOPs, executed FLOPs)} for one iteration's report."""
  p, c = rep["prompt_lens"], rep["comp_lens"]
  B = len(p)
  train_useful = s.fwd(sum(a + b for a, b in zip(p, c)), sum(_causal(a + b) for a, b in zip(p, c)), sum(c))
  uniq = p[::group]
  prefill = s.fwd(sum(a - 1 for a in uniq), sum(_causal(a - 1) for a in uniq), 0)
  decode = s.fwd(sum(c), sum(sum(a + i for i in range(b)) for a, b in zip(p, c)), sum(c))
  sampler_useful = prefill + decode
  cmax = max(c)
  if side == "ours":
    P, N = rep["prompt_bucket"], rep["new_tokens"]
    S = P + N - 1
    R, w = int(rep.get("update_rows") or B), int(rep.get("update_width") or N)  # trimmed / compacted update batch
    T = P + w
    train_exec = s.fwd(R * T, R * T * T, R * w)
    sampler_exec = s.fwd(len(uniq) * (P - 1), len(uniq) * (P - 1) * S, 0) + s.fwd(B * cmax, B * cmax * S, B * cmax)
  else:
    Pm = max(p)
    T = Pm + cmax
    train_exec = s.fwd(B * T, B * T * T, B * cmax)
    steps = cmax - 1
    sampler_exec = (s.fwd(B * Pm, B * Pm * Pm, B)
                    + s.fwd(B * steps, B * sum(Pm + i for i in range(1, steps + 1)), B * steps))
  return {"update": (passes * 3 * train_useful, passes * 3 * train_exec),
          "logps": (train_useful, train_exec),
          "sampler": (sampler_useful, sampler_exec)}


# ------------------------------------------------------------------------------------ matmul peaks

def jax_matmul_peak(n: int = 2048, chain: int = 4, tries: int = 3) -> float:
  """GFLOP/s of a jitted chain of `chain` f32 n x n matmuls, best of `tries` after a warm-up."""
  import jax
  import jax.numpy as jnp

  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), jnp.float32)
  b = jax.random.normal(k2, (n, n), jnp.float32) / math.sqrt(n)  # keeps the chain's values O(1)
  f = jax.jit(lambda x, y: jax.lax.fori_loop(0, chain, lambda i, z: z @ y, x))
  f(a, b).block_until_ready()
  best = math.inf
  for _ in range(tries):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return chain * 2 * n ** 3 / best / 1e9


def torch_matmul_peak(n: int = 2048, chain: int = 4, tries: int = 3) -> float:
  import torch

  g = torch.Generator().manual_seed(0)
  a = torch.randn(n, n, generator=g)
  b = torch.randn(n, n, generator=g) / math.sqrt(n)
  with torch.inference_mode():
    def run():
      z = a
      for _ in range(chain):
        z = z @ b
      return z
    run()
    best = math.inf
    for _ in range(tries):
      t0 = time.perf_counter()
      run()
      best = min(best, time.perf_counter() - t0)
  return chain * 2 * n ** 3 / best / 1e9


# ------------------------------------------------------------------------------------------ workers

class StopBench(Exception):
  """The coordinator said stop (raised inside TRL's train loop to leave it)."""


def _redirect_output(log_path: str):
  """Libraries print (warnings, progress bars): keep the coordinator's tables clean."""
  f = open(log_path, "a", buffering=1)
  os.dup2(f.fileno(), 1)
  os.dup2(f.fileno(), 2)
  sys.stdout = sys.stderr = f


def _limit_threads(n: int):
  """Pin this process to n of its CPUs before jax / torch start their thread pools (both size them
  from the CPU affinity), so each framework computes on n threads."""
  if n > 0 and hasattr(os, "sched_setaffinity"):
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:n])


def worker_main(side: str, conn, args: dict, model_dir: str, log_path: str):
  _redirect_output(log_path)
  _limit_threads(args["threads"])
  try:
    (_ours_worker if side == "ours" else _trl_worker)(conn, args, model_dir)
  except StopBench:
    pass
  except BaseException:  # noqa: BLE001 -- reported to the coordinator, which carries on without us
    tb = traceback.format_exc()
    print(tb, flush=True)
    try:
      conn.send(("error", tb))
    except Exception:  # noqa: BLE001
      pass
  finally:
    conn.close()


def _ours_worker(conn, a: dict, model_dir: str):
  os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, ROOT, os.environ.get("PYTHONPATH")]))
  t0 = time.perf_counter()
  import jax
  import numpy as np

  from cispo_jax import sharding
  from cispo_jax.rl import losses
  from cispo_jax.rl.optim import OptimConfig
  from cispo_jax.task import TaskConfig
  from cispo_jax.trainer import RLConfig
  from cispo_jax.trainer import Trainer

  total = a["warmup"] + a["iterations"]
  fields = dict(run_dir=os.path.join(a["work_dir"], "ours_run"), model_dir=model_dir, total_steps=total,
                prompts_per_step=a["prompts"], num_generations=a["generations"], num_iterations=2,
                num_minibatches=1, micro_batches=1, max_new_tokens=a["new_tokens"], temperature=1.0,
                filter_zero_variance=False, eval_every=10 ** 9, save_every=10 ** 9, export_final=False,
                seed=a["seed"], dtype="float32", param_dtype="float32", remat=False)
  rl = RLConfig().replace(**{**fields, **a["rl"]})  # --rl FIELD=VALUE overrides any of these (flat names)
  loss = losses.LossConfig(loss_type="cispo", epsilon_high=5.0, kl_coef=0.0)
  optim = OptimConfig(learning_rate=a["lr"], schedule="constant", warmup_steps=0, weight_decay=0.0,
                      max_grad_norm=1.0)
  task = TaskConfig(task="arithmetic", rewards=(("bench_vs_trl:hash_reward", 1.0),))
  trainer = Trainer(rl, loss, optim, sharding.MeshConfig(fsdp=1), task, devices=jax.devices()[:1])

  # UpdateConfig.old_logps_in_update: the old log-probs come out of the update's first forward (no separate pass).
  old_separate = not trainer.fns.old_logps_in_update
  seen: dict = {}
  generate = getattr(trainer, "_generate", None)
  if generate is not None:  # the lengths and padded shapes for the FLOP count
    def recording_generate(params, examples, key, cfg):
      out = generate(params, examples, key, cfg)
      if cfg is trainer.train_sampling:
        seen.update(prompts=[e.prompt for e in examples],
                    prompt_lens=np.asarray(out.prompt_mask_BxP).sum(1).astype(int).tolist(),
                    prompt_bucket=int(np.asarray(out.prompt_tokens_BxP).shape[1]),
                    new_tokens=int(np.asarray(out.tokens_BxN).shape[1]),
                    comp_lens=np.asarray(out.lengths_B).astype(int).tolist())
      return out
    trainer._generate = recording_generate
  work = {k: getattr(rl.update, k) for k in ("compact_groups", "trim_completions", "old_logps_in_update")}
  conn.send(("ready", {"setup_s": time.perf_counter() - t0, "version": f"jax {jax.__version__}",
                       "backend": f"{jax.default_backend()}, {len(jax.devices())} device(s)",
                       "config": {"num_iterations": rl.update.num_iterations,
                                  "num_minibatches": rl.update.num_minibatches,
                                  "micro_batches": rl.update.micro_batches,
                                  "filter_zero_variance": rl.update.filter_zero_variance, **work}}))
  try:
    while True:
      cmd = conn.recv()
      if cmd == "peak":
        conn.send(("peak", jax_matmul_peak()))
      elif cmd == "step":
        seen.clear()
        t = time.perf_counter()
        m = trainer.step()
        wall = time.perf_counter() - t
        rep = {"iteration": wall, "generation": m["time/rollout_s"], "reward": m["time/reward_s"],
               "logps": m["time/logps_s"], "update": m["time/update_s"],
               "rollout": m["time/rollout_s"] + m["time/reward_s"] + m["time/logps_s"],
               "mean_completion": m["completion/length"], "skipped": m.get("train/skipped_no_signal", 0.0),
               "reward_mean": m["reward/mean"], "update_rows": m.get("update/rows"),
               "update_width": m.get("update/completion_width"), "old_logps_separate": old_separate, **seen}
        conn.send(("step", rep))
      elif cmd == "stop":
        break
  finally:
    trainer.close()


def _trl_worker(conn, a: dict, model_dir: str):
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  t0 = time.perf_counter()
  import datasets
  import torch
  import transformers
  import trl
  from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  from trl import GRPOConfig, GRPOTrainer

  from cispo_jax.data import PromptStream
  from cispo_jax.task import TaskConfig, make_sources

  total = a["warmup"] + a["iterations"]
  # Ours' prompt order: its PromptStream over the same source with the same seed (checked per iteration).
  train_src, _ = make_sources(TaskConfig(task="arithmetic"), seed=a["seed"])
  stream = PromptStream(train_src, a["prompts"], seed=a["seed"])
  rows = [{"prompt": e.prompt} for _ in range(total) for e in stream.next_batch()]
  batch = a["prompts"] * a["generations"]
  cfg = GRPOConfig(
      output_dir=os.path.join(a["work_dir"], "trl_run"), use_cpu=True, bf16=False, fp16=False,
      per_device_train_batch_size=batch, gradient_accumulation_steps=1, steps_per_generation=1,
      num_generations=a["generations"], num_iterations=2, max_steps=STEPS_PER_ITERATION * total,
      max_completion_length=a["new_tokens"], temperature=1.0, top_p=1.0, top_k=0, min_p=None,
      repetition_penalty=1.0, beta=0.0, loss_type="cispo", epsilon_high=5.0, scale_rewards="group",
      mask_truncated_completions=False, learning_rate=a["lr"], lr_scheduler_type="constant", warmup_steps=0,
      weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
      optim="adamw_torch", gradient_checkpointing=False, shuffle_dataset=False, seed=a["seed"],
      logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
      log_completions=False, dataloader_num_workers=0)
  if a["threads"] > 0:
    torch.set_num_threads(a["threads"])
  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  phase: dict = {}

  class TurnTaking(TrainerCallback):
    """Blocks at every iteration boundary until the coordinator says go; reports the iteration."""

    def __init__(self):
      self.t_go = None

    def _wait(self):
      while True:
        cmd = conn.recv()
        if cmd == "peak":
          conn.send(("peak", torch_matmul_peak()))
        elif cmd == "step":
          phase.clear()
          self.t_go = time.perf_counter()
          return
        else:
          raise StopBench

    def on_train_begin(self, args, state, control, **kwargs):
      # Ready only now: train() has built its optimizer and dataloader, so nothing of TRL's runs
      # while the coordinator measures the other side.
      conn.send(("ready", ready_info()))
      self._wait()

    def on_step_end(self, args, state, control, **kwargs):
      if state.global_step % STEPS_PER_ITERATION:
        return
      wall = time.perf_counter() - self.t_go
      get = lambda k: phase.get(k, 0.0)
      rep = {"iteration": wall, "generation": get("generation"), "reward": get("reward"), "logps": get("logps"),
             "rollout": get("rollout"), "update": wall - get("rollout"), "train_forward": get("train_forward"),
             "mean_completion": statistics.fmean(phase["comp_lens"]),
             **{k: phase[k] for k in ("prompts", "prompt_lens", "comp_lens")}}
      conn.send(("step", rep))
      self._wait()

  trainer = GRPOTrainer(model=model, reward_funcs=trl_hash_reward, args=cfg,
                        train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                        callbacks=[TurnTaking()])

  def add(key, dt):
    phase[key] = phase.get(key, 0.0) + dt

  def timed(name, fn, key_of=None):
    def wrapper(*args, **kwargs):
      t = time.perf_counter()
      out = fn(*args, **kwargs)
      add(key_of() if key_of else name, time.perf_counter() - t)
      if name == "generation":
        phase["prompt_lens"] = [len(x) for x in out[0]]
        phase["comp_lens"] = [len(x) for x in out[1]]
      elif name == "rollout":
        phase["prompts"] = [x["prompt"] for x in args[0][::a["generations"]]]
      return out
    return wrapper

  # Instance attributes shadow the methods: TRL calls them through self.
  trainer._generate = timed("generation", trainer._generate)
  trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
  trainer._generate_and_score_completions = timed("rollout", trainer._generate_and_score_completions)
  trainer._get_per_token_logps_and_entropies = timed(
      "forward", trainer._get_per_token_logps_and_entropies,
      key_of=lambda: "train_forward" if torch.is_grad_enabled() else "logps")
  def ready_info():
    return {
        "setup_s": time.perf_counter() - t0,
        "version": f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}",
        "backend": f"cpu, torch threads {torch.get_num_threads()}",
        "config": {k: getattr(getattr(cfg, k), "value", getattr(cfg, k)) for k in (
            "generation_batch_size", "steps_per_generation", "per_device_train_batch_size",
            "gradient_accumulation_steps", "num_iterations", "bf16", "gradient_checkpointing", "optim")},
        "ref_model": getattr(trainer, "ref_model", None) is not None}

  trainer.train()
  conn.send(("finished", None))


# ------------------------------------------------------------------------------------- coordinator

class Side:
  def __init__(self, name: str, label: str, args, model_dir: str):
    self.name, self.label, self.error = name, label, None
    self.log = os.path.join(args.log_dir, f"{name}.log")
    ctx = multiprocessing.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=worker_main, name=f"bench-{name}", daemon=False,
                            args=(name, child, vars(args), model_dir, self.log))
    self.proc.start()
    child.close()
    self.info, self.peak, self.warm, self.timed = {}, None, [], []

  def ask(self, cmd: str, timeout: float):
    """Send cmd, wait for the answer; None (and self.error set) if the worker failed."""
    if self.error:
      return None
    try:
      if cmd is not None:
        self.conn.send(cmd)
      deadline = time.time() + timeout
      while not self.conn.poll(1.0):
        if not self.proc.is_alive():
          raise EOFError(f"exit code {self.proc.exitcode}")
        if time.time() > deadline:
          raise TimeoutError(f"no answer in {timeout:.0f} s")
      kind, payload = self.conn.recv()
    except (EOFError, OSError, TimeoutError) as e:
      self.error = f"{type(e).__name__}: {e} (log: {self.log})"
      return None
    if kind == "error":
      self.error = payload.strip().splitlines()[-1] + f" (traceback in {self.log})"
      return None
    if kind == "finished":
      self.error = "training ended before the coordinator's last iteration"
      return None
    return payload

  def close(self):
    try:
      if self.proc.is_alive():
        self.conn.send("stop")
    except OSError:
      pass
    self.proc.join(60)
    if self.proc.is_alive():
      self.proc.terminate()
      self.proc.join(10)


def _git_state() -> str:
  import subprocess

  try:
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "cispo_jax"], capture_output=True,
                           text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "git: unknown"
  return f"git {head or 'unknown'}" + (" + uncommitted changes in cispo_jax/" if dirty else "")


def _fmt(xs, digits=3):
  if not xs:
    return "n/a"
  med = statistics.median(xs)
  return f"{med:.{digits}g} [{min(xs):.{digits}g}-{max(xs):.{digits}g}]"


def _ratio(a, b):
  return f"{statistics.median(a) / statistics.median(b):.2f}" if a and b and statistics.median(b) > 0 else "n/a"


def report(args, shape: Shape, sides: dict, n_params: float):
  ours, trl = sides.get("ours"), sides.get("trl")
  live = [s for s in sides.values() if s.timed]
  print()
  print(f"### {args.model}: {n_params / 1e6:.1f}M params (hidden {shape.d}, {shape.L} layers, {shape.H} heads / "
        f"{shape.K} KV, MLP {shape.F}, vocab {shape.V}); {args.prompts} prompts x {args.generations} generations, "
        f"<= {args.new_tokens} new tokens, 2 passes, float32, CPU ({os.cpu_count()} cores)")
  for s in sides.values():
    if s.info:
      print(f"- {s.label}: {s.info.get('version')}; {s.info.get('backend')}; set-up {s.info['setup_s']:.1f} s"
            + (f"; matmul peak {s.peak:.1f} GFLOP/s (2048x2048 f32, best of 3 before + 3 after the run)"
               if s.peak else ""))
    if s.error:
      print(f"- {s.label}: FAILED: {s.error}")
  if ours and ours.info.get("config"):
    print(f"- cispo_jax UpdateConfig (update work): {json.dumps(ours.info['config'])}")
  if trl and trl.info.get("config"):
    print(f"- TRL GRPOConfig as resolved: {json.dumps(trl.info['config'], default=str)}; reference model "
          f"built: {trl.info.get('ref_model')}")
  for s in live:
    if s.warm:
      print(f"- {s.label} warm-up iterations (s): " + ", ".join(f"{r['iteration']:.2f}" for r in s.warm))
  if ours and trl and ours.timed and trl.timed:
    both = ours.warm + ours.timed, trl.warm + trl.timed
    same = sum(a.get("prompts") == b.get("prompts") for a, b in zip(*both))
    print(f"- same prompts in both: {same} of {min(map(len, both))} iterations")
  loads = [r["load_before"] for s in live for r in s.timed if "load_before" in r]
  if loads:
    print(f"- machine load (1-min load average before each timed turn; {os.cpu_count()} CPUs): {_fmt(loads, 2)}"
          + (f"; workers pinned to {args.threads} CPU(s) each" if args.threads
             else "; no pinning (library thread defaults)"))
  print()
  print(f"Timed: {args.iterations} iterations each, taking turns; seconds, median [min-max]")
  print()
  cols = [s for s in (ours, trl) if s and s.timed]
  head = "| phase | " + " | ".join(s.label for s in cols) + (" | TRL / ours |" if len(cols) == 2 else " |")
  print(head)
  print("|" + "---|" * (head.count("|") - 1))
  rows = [("iteration", "iteration"), ("generation", "generation"), ("reward", "reward"),
          ("old log-probs", "logps"), ("rollout (generation + reward + old log-probs)", "rollout"),
          ("update (2 optimizer steps)", "update")]
  fused = ours in cols and not all(r.get("old_logps_separate", True) for r in ours.timed)
  for title, key in rows:
    vals = [[r[key] for r in s.timed] for s in cols]
    if key == "logps" and fused:
      title += " (ours: no separate forward, see below)"
    line = f"| {title} | " + " | ".join(_fmt(v) for v in vals)
    ratio = "-" if key == "logps" and fused else _ratio(vals[1], vals[0]) if len(cols) == 2 else ""
    print(line + (f" | {ratio} |" if len(cols) == 2 else " |"))
  for title, fn in (("mean completion tokens (incl. EOS)", lambda r: statistics.fmean(r["comp_lens"])),
                    ("mean prompt tokens", lambda r: statistics.fmean(r["prompt_lens"]))):
    vals = [[fn(r) for r in s.timed if r.get("comp_lens")] for s in cols]
    print(f"| {title} | " + " | ".join(_fmt(v) for v in vals) + (" | |" if len(cols) == 2 else " |"))
  shapes = []
  for s in cols:
    r = s.timed[-1]
    if s.name == "ours" and "prompt_bucket" in r:
      widths = [x.get("update_width") or x["new_tokens"] for x in s.timed]
      shapes.append(f"bucket {r['prompt_bucket']} + update width {_fmt(widths)}")
    elif s.name == "trl":
      shapes.append("max p + max c: " + _fmt([max(x["prompt_lens"]) + max(x["comp_lens"]) for x in s.timed]))
    else:
      shapes.append("n/a")
  print("| training sequence width (prompt + completion) | " + " | ".join(shapes)
        + (" | |" if len(cols) == 2 else " |"))

  print()
  print("Achieved FLOP rate, median over the timed iterations (formulas in the docstring); % of the same "
        "framework's matmul peak")
  print()
  print("| program | framework | GFLOP useful | GFLOP executed | seconds | GFLOP/s useful (% peak) | "
        "GFLOP/s executed (% peak) |")
  print("|---|---|---|---|---|---|---|")
  for prog, key, title in (("update", "update", "update (2 x fwd+bwd)"),
                           ("logps", "logps", "old log-prob forward"),
                           ("sampler", "generation", "sampler")):
    for s in cols:
      reps = [r for r in s.timed if r.get("comp_lens") and (s.name != "ours" or "prompt_bucket" in r)]
      if not reps:
        print(f"| {title} | {s.label} | n/a (no lengths recorded) |||||")
        continue
      if prog == "logps" and not all(r.get("old_logps_separate", True) for r in reps):
        print(f"| {title} | {s.label} | none: taken from the update's first forward (old_logps_in_update) |||||")
        continue
      fl = [iteration_flops(shape, r, s.name, STEPS_PER_ITERATION, args.generations)[prog] for r in reps]
      secs = [r[key] for r in reps]
      useful = [f[0] / t / 1e9 for f, t in zip(fl, secs)]
      execd = [f[1] / t / 1e9 for f, t in zip(fl, secs)]
      pk = lambda g: f" ({100 * statistics.median(g) / s.peak:.0f}%)" if s.peak else ""
      print(f"| {title} | {s.label} | {statistics.median([f[0] for f in fl]) / 1e9:.2f} | "
            f"{statistics.median([f[1] for f in fl]) / 1e9:.2f} | {statistics.median(secs):.3g} | "
            f"{statistics.median(useful):.1f}{pk(useful)} | {statistics.median(execd):.1f}{pk(execd)} |")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="3m", choices=sorted(MODELS))
  ap.add_argument("--iterations", type=int, default=6, help="timed iterations per framework")
  ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first (ours compiles here)")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--generations", type=int, default=8)
  ap.add_argument("--new_tokens", type=int, default=32)
  ap.add_argument("--lr", type=float, default=1e-5)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--ours_only", action="store_true", help="skip TRL (also automatic when trl is missing)")
  ap.add_argument("--rl", action="append", default=[], metavar="FIELD=VALUE",
                  help="override a field of our RLConfig or its sections, by its name (repeatable), e.g. "
                       "--rl old_logps_in_update=False")
  ap.add_argument("--threads", type=int, default=0,
                  help="pin each worker to this many CPUs (torch threads set to match); 0 = library defaults")
  ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for one worker answer")
  ap.add_argument("--log_dir", default="", help="worker logs (default: a new temporary directory)")
  args = ap.parse_args(argv)
  if args.iterations < 1 or args.warmup < 0 or args.generations < 2 or args.prompts < 1:
    ap.error("need --iterations >= 1, --warmup >= 0, --generations >= 2, --prompts >= 1")

  overrides = {}
  for item in args.rl:
    field, sep, value = item.partition("=")
    if not sep:
      ap.error(f"--rl {item!r}: expected FIELD=VALUE")
    try:
      overrides[field.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      overrides[field.strip()] = value.strip()
  args.rl = overrides

  import importlib.util
  run_trl = not args.ours_only
  if run_trl:
    missing = [m for m in ("torch", "trl", "datasets", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
      print(f"TRL side skipped: {', '.join(missing)} not installed. To compare against TRL: {INSTALL_HINT}\n"
            "Running cispo_jax alone.", flush=True)
      run_trl = False

  from cispo_jax.data import ALPHABET
  from cispo_jax.model.tiny import build_char_tokenizer, make_tiny_model_dir

  with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as work:
    args.work_dir = work
    args.log_dir = args.log_dir or os.path.join(work, "logs")
    if not args.log_dir.startswith(work):  # kept after the run
      args.log_dir = os.path.abspath(args.log_dir)
    os.makedirs(args.log_dir, exist_ok=True)
    model_dir = make_tiny_model_dir(os.path.join(work, "model"), "qwen2", tokenizer=build_char_tokenizer(ALPHABET),
                                    seed=args.seed, **MODELS[args.model])
    shape = Shape.from_model_dir(model_dir)
    n_params = shape.L * shape.W + 2 * shape.V * shape.d  # + untied embedding and LM head (biases, norms left out)
    print(f"bench_vs_trl: model {args.model} ({n_params / 1e6:.1f}M), python {platform.python_version()}, "
          f"{os.cpu_count()} CPU cores, {_git_state()}; worker logs in {args.log_dir}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * (os.cpu_count() or 1) and not args.threads:
      print(f"note: load average {load:.1f} on {os.cpu_count()} CPUs from other jobs; torch's OpenMP threads slow "
            "down badly when cores are busy: consider --threads 1 (see the docstring)", flush=True)

    sides: dict[str, Side] = {}
    try:
      # Set-up and peaks one at a time, so neither is measured while the other is busy.
      for name, label in (("ours", "cispo_jax"), ("trl", "TRL")):
        if name == "trl" and not run_trl:
          continue
        side = sides[name] = Side(name, label, args, model_dir)
        side.info = side.ask(None, args.timeout) or {}
        print(f"{label}: ready" + (f" ({side.info['setup_s']:.1f} s)" if side.info else f": {side.error}"),
              flush=True)
      for side in sides.values():
        side.peak = side.ask("peak", args.timeout)
      total = args.warmup + args.iterations
      for i in range(total):
        for side in sides.values():  # ours, TRL, ours, TRL, ...
          load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
          rep = side.ask("step", args.timeout)
          if rep is None:
            continue
          rep["load_before"] = load
          (side.warm if i < args.warmup else side.timed).append(rep)
          print(f"  iteration {i + 1}/{total} {'(warm-up) ' if i < args.warmup else ''}{side.label}: "
                f"{rep['iteration']:.2f} s, mean completion {rep['mean_completion']:.1f} tokens", flush=True)
      for side in sides.values():  # again after the run: the best of both is the peak (a loaded machine
        after = side.ask("peak", args.timeout)  # only ever makes a measurement slower)
        side.peak = max(filter(None, (side.peak, after)), default=None)
    finally:
      for side in sides.values():
        side.close()
    report(args, shape, sides, n_params)
    failed = [s for s in sides.values() if s.error]
    for s in failed:
      print(f"\n{s.label} failed: {s.error}")
      if os.path.exists(s.log):
        with open(s.log) as f:
          print("".join(f.readlines()[-30:]))
    if args.log_dir.startswith(work):
      print(f"\n(worker logs were in {args.log_dir}, removed; pass --log_dir to keep them)")
    return 1 if "ours" in sides and sides["ours"].error else 0


if __name__ == "__main__":
  sys.exit(main())
