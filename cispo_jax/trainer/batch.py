"""From a scored rollout to the update's input: which rows and how wide (the plan), those rows gathered
on the devices, and the device programs beside them (the sampler-vs-trainer gap, TIS).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from cispo_jax import sharding
from cispo_jax.rl import overlong
from cispo_jax.runtime import programs
from cispo_jax.rl.update_plan import Buckets, UpdatePlan, plan_update


def plan(rl, keep_B: np.ndarray, lengths_B: np.ndarray, width: int, perms, quantum: int) -> UpdatePlan:
  """plan_update on the host's keep flags and lengths (`perms`: the update's shuffle, compact_groups),
  checked to be the same on every process: it is a pure function of global data."""
  up, n = rl.update, rl.rollout.num_generations
  result = plan_update(keep_B[::n], np.arange(width)[None, :] < lengths_B[:, None], perms, num_generations=n,
                       num_minibatches=up.num_minibatches, quantum=quantum, compact=up.compact_groups,
                       trim=up.trim_completions, buckets=Buckets.for_run(up, rl.rollout.max_new_tokens))
  if jax.process_count() > 1:
    crc = lambda x: zlib.crc32(np.ascontiguousarray(x, np.int32).tobytes()) & 0x7FFFFFFF  # noqa: E731 (int32)
    mine = np.array([result.width, result.groups_per_minibatch, crc(result.rows),
                     0 if result.order is None else crc(result.order)], np.int32)
    if (sharding.allgather_host(mine).reshape(-1, len(mine)) != mine).any():
      raise RuntimeError(f"processes disagree on the update batch (width, groups, rows, order): {mine}")
  return result


def overlong_shaping(up, max_new_tokens: int, rewards_B, lengths_B, stopped_B):
  """DAPO's remedies for truncated completions (rl/overlong.py), as UpdateConfig asks: the rewards with the
  soft overlong penalty added, the overlong filter's row weights (None when off), and their metrics."""
  metrics, row_keep = {}, None
  if up.overlong_buffer:
    penalty = overlong.overlong_penalty(lengths_B, max_new_tokens, up.overlong_buffer, up.overlong_penalty)
    rewards_B = (rewards_B + penalty).astype(rewards_B.dtype)
    metrics["reward/overlong_penalty"] = float(penalty.mean())
  if up.overlong_filter:
    row_keep = overlong.overlong_keep(stopped_B)
    metrics["completion/overlong_masked"] = float(1 - row_keep.mean())
  return rewards_B, row_keep, metrics


def reward_shaping(rl, on_reward_error: str, r, lengths_B, stopped_B):
  """The rollout's rewards as the advantages take them: (rewards_B, valid_B, row_keep, metrics). DAPO's overlong
  shaping (overlong_shaping), and the rows whose rewards failed (r.valid_B): under on_reward_error='mask' they
  leave their group's statistics (valid_B for rl/advantages.py) and the update (a 0 in row_keep, as the
  overlong filter's truncated rows); valid_B is None when no row failed or under 'zero' (failed rewards are 0s)
  so that the advantages are the unmasked program's. metrics: the failed rows (global), those masked, and each
  reward's failures (this process's rows, from the scorer's stats)."""
  rewards_B, row_keep, metrics = overlong_shaping(rl.update, rl.rollout.max_new_tokens, r.rewards_B, lengths_B,
                                                  stopped_B)
  valid_B = np.ones(len(rewards_B), bool) if r.valid_B is None else np.asarray(r.valid_B, bool)
  failed = int((~valid_B).sum())
  masked = on_reward_error == "mask" and failed > 0
  metrics.update({"reward/failed_rows": float(failed), "reward/masked_rows": float(failed if masked else 0)})
  names = [k.removesuffix("/errors") for k in r.stats if k.endswith("/errors") and k != "errors"]
  metrics.update({f"reward/{name}/failures": float(r.stats[f"{name}/errors"] + r.stats.get(f"{name}/timeouts", 0))
                  for name in names})
  if not masked:
    return rewards_B, None, row_keep, metrics
  rows = valid_B.astype(np.float32)
  return rewards_B, valid_B, rows if row_keep is None else row_keep * rows, metrics


def replicate(mesh, x):
  """A host array every process holds in full -> replicated on `mesh` (None stays None)."""
  return None if x is None else jax.make_array_from_callback(x.shape, sharding.replicated(mesh), lambda idx: x[idx])


def keep_rows(keep, row_keep, n: int, mesh):
  """(keep, keep_B): the advantages' keep flags ([B], per group) times the row weights `row_keep` (None = all
  1), on the devices for gather_rows' loss mask, and keep_B on the host for the plan: a group is kept while
  any of its rows is."""
  keep_B = np.asarray(keep.addressable_data(0))  # replicated: every process holds the whole vector
  if row_keep is None:
    return keep, keep_B
  rows = keep_B.astype(np.float32) * row_keep
  return replicate(mesh, rows), keep_B & np.repeat(rows.reshape(-1, n).max(1) > 0, n)


