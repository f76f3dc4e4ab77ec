"""Fork-token probe: what each loss does to a rare, rewarded first token over off-policy updates.

    python experiments/fork_probe.py --gin_file experiments/cispo.gin --gin_file experiments/fork_task.gin \
        --losses cispo grpo dapo cispo_mask --updates 8 --out experiments/results/fork_probe

One rollout batch is sampled from the warm start of a task whose worked solutions open with a
marker token (TaskConfig.task_args scratchpad_marker, data/tasks.py), scored, and given group
advantages. Then for each loss, from the same start and on the same batch, `--updates` full-batch
optimizer steps: step 1 is on-policy (r = 1), every later one off-policy. Before each step and
after the last:

  P(fork)         the marker's probability as the first completion token, mean over held-out prompts
  fork tokens     the marker at position 0 of completions with A > 0 (the rewarded fork); their
                  mean ratio r and the share of their unclipped gradient -r A the loss keeps
                  (diagnostics.token_gradient_weights: 0 where a PPO clip binds, min(r, cap) / r
                  under CISPO)
  all tokens      diagnostics.accounting_metrics (diag/removed, diag/zeroed, by cell)

The learning rate is the config's, without warmup (a warmup would make the first steps ~0). The
KL term, if configured, is to the warm start, whose log-probs are the batch's old log-probs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

# The probe's loss arms: the fields each sets over the config's LossConfig (KL etc. kept).
LOSSES = {
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "grpo": dict(loss_type="grpo"),
    "dapo": dict(loss_type="dapo"),
    "cispo_mask": dict(loss_type="cispo", cispo_mode="relative", cispo_token_mask=True, epsilon_low=0.2,
                       epsilon_high=0.28),
}
_LOSS_RESET = dict(aggregation=None, epsilon_low=None, epsilon_high=None, cispo_mode="absolute",
                   cispo_token_mask=False, dual_clip=None)


def loss_config(base, name: str):
  if name not in LOSSES:
    raise ValueError(f"fork_probe: unknown loss {name!r}; allowed: {sorted(LOSSES)}")
  return dataclasses.replace(base, **{**_LOSS_RESET, **LOSSES[name]})


def sample_batch(params, model_cfg, tokenizer, rl, task, marker_id: int, key):
  """One rollout as the trainer builds it: (RolloutBatch, fork_BxN, rewards_B, marker_first_B)."""
  from cispo_jax.rl import advantages as adv_lib
  from cispo_jax import data as data_lib
  from cispo_jax.rollout import sampling
  from cispo_jax.task import Scorer, make_sources
  from cispo_jax.rl.train_step import RolloutBatch
  from cispo_jax.rollout.engine import batched_completion_logps

  n = rl.rollout.num_generations
  train_src, _ = make_sources(task, seed=rl.seed)
  examples = data_lib.PromptStream(train_src, rl.prompts_per_step, seed=rl.seed).next_batch()
  sc = sampling_config(rl, tokenizer, n)
  tok, mask = sampling.encode_prompts(tokenizer, [e.prompt for e in examples], sc)
  out = jax.tree.map(np.asarray, sampling.generate(params, model_cfg, tok, mask, key, sc))
  scorer = Scorer(task)
  try:
    rewards_B, _ = scorer(sampling.decode_completions(tokenizer, out), [e for e in examples for _ in range(n)])
  finally:
    scorer.close()
  adv_B, keep_B = map(np.asarray, adv_lib.advantages_and_keep(rewards_B, rl.update.advantage, n,
                                                              rl.update.filter_zero_variance))
  N = out.tokens_BxN.shape[1]
  tokens = jnp.asarray(np.concatenate([out.prompt_tokens_BxP, out.tokens_BxN], 1), jnp.int32)
  kv_valid = jnp.asarray(np.concatenate([out.prompt_mask_BxP, out.mask_BxN], 1), bool)
  loss_mask = np.asarray(out.mask_BxN, np.float32) * keep_B[:, None]
  old = batched_completion_logps(params, tokens, kv_valid, model_cfg=model_cfg, n_completion=N,
                                 temperature=rl.rollout.temperature, micro_batches=1)
  batch = RolloutBatch(tokens, kv_valid, jnp.asarray(loss_mask), old, old,
                       jnp.asarray(np.broadcast_to(adv_B[:, None], loss_mask.shape)),
                       jnp.asarray(np.arange(len(adv_B)) // n, jnp.int32))
  marker_first_B = out.tokens_BxN[:, 0] == marker_id
  fork_BxN = np.zeros(loss_mask.shape, bool)
  fork_BxN[:, 0] = marker_first_B & (loss_mask[:, 0] > 0) & (adv_B > 0)
  return batch, fork_BxN, rewards_B, marker_first_B


def sampling_config(rl, tokenizer, n: int):
  from cispo_jax.rollout import sampling
  ro = rl.rollout
  return sampling.SamplingConfig(
      max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, stop_token_ids=(tokenizer.eos_token_id,),
      num_samples=n, pad_token_id=tokenizer.pad_token_id or 0, prompt_buckets=tuple(ro.prompt_buckets))


def fork_probability_fn(model_cfg, tokenizer, rl, held, marker_id: int):
  """params -> mean over held-out prompts of P(marker | prompt) as the first completion token."""
  from cispo_jax.rollout import sampling
  from cispo_jax.model.logprobs import completion_logps

  tok, mask = sampling.encode_prompts(tokenizer, [e.prompt for e in held], sampling_config(rl, tokenizer, 1))
  tokens = jnp.asarray(np.concatenate([tok, np.full((len(tok), 1), marker_id)], 1), jnp.int32)
  kv_valid = jnp.asarray(np.concatenate([mask, np.ones((len(tok), 1))], 1), bool)

  @jax.jit
  def p_fork(params):
    logps, _ = completion_logps(params, model_cfg, tokens, kv_valid, 1, rl.rollout.temperature)
    return jnp.exp(logps[:, 0]).mean()
  return p_fork


def probe_loss(params, batch, fork_BxN, loss_cfg, *, model_cfg, rl, optim, updates: int, p_fork) -> dict:
  """`updates` full-batch steps of one loss from `params` on `batch`; per-step records."""
  from cispo_jax.rl import diagnostics
  from cispo_jax.rl.optim import make_optimizer
  from cispo_jax.model.logprobs import completion_logps
  from cispo_jax.rl.train_step import StepConfig, TrainState, train_step

  tx, schedule = make_optimizer(dataclasses.replace(optim, warmup_steps=0), updates)
  state = TrainState.create(params, tx, rl.seed)
  cfg = StepConfig(model=model_cfg, loss=loss_cfg, temperature=rl.rollout.temperature, micro_batches=1,
                   num_generations=rl.rollout.num_generations, use_ref=loss_cfg.kl_coef > 0)
  step = jax.jit(functools.partial(train_step, cfg=cfg, tx=tx, schedule=schedule))
  N = batch.mask_BxN.shape[1]

  @jax.jit
  def account(params):
    logps = completion_logps(params, model_cfg, batch.tokens_BxL, batch.kv_valid_BxL, N, rl.rollout.temperature)[0]
    args = (logps, batch.old_logps_BxN, batch.adv_BxN, batch.mask_BxN, loss_cfg, batch.group_ids_B)
    return diagnostics.token_gradient_weights(*args), diagnostics.accounting_metrics(*args)

  steps = []
  for k in range(updates + 1):
    w, m = account(state.params)
    w = {key: np.asarray(v) for key, v in w.items()}
    fork_w0 = np.abs(w["g0"][fork_BxN])
    steps.append({
        "updates_done": k, "p_fork": float(p_fork(state.params)),
        "fork_ratio_mean": float(w["ratio"][fork_BxN].mean()) if fork_BxN.any() else None,
        "fork_kept": float((fork_w0 * w["kept"][fork_BxN]).sum() / fork_w0.sum()) if fork_w0.sum() > 0 else None,
        "fork_zeroed_frac": float((w["kept"][fork_BxN] == 0).mean()) if fork_BxN.any() else None,
        **{k2: float(v) for k2, v in m.items()}})
    if k < updates:
      state, _ = step(state, batch)
  return {"loss": dataclasses.asdict(loss_cfg), "steps": steps}


def table(results: dict, n_fork: int, n_marker: int, n_rows: int) -> str:
  """Markdown: per loss, the first off-policy step's accounting and P(fork) along the updates."""
  lines = [f"Completions opening with the marker: {n_marker} of {n_rows}; the fork tokens (those of them with "
           f"A > 0, in groups with reward variance): {n_fork}.", "",
           "| loss | fork r at update 2 | fork gradient kept at update 2 | all tokens: weight removed at 2 "
           "| fork kept, mean over off-policy updates | P(fork) start | after 1 | after all |",
           "|---|---|---|---|---|---|---|---|"]
  fmt = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
  for name, r in results.items():
    s = r["steps"]
    second = s[1] if len(s) > 2 else {}
    off = [x["fork_kept"] for x in s[1:-1] if x["fork_kept"] is not None]
    lines.append(f"| {name} | {fmt(second.get('fork_ratio_mean'))} | {fmt(second.get('fork_kept'))} | "
                 f"{fmt(second.get('diag/removed'))} | {fmt(float(np.mean(off)) if off else None)} | "
                 f"{fmt(s[0]['p_fork'], 4)} | {fmt(s[1]['p_fork'], 4)} | {fmt(s[-1]['p_fork'], 4)} |")
  return "\n".join(lines) + "\n"


