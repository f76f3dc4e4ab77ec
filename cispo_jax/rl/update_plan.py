"""The update batch: which rollout rows and completion positions the update runs on.

UpdateConfig.compact_groups drops the groups that carry no gradient (zero reward variance), keeping
each minibatch's weighted groups exactly as the masked full batch would; UpdateConfig.trim_completions
cuts the completion axis after the longest kept completion. Both pad to buckets, so few update
programs are compiled: the fine ladder (`bucket`) for short budgets, `Buckets`' halvings of the full size
for long ones (UpdateConfig.coarse_buckets_from), and `update_shapes` lists every (rows, width) a run can
get. Pure host functions of global data: every process plans the same.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

TRIM_QUANTUM = 8  # completion positions: the trimmed width is a multiple of this (times the ladder)


def _ladder(x: int) -> int:
  """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 * 2^k) that is >= x: at most 33% padding,
  two sizes per doubling."""
  p = 1
  while p < x:
    if p >= 2 and 3 * p // 2 >= x:
      return 3 * p // 2
    p *= 2
  return p


def bucket(x: int, full: int, quantum: int) -> int:
  """Padded size for x items: quantum * ladder(ceil(x / quantum)); `full` once that reaches it."""
  if not 0 < x <= full:
    raise ValueError(f"bucket: need 0 < x={x} <= full={full}")
  b = quantum * _ladder(-(-x // quantum))
  return full if b >= full else b


@dataclasses.dataclass(frozen=True)
class Buckets:
  """How plan_update pads. levels 0: the fine ladder (`bucket`: 1, 2, 3, 4, 6, 8, ... quanta; about 20
  widths at an 8k budget). Else `row_levels` minibatch sizes and `width_levels` completion widths, each
  the full size halved k times (k < levels) rounded up to its quantum (`halving`): at most
  row_levels * width_levels update programs, none more than the full batch costs."""
  row_levels: int = 0
  width_levels: int = 0

  @classmethod
  def for_run(cls, up, max_new_tokens: int) -> Buckets:
    """UpdateConfig's buckets at this budget: coarse from coarse_buckets_from positions on (0: never)."""
    if up.coarse_buckets_from and max_new_tokens >= up.coarse_buckets_from:
      return cls(*up.coarse_bucket_levels)
    return cls()

  def rows(self, x: int, full: int, quantum: int) -> int:
    return halving(x, full, quantum, self.row_levels) if self.row_levels else bucket(x, full, quantum)

  def width(self, x: int, full: int) -> int:
    return halving(x, full, TRIM_QUANTUM, self.width_levels) if self.width_levels else bucket(x, full, TRIM_QUANTUM)


def halving(x: int, full: int, quantum: int, levels: int) -> int:
  """The smallest of full / 2^k (k < levels; each rounded up to a multiple of quantum, at most full) >= x."""
  if not 0 < x <= full:
    raise ValueError(f"halving: need 0 < x={x} <= full={full}")
  for k in range(levels - 1, 0, -1):
    b = min(full, quantum * -(-full // (quantum << k)))
    if b >= x:
      return b
  return full


def group_quantum(num_generations: int, micro_batches: int, batch_shards: int) -> int:
  """Smallest group count per minibatch that splits into micro_batches micro-batches whose rows
  (groups * num_generations) divide over the batch_shards (data x fsdp) devices."""
  return micro_batches * (batch_shards // math.gcd(num_generations, batch_shards))


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
  rows: np.ndarray  # [B'] rollout rows in the update batch (whole groups, in order)
  order: np.ndarray | None  # [I, M, G'] update-batch group indices per epoch / minibatch; None: the update shuffles
  width: int  # completion positions the update keeps
  groups_per_minibatch: int


def plan_update(keep_G: np.ndarray, completion_mask_BxN: np.ndarray, perms_IxG: np.ndarray | None, *,
                num_generations: int, num_minibatches: int, quantum: int, compact: bool, trim: bool,
                buckets: Buckets = Buckets()) -> UpdatePlan:
  """Which rows and completion positions the update runs on (a pure function of global host data, so
  every process picks the same plan).

  compact: minibatch j of epoch i must train on the kept groups among perms_IxG[i, j::M] (what the
  masked full batch gives it); the largest such count, bucketed (`buckets`, multiples of `quantum`),
  is every minibatch's size, filled up with dropped (mask 0) groups, each used once per epoch.
  """
  n, M = num_generations, num_minibatches
  B, N = completion_mask_BxN.shape
  G = B // n
  kept = np.flatnonzero(keep_G)
  if not len(kept):
    raise ValueError("plan_update: no group is kept")
  width = N
  if trim:
    rows_used = completion_mask_BxN.reshape(G, n, N)[kept].reshape(-1, N).astype(bool)
    cols = np.flatnonzero(rows_used.any(0))
    width = buckets.width(int(cols[-1]) + 1 if len(cols) else 1, N)
  if not compact:
    return UpdatePlan(np.arange(B), None, width, G // M)
  slots = [[[g for g in perm[j::M] if keep_G[g]] for j in range(M)] for perm in perms_IxG]
  per_mb = buckets.rows(max(len(s) for epoch in slots for s in epoch), G // M, quantum)
  dropped = np.flatnonzero(~np.asarray(keep_G, bool))
  groups = np.concatenate([kept, dropped[:M * per_mb - len(kept)]])
  where = {int(g): i for i, g in enumerate(groups)}
  pads = list(range(len(kept), len(groups)))  # update-batch indices of the padding groups
  order = np.zeros((len(slots), M, per_mb), np.int32)
  for i, epoch in enumerate(slots):
    free = iter(pads)
    for j, s in enumerate(epoch):
      order[i, j] = [where[int(g)] for g in s] + [next(free) for _ in range(per_mb - len(s))]
  rows = (groups[:, None] * n + np.arange(n)).reshape(-1)
  return UpdatePlan(rows, order, width, per_mb)


def update_shapes(*, groups: int, num_generations: int, num_minibatches: int, quantum: int, width: int,
                  compact: bool, trim: bool, buckets: Buckets = Buckets()) -> list[tuple[int, int]]:
  """Every (rows, completion width) plan_update can return for rollouts of `groups` groups and `width`
  completion positions: the largest kept count of a minibatch runs over 1..groups / num_minibatches and
  the longest kept completion over 1..width, each bucketed as plan_update does. The update programs a run
  can compile (one per prompt bucket each), and what UpdateConfig.precompile builds."""
  n, M = num_generations, num_minibatches
  rows = sorted({M * n * buckets.rows(k, groups // M, quantum) for k in range(1, groups // M + 1)}) if compact \
      else [groups * n]
  widths = sorted({buckets.width(x, width) for x in range(1, width + 1)}) if trim else [width]
  return [(r, w) for r in rows for w in widths]