def gather(out, behaviour_BxN, rows_R, keep_B, adv_B, *, width: int, batch_sharding, rows_fn=None):
  """Rows `rows_R` (a batch-sharded array) of the rollout `out`, cut to `width`, onto the train mesh (a
  transfer when the rollout came from other devices). Returns (tokens, kv_valid, loss mask, sampler
  log-probs, advantages [R, width], behaviour log-probs or None), all batch-sharded. rows_fn: gather_rows
  or its programs.Programs registry (gather_programs)."""
  put = lambda x: None if x is None else jax.device_put(x, batch_sharding)  # noqa: E731
  gathered = (rows_fn or gather_rows)(*(put(x) for x in (out.prompt_tokens_BxP, out.tokens_BxN, out.prompt_mask_BxP,
                                                         out.mask_BxN, out.logps_BxN, behaviour_BxN, out.forced_BxN)),
                                      rows_R, keep_B, adv_B, width=width)
  return tuple(put(x) for x in gathered)


def gather_programs() -> programs.Programs:
  """gather_rows through a program registry (phase "gather"), one program per (rows, width) bucket."""
  return programs.Programs("gather", gather_rows, lambda args, static: (
      f"rows {args[7].shape[0]} of {args[1].shape[0]}, prompt {args[0].shape[1]}, width {static['width']}"))


def gather_specs(rl, prompt_width: int, rows: int, batch_sharding, replicated) -> tuple:
  """jax.ShapeDtypeStructs of gather_rows' array arguments, as the loop passes them for a fresh rollout of
  prompt bucket `prompt_width` (UpdateConfig.precompile): SampleOutput's int32 tokens and masks, f32 sampler
  log-probs, no behaviour log-probs; the replicated keep flags (f32 under the overlong filter, else bool)
  and f32 advantages."""
  ro = rl.rollout
  B, N = rl.prompts_per_step * ro.num_generations, ro.max_new_tokens
  spec = lambda shape, dtype, s=batch_sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=s)  # noqa: E731
  forced = spec((B, N), jnp.int32) if ro.think_budget else None
  keep = jnp.float32 if rl.update.overlong_filter else jnp.bool_
  return (spec((B, prompt_width), jnp.int32), spec((B, N), jnp.int32), spec((B, prompt_width), jnp.int32),
          spec((B, N), jnp.int32), spec((B, N), jnp.float32), None, forced, spec((rows,), jnp.int32),
          spec((B,), keep, replicated), spec((B,), jnp.float32, replicated))


@functools.partial(jax.jit, static_argnames=("width",))
def gather_rows(prompt_BxP, tokens_BxN, prompt_mask_BxP, mask_BxN, sampler_logps_BxN, behaviour_BxN, forced_BxN,
                rows_R, keep_B, adv_B, *, width: int):
  """The update batch's rows of a rollout, on the devices: sequences cut to `width` completion positions,
  the loss mask (completion mask x kept row, less forced-interruption tokens), the sampler's and behaviour
  log-probs, the advantages."""
  keep_R, adv_R = (jnp.take(x, rows_R, axis=0) for x in (keep_B.astype(jnp.float32), adv_B))
  take = lambda x: None if x is None else jnp.take(x, rows_R, axis=0)[:, :width]  # noqa: E731
  tokens = jnp.concatenate([jnp.take(prompt_BxP, rows_R, axis=0), take(tokens_BxN)], 1).astype(jnp.int32)
  kv_valid = jnp.concatenate([jnp.take(prompt_mask_BxP, rows_R, axis=0), take(mask_BxN)], 1).astype(bool)
  mask = take(mask_BxN).astype(jnp.float32) * keep_R[:, None]
  if forced_BxN is not None:  # in the context (kv_valid), not in the loss
    mask = mask * (1 - take(forced_BxN).astype(jnp.float32))
  adv = jnp.broadcast_to(adv_R[:, None], mask.shape)
  behaviour = None if behaviour_BxN is None else take(behaviour_BxN).astype(jnp.float32)
  return tokens, kv_valid, mask, take(sampler_logps_BxN).astype(jnp.float32), adv, behaviour


@jax.jit
def logp_gap(old_BxN, sampler_BxN, loss_mask_BxN):
  """Mean |trainer - sampler| log-prob over the tokens that enter the loss (0 when there are none)."""
  m = loss_mask_BxN > 0
  return jnp.where(m, jnp.abs(old_BxN - sampler_BxN), 0.0).sum() / jnp.maximum(m.sum(), 1)


@functools.partial(jax.jit, static_argnames=("cap",))
def tis(adv_BxN, old_BxN, sampler_BxN, cap: float):
  """Truncated importance weight min(pi_old / pi_sampler, cap) on the advantages."""
  return adv_BxN * jnp.minimum(jnp.exp(jnp.clip(old_BxN - sampler_BxN, -20, 20)), cap)
