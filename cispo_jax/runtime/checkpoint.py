"""Orbax checkpoints of the whole run state: train state (params, optimizer, step, RNG) + host state.

Host state (data position, iteration, reward-function counters) is JSON beside the arrays. A
restore takes an abstract target whose leaves carry shardings, so a checkpoint written on one
mesh restores onto another.

A checkpoint is trusted only after it is verified. At save, each array's fingerprint (a sum of
its bits weighted by position, in uint32: exact under any sharding and reduction order, and
changed by any single flipped bit) goes into the host JSON; a restore recomputes and compares
them. A checkpoint that cannot be read or does not match is moved aside to
`<run_dir>/checkpoints_corrupt/` (never deleted) and the one before it is used. A state with a
non-finite value is never written, so the last finite checkpoint is never rotated out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cispo_jax.config.fields import at_least

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """The run state on disk (Checkpointer, below) and the exported model."""
  save_every: int = 10  # iterations between checkpoints (and at the end)
  keep_checkpoints: int = 2
  export_final: bool = True  # a Hugging Face directory <run_dir>/final_model at the end

  def __post_init__(self):
    at_least(self, ("save_every", "keep_checkpoints"), 1)


class CheckpointError(RuntimeError):
  """No checkpoint of a run directory could be restored."""


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

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def maybe_save(self, iteration: int, state: Any, host_state: dict | Callable[[], dict],
                 force: bool = False) -> bool:
    """Save after `iteration` RL iterations if it is due (or forced). Returns whether it saved.
    `host_state` may be a function, called only when a save happens.

    Raises NonFiniteState (saving nothing) when the state holds NaN or inf.
    """
    if not force and iteration % self.save_every:
      return False
    if iteration in self._mgr.all_steps():
      return False
    prints, finite = fingerprints(state)
    if not finite:
      raise NonFiniteState(
          f"the train state at iteration {iteration} holds non-finite values; not saving it (the last "
          f"checkpoint, {self.latest()}, stays the newest)")
    host_state = {**(host_state() if callable(host_state) else host_state), "fingerprints": prints}
    self._mgr.save(iteration, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       host=ocp.args.JsonSave(host_state)))
    log.info("checkpoint %d -> %s", iteration, self.directory)
    return True

  def restore(self, iteration: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restore and verify one checkpoint. abstract_state: pytree of jax.ShapeDtypeStruct with .sharding.

    Raises on an unreadable checkpoint or a fingerprint mismatch (naming the arrays that differ).
    """
    out = self._mgr.restore(iteration, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()))
    state, host = out["state"], dict(out["host"])
    want = host.pop("fingerprints", None)
    if want is None:
      log.warning("checkpoint %d has no fingerprints (written by an older cispo_jax): not verified", iteration)
      return state, host
    got, _ = fingerprints(state)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    if len(want) != len(got):
      raise ValueError(f"checkpoint {iteration}: {len(want)} fingerprints saved for {len(got)} arrays")
    bad = [p for p, w, g in zip(paths, want, got) if w != g]
    if bad:
      raise ValueError(f"checkpoint {iteration}: {len(bad)} of {len(paths)} arrays differ from what was saved "
                       f"(fingerprint mismatch), e.g. {', '.join(bad[:4])}")
    return state, host

  def restore_latest_good(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """The newest checkpoint that restores and verifies: (iteration, state, host), or None if there is none.

    Each bad one is logged with its reason and moved aside, newest first. Raises CheckpointError
    when checkpoints exist but none is good.
    """
    reasons = []
    for step in reversed(self.all_steps()):
      try:
        state, host = self.restore(step, abstract_state)
        if reasons:
          log.warning("resuming from checkpoint %d, the newest good one", step)
        return step, state, host
      except Exception as e:  # unreadable (truncated, missing metadata, bad JSON) or not what was saved
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        reasons.append(f"  {step}: {reason}")
        log.warning("checkpoint %d in %s is bad, falling back to the previous one: %s", step, self.directory,
                    reason)
        self._quarantine(step)
    if reasons:
      raise CheckpointError(
          f"no checkpoint in {self.directory} could be restored (bad ones were moved to "
          f"{self._corrupt_dir()}):\n" + "\n".join(reasons) +
          "\nStart afresh in a new run directory, or restore a checkpoint from a copy.")
    return None

  def _corrupt_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt")

  def _quarantine(self, step: int):
    """Move a bad checkpoint out of the manager's sight (kept for inspection)."""
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      if os.path.exists(src):
        os.makedirs(self._corrupt_dir(), exist_ok=True)
        dst = os.path.join(self._corrupt_dir(), str(step))
        n = 1
        while os.path.exists(dst):
          dst, n = os.path.join(self._corrupt_dir(), f"{step}.{n}"), n + 1
        shutil.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"cispo_jax quarantine checkpoint {step}")
    self._mgr.reload()

  def wait(self):
    self._mgr.wait_until_finished()

  def close(self):
    self._mgr.wait_until_finished()
    self._mgr.close()


class NonFiniteState(RuntimeError):
  """The state to be saved holds NaN or inf."""


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of a pytree of arrays (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _bits_u32(x: jax.Array) -> jax.Array:
  """The raw bits of each element as uint32 (keys as their data, bool as 0/1)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if width is None:
    raise TypeError(f"cannot fingerprint dtype {x.dtype}")
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  bits = _bits_u32(x)
  index = jnp.zeros(bits.shape, jnp.uint32)  # the flat position, built per axis (no reshape: no resharding)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2 ** 32)
    stride *= bits.shape[axis]
  weight = index * jnp.uint32(2654435761) | jnp.uint32(1)  # odd: a changed bit always changes the sum
  fp = jnp.sum((bits + jnp.uint32(0x9E3779B9)) * weight, dtype=jnp.uint32)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.bool_(True)
  return fp, finite


@jax.jit
def _fingerprints(tree):
  pairs = [_fingerprint(x) for x in jax.tree.leaves(tree)]
  return jnp.stack([p for p, _ in pairs]), jnp.all(jnp.stack([f for _, f in pairs]))


def fingerprints(tree: Any) -> tuple[list[int], bool]:
  """(one uint32 fingerprint per leaf, whether every float leaf is finite). Computed where the arrays live."""
  if not jax.tree.leaves(tree):
    return [], True
  fps, finite = _fingerprints(tree)
  if not fps.is_fully_addressable:
    from jax.experimental import multihost_utils
    fps, finite = multihost_utils.process_allgather((fps, finite), tiled=True)
  return [int(v) for v in np.asarray(fps)], bool(np.asarray(finite))
