"""Making one rollout: draw the next prompts, sample them with a policy version, score them, and for a
stale rollout the behaviour policy's log-probs. Called in line by Trainer.step or on the rollout
thread (rollout/pipeline.py), so it holds no Trainer state beyond what it is given."""

from __future__ import annotations

import time

import jax
import numpy as np

from cispo_jax import sharding
from cispo_jax.rollout import sampling
from cispo_jax.rollout.engine import Rollout, local_rows


class RolloutMaker:
  """`maker(iteration, version, rng_data) -> Rollout`, over one engine, prompt stream and scorer."""

  def __init__(self, rl, engine, stream, scorer, tokenizer, train_sampling):
    self.rl, self.engine, self.stream, self.scorer = rl, engine, stream, scorer
    self.tokenizer, self.train_sampling = tokenizer, train_sampling

  def score(self, out, examples, n: int):
    """Decode and score this process's rows only; every process gets all rewards and the valid-row mask
    (advantages are global): (rewards_B, valid_B, this process's stats without "valid")."""
    local = sampling.SampleOutput(*(local_rows(x) if name in ("tokens_BxN", "lengths_B", "stopped_B") else None
                                    for name, x in out._asdict().items()))
    texts = sampling.decode_completions(self.tokenizer, local)
    local_examples = [e for e in examples for _ in range(n)]
    rewards, stats = self.scorer(texts, local_examples)
    stats = dict(stats)
    valid = np.asarray(stats.pop("valid", np.ones(len(texts), bool)), bool)  # a scorer without it: all valid
    return (sharding.allgather_host(rewards.astype(np.float32)),
            sharding.allgather_host(valid.astype(np.uint8)).astype(bool), stats)

  def __call__(self, iteration: int, version: int, rng_data) -> Rollout:
    ro = self.rl.rollout
    examples = self.stream.next_batch()
    stream_state = self.stream.state()
    key = jax.random.fold_in(jax.random.wrap_key_data(np.asarray(rng_data)), iteration)
    t0 = time.perf_counter()
    out = jax.block_until_ready(self.engine.generate(examples, key, self.train_sampling, version=version))
    t1 = time.perf_counter()
    rewards_B, valid_B, stats = self.score(out, examples, ro.num_generations)
    t2 = time.perf_counter()
    behaviour = None
    if version != iteration and ro.behaviour_logps == "recompute":
      behaviour = jax.block_until_ready(self.engine.completion_logps(
          out, version=version, temperature=ro.temperature, micro_batches=self.rl.update.micro_batches))
    t3 = time.perf_counter()
    return Rollout(iteration, version, out, rewards_B, stats, behaviour, stream_state,
                   {"rollout": t1 - t0, "reward": t2 - t1, "behaviour_logps": t3 - t2}, valid_B)
