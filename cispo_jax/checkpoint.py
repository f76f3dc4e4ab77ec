"""Orbax checkpoints of the whole run state: train state (params, optimizer, step, RNG) + host state.

Host state (data position, iteration, reward-function counters) is JSON beside the arrays. A
restore takes an abstract target whose leaves carry shardings, so a checkpoint written on one
mesh restores onto another.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  def __init__(self, directory: str, save_every: int, keep: int = 3):
    if save_every < 1:
      raise ValueError(f"checkpoint save_every={save_every}; must be >= 1")
    if keep < 1:
      raise ValueError(f"checkpoint keep={keep}; must be >= 1")
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self._mgr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest(self) -> int | None:
    return self._mgr.latest_step()

  def maybe_save(self, iteration: int, state: Any, host_state: dict, force: bool = False) -> bool:
    """Save after `iteration` RL iterations if it is due (or forced). Returns whether it saved."""
    if not force and iteration % self.save_every:
      return False
    if iteration in self._mgr.all_steps():
      return False
    self._mgr.save(iteration, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       host=ocp.args.JsonSave(host_state)))
    log.info("checkpoint %d -> %s", iteration, self.directory)
    return True

  def restore(self, iteration: int, abstract_state: Any) -> tuple[Any, dict]:
    """abstract_state: pytree of jax.ShapeDtypeStruct with .sharding (the target layout)."""
    out = self._mgr.restore(iteration, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()))
    return out["state"], dict(out["host"])

  def wait(self):
    self._mgr.wait_until_finished()

  def close(self):
    self._mgr.wait_until_finished()
    self._mgr.close()


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of a pytree of arrays (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
