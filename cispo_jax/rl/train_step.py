"""The train state and the jitted update: log-probs -> policy loss -> grads -> optax.

`train_step(state, minibatch)` is one pure function. Gradient accumulation adds the loss's
unreduced sums and denominators over micro-batches (lax.scan) and divides once, so splitting a
minibatch never changes the gradient. `update_on_rollout` runs num_iterations epochs of
minibatches over one rollout batch inside a single jitted program.

Update work without gradient (the trainer's UpdateConfig.compact_groups / trim_completions /
old_logps_in_update): `update_on_rollout` can take the minibatch order from the caller
(`order_IxMxG`, group indices per epoch and minibatch). The trainer computes the same shuffle on
the host (`epoch_permutations`, from the same key), drops the zero-weight groups from each
minibatch and pads it with other zero-weight groups to a bucket, so every minibatch holds the
same weighted groups as the masked full batch would. With `old_from_first_step` (one minibatch
per epoch) the old log-probs are the first step's own forward, stop-gradiented, instead of a
separate forward before the update; they come back as a third output.

Non-finite steps: when the loss or the gradient (through its global norm) is inf or NaN, the step
is skipped: params, opt_state and step come back bitwise unchanged (so the LR schedule and Adam's
bias correction do not advance either) and the step's metric `skipped_nonfinite` is 1. The check
lives here rather than in optax.apply_if_finite, which would add counters to the optimizer state
(a new checkpoint layout and sharding rules), looks at the gradient only, and after
max_consecutive_errors skips applies the non-finite update anyway.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from cispo_jax.rl import diagnostics
from cispo_jax.rl import losses
from cispo_jax.rl import reductions
from cispo_jax.model import ModelConfig, lora
from cispo_jax.model.logprobs import completion_logps


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array  # raw key data (uint32[2]); every random draw of the run derives from it

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, seed: int) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=jax.random.key_data(jax.random.PRNGKey(seed)))


class RolloutBatch(NamedTuple):
  """Everything an update needs about one rollout; leading dim B = prompts * n, grouped by prompt."""
  tokens_BxL: jax.Array  # prompt (left-padded) + completion
  kv_valid_BxL: jax.Array  # prompt mask | completion mask
  mask_BxN: jax.Array  # completion tokens that enter the loss (f32)
  old_logps_BxN: jax.Array
  ref_logps_BxN: jax.Array  # zeros when no KL
  adv_BxN: jax.Array  # per-token advantages (a sequence advantage broadcast, times any TIS weight)
  group_ids_B: jax.Array


class StepConfig(NamedTuple):
  """Static (hashable) description of a train step."""
  model: ModelConfig
  loss: losses.LossConfig
  temperature: float
  micro_batches: int
  num_generations: int
  use_ref: bool


def _loss_fn(params, mb: RolloutBatch, cfg: StepConfig, old_from_current=None, frozen=None):
  """(loss_sum, (LossOutput, logps_BxN)).

  old_from_current: None, or a traced bool; when true the old log-probs are this forward's own
  (stop_gradient: the ratio is exactly 1 and no gradient flows through them) and
  mb.old_logps_BxN is ignored. frozen: None, or (LoRA) the frozen base the trained `params` (its
  adapters) are added to (model/lora.py); no gradient is taken with respect to it.
  """
  policy = lora.combine(frozen, params) if frozen is not None else params
  logps_BxN, entropy_BxN = completion_logps(policy, cfg.model, mb.tokens_BxL, mb.kv_valid_BxL,
                                            mb.mask_BxN.shape[1], cfg.temperature)
  old_BxN = mb.old_logps_BxN
  if old_from_current is not None:
    old_BxN = jnp.where(old_from_current, jax.lax.stop_gradient(logps_BxN), old_BxN)
  out = losses.policy_loss(logps_BxN, old_BxN, mb.adv_BxN, mb.mask_BxN, cfg.loss,
                           ref_logps_BxT=mb.ref_logps_BxN if cfg.use_ref else None,
                           entropy_BxT=entropy_BxN, group_ids_B=mb.group_ids_B)
  # The fork-token diagnostic (diagnostics.py), whatever the loss: a few elementwise ops, metrics only.
  out.metrics.update(diagnostics.accounting_metrics(logps_BxN, old_BxN, mb.adv_BxN, mb.mask_BxN, cfg.loss,
                                                    group_ids_B=mb.group_ids_B))
  return out.loss_sum, (out, logps_BxN)


def split_micro(batch, micro: int, group: int):
  """[B, ...] -> [micro, B/micro, ...], keeping each prompt group whole inside one micro-batch.

  Micro-batch j takes groups j, j+micro, j+2*micro, ...: the leading (sharded) axis of the
  batch stays leading, so on a data-parallel mesh every device feeds every micro-batch
  and the split needs no communication.
  """
  def f(x):
    B = x.shape[0]
    g = B // group
    x = x.reshape(g // micro, micro, group, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(micro, B // micro, *x.shape[3:])
  return jax.tree.map(f, batch)


def train_step(state: TrainState, mb: RolloutBatch, frozen=None, *, cfg: StepConfig, tx, schedule):
  """One optimizer step on one minibatch (accumulating over cfg.micro_batches); each metric is reduced
  over the micro-batches as reductions.REDUCTIONS declares (ratio_max the max over all tokens, ...).

  Skipped, with the state returned unchanged, when the loss or the gradient is not finite (see
  the module docstring); metrics["skipped_nonfinite"] (int32) is 1 then, else 0. frozen: the LoRA base
  (state.params then holds the adapters alone), or None.
  """
  state, metrics, _ = _train_step(state, mb, None, frozen, cfg=cfg, tx=tx, schedule=schedule)
  return state, metrics


def _train_step(state: TrainState, mb: RolloutBatch, old_from_current, frozen=None, *, cfg: StepConfig, tx,
                schedule):
  """train_step; with old_from_current (a traced bool, see _loss_fn) also the forward's log-probs,
  [micro_batches, B / micro_batches, N] in split_micro's row order (else None)."""
  micro = split_micro(mb, cfg.micro_batches, cfg.num_generations)
  want_logps = old_from_current is not None

  def body(carry, micro_batch):
    grads_acc, denom_acc = carry
    (loss_sum, (out, logps)), grads = jax.value_and_grad(_loss_fn, has_aux=True)(
        state.params, micro_batch, cfg, old_from_current, frozen)
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    return (grads_acc, denom_acc + out.denominator), (loss_sum, out.metrics, logps if want_logps else None)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  (grad_sum, denom), (loss_sums, metrics, logps) = jax.lax.scan(body, (zeros, jnp.float32(0.0)), micro)
  denom = jnp.maximum(denom, 1e-8)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, state.params)
  loss = loss_sums.sum() / denom
  grad_norm = optax.tree.norm(grads)
  # One scalar test: the norm is inf/NaN when any gradient entry is, and also when finite
  # entries' squares overflow (a norm the clipping would turn into a zero or NaN update).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def apply(state):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

  # lax.cond, not a jnp.where over the state tree: XLA:CPU materialised the whole new state
  # (params + Adam moments) beside the old one for the select, doubling the optimizer's share
  # of temp memory; the conditional updates the donated buffers in place (no more temp than
  # the unguarded step: measured with sharding.compiled_memory("train_step", ...)).
  new_state = jax.lax.cond(finite, apply, lambda state: state, state)
  metrics = reductions.over_micro(metrics)  # each metric its own reduction: max, min, sum, weighted mean
  metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                 skipped_nonfinite=jnp.logical_not(finite).astype(jnp.int32))
  return new_state, metrics, logps


