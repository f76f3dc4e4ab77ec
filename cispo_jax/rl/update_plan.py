"""The update batch: which rollout rows and completion positions the update runs on.

UpdateConfig.compact_groups drops the groups that carry no gradient (zero reward variance), keeping
each minibatch's weighted groups exactly as the masked full batch would; UpdateConfig.trim_completions
cuts the completion axis after the longest kept completion. Both pad to buckets, so few update
programs are compiled. Pure host functions of global data: every process plans the same.
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
                num_generations: int, num_minibatches: int, quantum: int, compact: bool, trim: bool) -> UpdatePlan:
  """Which rows and completion positions the update runs on (a pure function of global host data, so
  every process picks the same plan).

  compact: minibatch j of epoch i must train on the kept groups among perms_IxG[i, j::M] (what the
  masked full batch gives it); the largest such count, bucketed (`bucket`, multiples of `quantum`),
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
    width = bucket(int(cols[-1]) + 1 if len(cols) else 1, N, TRIM_QUANTUM)
  if not compact:
    return UpdatePlan(np.arange(B), None, width, G // M)
  slots = [[[g for g in perm[j::M] if keep_G[g]] for j in range(M)] for perm in perms_IxG]
  per_mb = bucket(max(len(s) for epoch in slots for s in epoch), G // M, quantum)
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