def plot(results: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for name, r in results.items():
    ks = [x["updates_done"] for x in r["steps"]]
    axes[0].plot(ks, [x["p_fork"] for x in r["steps"]], marker="o", ms=3, label=name)
    axes[1].plot(ks, [np.nan if x["fork_kept"] is None else x["fork_kept"] for x in r["steps"]], marker="o",
                 ms=3, label=name)
  axes[0].set(title="P(fork token) on held-out prompts", xlabel="updates on one rollout")
  axes[1].set(title="share of the fork tokens' gradient kept", xlabel="updates on one rollout")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--gin_file", action="append", default=None)
  ap.add_argument("--gin_param", action="append", default=[])
  ap.add_argument("--losses", nargs="+", default=list(LOSSES), help=f"from {sorted(LOSSES)}")
  ap.add_argument("--updates", type=int, default=8, help="optimizer steps on the one rollout")
  ap.add_argument("--learning_rate", type=float, default=None, help="override OptimConfig.learning_rate")
  ap.add_argument("--out", required=True, help="directory for fork_probe.md/.json/.png")
  args = ap.parse_args(sys.argv[1:] if argv is None else argv)
  if args.updates < 2:
    ap.error("--updates must be >= 2 (the first update is on-policy)")
  from cispo_jax import cli
  from cispo_jax.bootstrap import bootstrap_model
  from cispo_jax.model import hf_io
  from cispo_jax.task import make_sources
  from cispo_jax.trainer import run_loss_config

  here = os.path.dirname(os.path.abspath(__file__))  # gin files as given, else from experiments/
  gin_files = [f if os.path.exists(f) or not os.path.exists(os.path.join(here, f)) else os.path.join(here, f)
               for f in args.gin_file or []] or None
  built = cli.parse(gin_files, args.gin_param)
  rl, task, optim = built["RLConfig"], built["TaskConfig"], built["OptimConfig"]
  losses_cfg = [loss_config(built["LossConfig"], name) for name in args.losses]  # every name checked first
  marker = task.task_args.get("scratchpad_marker", "") if task.task == "arithmetic" else ""
  if not marker:
    raise SystemExit("fork_probe: the task has no fork marker; use TaskConfig.task = 'arithmetic' with "
                     "task_args scratchpad_marker (e.g. --gin_file experiments/fork_task.gin)")
  if args.learning_rate is not None:
    optim = dataclasses.replace(optim, learning_rate=args.learning_rate)
  model_dir = rl.model_dir or bootstrap_model(task, built["BootstrapConfig"])
  model_cfg, tokenizer = hf_io.load_config(model_dir), hf_io.load_tokenizer(model_dir)
  params = hf_io.load_params(model_dir, model_cfg)
  marker_id = tokenizer.encode(marker[0], add_special_tokens=False)[0]
  _, held = make_sources(task, seed=rl.seed)
  p_fork = fork_probability_fn(model_cfg, tokenizer, rl, held[:rl.eval.eval_size], marker_id)
  batch, fork_BxN, rewards, marker_first = sample_batch(params, model_cfg, tokenizer, rl, task, marker_id,
                                          jax.random.PRNGKey(rl.seed))
  results = {}
  for name, loss in zip(args.losses, losses_cfg):
    results[name] = probe_loss(params, batch, fork_BxN, run_loss_config(loss, rl), model_cfg=model_cfg, rl=rl,
                               optim=optim, updates=args.updates, p_fork=p_fork)
    print(f"{name}: P(fork) {results[name]['steps'][0]['p_fork']:.4f} -> {results[name]['steps'][-1]['p_fork']:.4f}",
          flush=True)
  os.makedirs(args.out, exist_ok=True)
  text = table(results, int(fork_BxN.sum()), int(marker_first.sum()), len(rewards))
  text += (f"\nModel {model_dir}; {len(rewards)} completions, reward mean {float(np.mean(rewards)):.3f}; "
           f"{args.updates} full-batch updates, learning rate {optim.learning_rate} (no warmup).\n"
           f"Command: `python experiments/fork_probe.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
  with open(os.path.join(args.out, "fork_probe.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.out, "fork_probe.json"), "w") as f:
    json.dump({"model_dir": model_dir, "fork_tokens": int(fork_BxN.sum()), "marker_first": int(marker_first.sum()),
               "completions": len(rewards),
               "reward_mean": float(np.mean(rewards)), "results": results}, f, indent=1)
  plot(results, os.path.join(args.out, "fork_probe.png"))
  print(text)
  return results


if __name__ == "__main__":
  main()
