"""Evaluation on named sets: greedy pass@1, sampled pass@k, completion length, format errors.

Used by the trainer every EvalConfig.eval_every and by `python -m cispo_jax.evaluate`. Sharded like
training: each process takes a contiguous share of every set (ceil(N / processes) prompts, the
last shares padded with copies that count for nothing), generates on the mesh through the caller's
`generate`, scores its own rows in the reward worker and writes its own per-example JSONL; the
numbers are gathered from every process, so each sees the same metrics.

Metric keys, per set: eval/<set>/greedy/{pass_at_1, length, format_error_rate} and, with
TaskConfig.eval_samples = n > 0, eval/<set>/sampled/{pass_at_<k>, length, format_error_rate}.
pass@k is the unbiased estimator (passk.py) over the n samples of each prompt; a pass is the first
reward >= 1; a format error is a completion the pass reward's format check rejects (reported only
when the reward names one, e.g. math_answer). length counts completion tokens, the stop included.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from cispo_jax.rollout import sampling
from cispo_jax.data.example import Example
from cispo_jax.evals.passk import mean_pass_at_k


def _gather(local: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def shard_indices(n_examples: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
  """This process's example indices, chunk-major [chunks, batch]; -1 marks padding.

  Every process gets ceil(N / processes) slots, rounded up to whole batches (batch_size 0: one
  batch), so all of them run the same number of equally shaped generation calls.
  """
  per = math.ceil(n_examples / process_count)
  batch = batch_size or per
  slots = math.ceil(per / batch) * batch
  idx = process_index * per + np.arange(slots)
  idx[(np.arange(slots) >= per) | (idx >= n_examples)] = -1
  return idx.reshape(-1, batch)


class Evaluator:
  """generate(params, examples, key, sampling_cfg) -> host SampleOutput of the global batch;
  local_rows(total) -> this process's rows of it; scorer: task.Scorer (passed, format_ok)."""

  def __init__(self, generate: Callable, local_rows: Callable, tokenizer, scorer, *,
               greedy_cfg: sampling.SamplingConfig, sampled_cfg: sampling.SamplingConfig | None = None,
               ks: Sequence[int] = (), batch_size: int = 0, seed: int = 0):
    if sampled_cfg is not None and any(not 1 <= k <= sampled_cfg.num_samples for k in ks):
      raise ValueError(f"pass@k: each k of {tuple(ks)} must be in [1, {sampled_cfg.num_samples}] (samples)")
    self.generate, self.local_rows, self.tokenizer, self.scorer = generate, local_rows, tokenizer, scorer
    self.greedy_cfg, self.sampled_cfg, self.ks = greedy_cfg, sampled_cfg, tuple(ks)
    self.batch_size, self.seed = batch_size, seed

  def __call__(self, params, sets: dict[str, Sequence[Example]], out_path: str | None = None) -> dict[str, float]:
    """Metrics of every set; per-example rows written to out_path (".p<i>" added per process if several)."""
    proc, nproc = jax.process_index(), jax.process_count()
    records: list[dict] = []
    metrics: dict[str, float] = {}
    for s, (name, examples) in enumerate(sets.items()):
      if not examples:
        raise ValueError(f"eval set {name!r} has no examples")
      idx_CxB = shard_indices(len(examples), self.batch_size, proc, nproc)
      modes = [("greedy", self.greedy_cfg)] + ([("sampled", self.sampled_cfg)] if self.sampled_cfg else [])
      for mode, cfg in modes:
        per_prompt = self._run(params, examples, idx_CxB, cfg, mode, name, s, records)
        metrics.update(self._summarise(per_prompt, f"eval/{name}/{mode}/", cfg.num_samples, mode))
    if out_path is not None:
      path = out_path if nproc == 1 else f"{out_path}.p{proc}"
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      with open(path, "w", encoding="utf-8") as f:  # one call, one file: a redone eval (a resume) replaces it
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return metrics

  def _run(self, params, examples, idx_CxB, cfg, mode, name, set_index, records) -> dict[str, np.ndarray]:
    """Per-prompt [passes, length sum, format errors, real] over this process's slots."""
    n, has_format = cfg.num_samples, self.scorer.checks_format
    rows = {k: [] for k in ("passes", "length", "format_errors", "real")}
    for c, idx_B in enumerate(idx_CxB):
      real_B = idx_B >= 0
      batch = [examples[i if i >= 0 else 0] for i in idx_B]
      key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.seed), set_index), c)
      out = self.generate(params, batch, jax.random.PRNGKey(0) if mode == "greedy" else key, cfg)
      local = jax.tree.map(lambda x: x[self.local_rows(out.tokens_BxN.shape[0])], out)
      texts = sampling.decode_completions(self.tokenizer, local)
      real_BS = np.repeat(real_B, n)
      keep = np.flatnonzero(real_BS)  # padding is never scored
      ex_kept = [batch[i // n] for i in keep]
      txt_kept = [texts[i] for i in keep]
      passed_BS, fmt_BS = np.zeros(len(texts), bool), np.ones(len(texts), bool)
      if len(keep):
        passed_BS[keep] = self.scorer.passed(txt_kept, ex_kept)
        if has_format:
          fmt_BS[keep] = self.scorer.format_ok(txt_kept, ex_kept)
      lengths_BS = np.asarray(local.lengths_B, np.int64)
      rows["passes"].append(passed_BS.reshape(-1, n).sum(1))
      rows["length"].append(lengths_BS.reshape(-1, n).sum(1))
      rows["format_errors"].append((~fmt_BS).reshape(-1, n).sum(1) if has_format else np.full(len(idx_B), -1))
      rows["real"].append(real_B)
      for i in keep:
        ex = batch[i // n]
        records.append({"set": name, "mode": mode, "index": int(idx_B[i // n]), "sample": int(i % n),
                        "origin": ex.origin, "prompt": ex.prompt, "answer": ex.answer, "completion": texts[i],
                        "passed": bool(passed_BS[i]), "format_ok": bool(fmt_BS[i]) if has_format else None,
                        "length": int(lengths_BS[i])})
    return {k: _gather(np.concatenate(v).astype(np.int32)) for k, v in rows.items()}  # int32: jax has no x64 here

  def _summarise(self, per_prompt, prefix: str, n: int, mode: str) -> dict[str, float]:
    real = per_prompt["real"].astype(bool)
    passes = per_prompt["passes"][real]
    out = {f"{prefix}length": float(per_prompt["length"][real].sum() / (n * real.sum()))}
    if mode == "greedy":
      out[f"{prefix}pass_at_1"] = float(passes.mean())
    else:
      for k in self.ks:
        out[f"{prefix}pass_at_{k}"] = mean_pass_at_k(n, passes, k)
    errors = per_prompt["format_errors"][real]
    if (errors >= 0).all():
      out[f"{prefix}format_error_rate"] = float(errors.sum() / (n * real.sum()))
    return out
