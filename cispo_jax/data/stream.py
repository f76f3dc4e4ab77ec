"""A resumable, shardable stream of prompt batches over an indexable source.

Order: epoch e visits the source in the permutation drawn from (seed, e); batches are
consecutive slices of that order and run on into the next epoch, so every batch is full
and no example is dropped. The whole state is (epoch, position), which a checkpoint
stores; restoring it makes the next batches those an uninterrupted run would draw.

Multi-host: batch_size is the global batch. With process_count > 1 each process takes
its contiguous share of every global batch (process i gets rows [i*b, (i+1)*b) of it,
b = batch_size / process_count), all processes keep the same global state.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cispo_jax.data.example import Example


class PromptStream:

  def __init__(self, source: Sequence[Example], batch_size: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    if len(source) == 0:
      raise ValueError("PromptStream: source is empty")
    if batch_size < 1:
      raise ValueError(f"PromptStream: batch_size must be >= 1, got {batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"PromptStream: need 0 <= process_index < process_count, "
                       f"got {process_index}, {process_count}")
    if batch_size % process_count:
      raise ValueError(f"PromptStream: batch_size={batch_size} must be divisible by "
                       f"process_count={process_count}")
    self.source = source
    self.batch_size = batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.epoch = 0
    self.position = 0
    self._order_epoch = -1
    self._order = np.zeros(0, np.int64)

  def shard(self, process_index: int, process_count: int) -> PromptStream:
    """The same stream, at the same state, drawing only this process's share."""
    other = PromptStream(self.source, self.batch_size, self.seed, process_index, process_count)
    other.restore(self.state())
    return other

  def _order_of(self, epoch: int) -> np.ndarray:
    if epoch != self._order_epoch:
      self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
      self._order_epoch = epoch
    return self._order

  def next_global_indices(self) -> list[int]:
    """Source indices of the next global batch; advances the state."""
    indices: list[int] = []
    while len(indices) < self.batch_size:
      order = self._order_of(self.epoch)
      take = min(self.batch_size - len(indices), len(order) - self.position)
      indices.extend(int(i) for i in order[self.position:self.position + take])
      self.position += take
      if self.position == len(order):
        self.epoch, self.position = self.epoch + 1, 0
    return indices

  def next_batch(self) -> list[Example]:
    """This process's share of the next global batch (all of it with one process)."""
    indices = self.next_global_indices()
    per_process = self.batch_size // self.process_count
    start = self.process_index * per_process
    return [self.source[i] for i in indices[start:start + per_process]]

  def __iter__(self):
    while True:
      yield self.next_batch()

  def state(self) -> dict[str, Any]:
    """JSON-serialisable; identical on every process."""
    return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
            "num_examples": len(self.source)}

  def restore(self, state: dict[str, Any]) -> None:
    # Resuming against another seed or dataset would silently draw other prompts.
    for key, mine in (("seed", self.seed), ("num_examples", len(self.source))):
      if key in state and int(state[key]) != mine:
        raise ValueError(f"PromptStream.restore: state has {key}={state[key]}, this stream has {mine}")
    epoch, position = int(state["epoch"]), int(state["position"])
    if epoch < 0 or not 0 <= position < len(self.source):
      raise ValueError(f"PromptStream.restore: bad epoch/position {epoch}/{position} "
                       f"for {len(self.source)} examples")
    self.epoch, self.position = epoch, position