def epoch_permutations(rng_data, n_groups: int, num_iterations: int):
  """(the state's next rng data, [num_iterations, n_groups] group permutations, one per epoch).

  The update's shuffle. The trainer calls it on the host side too (same key, same function), to
  know each minibatch's groups before the update runs.
  """
  rng, shuffle_key = jax.random.split(jax.random.wrap_key_data(rng_data))
  perms = jax.lax.map(lambda key: jax.random.permutation(key, n_groups),
                      jax.random.split(shuffle_key, num_iterations))
  return jax.random.key_data(rng), perms


def update_on_rollout(state: TrainState, batch: RolloutBatch, order_IxMxG=None, frozen=None, *, cfg: StepConfig,
                      tx, schedule, num_iterations: int, num_minibatches: int, old_from_first_step: bool = False,
                      packed: bool = False):
  """num_iterations passes over the rollout, each in num_minibatches shuffled (by group) minibatches.

  order_IxMxG: None, the shuffle drawn here (minibatch j of epoch i takes the groups perm_i[j::M]
  of `epoch_permutations`); or int32 [num_iterations, num_minibatches, G] group indices into
  `batch` (every group of the batch once per epoch), the trainer's compacted order. The state's
  rng advances the same way either way.

  old_from_first_step (needs num_minibatches == 1): batch.old_logps_BxN is ignored; the first
  optimizer step's forward (the params the rollout was sampled with, on every row) gives the old
  log-probs, stop-gradiented, so its ratio is exactly 1; later epochs use them as usual.

  Returns the new state and per-step metrics stacked [num_iterations * num_minibatches];
  metrics["skipped_nonfinite"] marks the steps skipped for a non-finite loss or gradient (sum it,
  don't average it, to count them). packed: instead, the metrics reduced over the steps as well
  (reductions.py) with the per-step skipped_nonfinite, in one reductions.PackedMetrics vector (one
  transfer to the host). With old_from_first_step also the old log-probs [B, N] (the rows of `batch`).
  frozen: the LoRA base (train_step), or None.
  """
  B, N = batch.mask_BxN.shape
  n = cfg.num_generations
  n_groups = B // n
  rng, perms_IxG = epoch_permutations(state.rng, n_groups, num_iterations)
  state = state.replace(rng=rng)
  if order_IxMxG is None:
    order_IxMxG = perms_IxG.reshape(num_iterations, n_groups // num_minibatches, num_minibatches).swapaxes(1, 2)
  if order_IxMxG.shape[:2] != (num_iterations, num_minibatches):
    raise ValueError(f"order_IxMxG has shape {order_IxMxG.shape}; want ({num_iterations}, {num_minibatches}, G)")
  if old_from_first_step and num_minibatches != 1:
    raise ValueError("old_from_first_step needs num_minibatches == 1: a later minibatch's old log-probs are "
                     "those of the params before the first step")
  rows_IxMxR = (order_IxMxG[..., None] * n + jnp.arange(n)).reshape(num_iterations, num_minibatches, -1)
  step = functools.partial(_train_step, cfg=cfg, tx=tx, schedule=schedule)

  def epoch(carry, xs):
    state, old_BxN = carry
    i, rows_MxR = xs
    source = batch._replace(old_logps_BxN=old_BxN) if old_from_first_step else batch
    minibatches = jax.tree.map(lambda x: jnp.take(x, rows_MxR, axis=0), source)  # [M, R, ...]
    first = (i == 0) if old_from_first_step else None

    def one(state, mb):
      state, metrics, logps = step(state, mb, first, frozen)
      return state, (metrics, logps)

    state, (metrics, logps) = jax.lax.scan(one, state, minibatches)
    if old_from_first_step:  # M == 1: the first epoch's forward, back in the batch's row order
      micro_rows = split_micro(rows_MxR[0], cfg.micro_batches, n).reshape(-1)
      fresh = old_BxN.at[micro_rows].set(logps.reshape(-1, N))
      old_BxN = jnp.where(i == 0, fresh, old_BxN)
    return (state, old_BxN), metrics

  (state, old_BxN), metrics = jax.lax.scan(
      epoch, (state, batch.old_logps_BxN if old_from_first_step else None), (jnp.arange(num_iterations), rows_IxMxR))
  metrics = jax.tree.map(lambda m: m.reshape(-1), metrics)
  if packed:
    metrics = reductions.pack(reductions.over_steps(metrics), {"skipped_nonfinite": metrics["skipped_nonfinite"]})
  if old_from_first_step:
    return state, metrics, old_BxN
  return state, metrics
