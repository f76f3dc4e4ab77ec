"""UpdateConfig: from a scored rollout to new params (advantages, then the optimizer steps on it)."""

from __future__ import annotations

import dataclasses

from cispo_jax.config.fields import at_least
from cispo_jax.rl.advantages import ADVANTAGE_ESTIMATORS


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """From a scored rollout to new params: advantages, then num_iterations passes of num_minibatches optimizer
  steps. Names follow TRL where they exist (num_iterations)."""
  num_iterations: int = 2  # passes over each rollout; > 1 makes the policy ratio depart from 1
  num_minibatches: int = 1  # optimizer steps per pass
  micro_batches: int = 1  # gradient accumulation inside each optimizer step
  advantage: str = "grpo"  # see advantages.ADVANTAGE_ESTIMATORS
  filter_zero_variance: bool = True  # groups whose rewards are all equal carry no signal
  tis_cap: float = 0.0  # > 0: truncated IS correction min(pi_old / pi_sampler, cap) on the advantages
  # Truncated completions (DAPO; overlong.py): overlong_filter drops the tokens of completions that ran to
  # max_new_tokens without stopping from the loss (their rewards still count in their group's statistics);
  # overlong_buffer > 0 adds the soft overlong penalty to every reward: 0 up to max_new_tokens -
  # overlong_buffer tokens, then falling linearly to -overlong_penalty at max_new_tokens.
  overlong_filter: bool = False
  overlong_buffer: int = 0
  overlong_penalty: float = 1.0
  max_nonfinite_skips: int = 10  # optimizer steps in a row skipped for a NaN/inf loss or gradient before the run stops
  # Update work that carries no gradient (each switch leaves the loss and gradient unchanged up to f32 rounding;
  # tests/test_update_work.py):
  # compact_groups: groups with mask 0 everywhere (filter_zero_variance's all-equal groups) leave the update batch
  #   (and the old/reference log-prob forwards). Each minibatch keeps exactly the weighted groups the masked full
  #   batch would give it (the update's shuffle is drawn on the host from the same key) and is padded with
  #   zero-weight groups to a bucket: quantum * {1, 2, 3, 4, 6, 8, 12, ...}, the quantum being the smallest group
  #   count that splits into micro_batches and over the data x fsdp devices; the full size when that is reached.
  #   Every aggregation's sums and denominators (Dr.GRPO's constant included), the KL and the entropy terms see
  #   masked tokens only, so dropping them changes nothing. A few update programs get compiled (one per bucket).
  #   With micro_batches > 1 the train/ token-mean metrics (ratio_mean, kl_ref, entropy, pg_loss, ...), which are
  #   averaged per micro-batch, can shift because other groups share a micro-batch; train/loss and the gradient
  #   do not. logp_gap/sampler_vs_trainer is measured on the tokens that enter the loss (either way).
  compact_groups: bool = True
  # trim_completions: the update's completion axis (and the token / kv arrays) cut to 8 * {1, 2, 3, 4, 6, ...}
  #   positions >= the longest completion that enters the loss (capped at max_new_tokens). The positions cut are
  #   padding after every kept completion stopped; attention is causal, so the others do not change.
  trim_completions: bool = True
  # old_logps_in_update: with num_minibatches == 1 and tis_cap == 0 the first optimizer step's forward runs the
  #   params the rollout was sampled with on every row: it gives the old log-probs (stop_gradient, ratio exactly 1)
  #   and the separate old-log-prob forward is skipped (the reference forward for a KL stays). The old log-probs
  #   then come from the training forward itself rather than from a second program: equal to f32 rounding in
  #   float32 (at bf16, within the compute dtype's rounding, and the first step's ratio is exactly 1). TIS needs
  #   them on the host before the update, and a later minibatch needs the pre-update params: then the separate
  #   forward runs as before. logp_gap/sampler_vs_trainer is computed after the update then. Not with a stale
  #   rollout (RolloutConfig.max_staleness > 0): its old log-probs are the behaviour policy's.
  old_logps_in_update: bool = True
  # Bounded compiles (update_plan.Buckets): from coarse_buckets_from completion positions on (RolloutConfig.
  #   max_new_tokens >= it; 0 = never) the buckets above are coarse: coarse_bucket_levels = (row sizes, widths),
  #   each the full size halved (G/M groups per minibatch; max_new_tokens positions), so at most their product
  #   update programs (and gather / log-prob forwards) per prompt bucket; at 8192 positions and 64 groups:
  #   rows 32 or 64 groups x widths 1024, 2048, 4096, 8192 = 8 programs, against 12 x 20 = 240 on the fine ladder.
  #   Shorter budgets keep the fine ladder, so runs below 1024 positions are unchanged; a padded bucket changes
  #   the loss only by f32 rounding (padding carries no weight).
  coarse_buckets_from: int = 1024
  coarse_bucket_levels: tuple = (2, 4)
  # precompile: before the first iteration, compile the update, the row gather and the old / reference forwards
  #   for every (rows, width) bucket (update_plan.update_shapes) and every prompt bucket the training prompts
  #   reach, from shapes alone (no data); logged with its count and seconds. The run's numbers do not change.
  precompile: bool = False

  def __post_init__(self):
    at_least(self, ("num_iterations", "num_minibatches", "micro_batches", "max_nonfinite_skips"), 1)
    at_least(self, ("overlong_buffer", "coarse_buckets_from"), 0)
    levels = self.coarse_bucket_levels
    if not (isinstance(levels, tuple) and len(levels) == 2 and all(isinstance(v, int) and v >= 1 for v in levels)):
      raise ValueError(f"UpdateConfig.coarse_bucket_levels={levels!r}; must be (row sizes, widths), two ints >= 1")
    if not self.overlong_penalty >= 0:
      raise ValueError(f"UpdateConfig.overlong_penalty={self.overlong_penalty}; must be >= 0 (the penalty's size)")
    if self.advantage not in ADVANTAGE_ESTIMATORS:
      raise ValueError(f"UpdateConfig.advantage={self.advantage!r}; allowed: {sorted(ADVANTAGE_ESTIMATORS)}")
