"""Group-relative advantages from verifiable rewards, as pure JAX functions.

Rewards come flat, shaped [prompts * n]: rows [g*n, (g+1)*n) are the n completions of prompt g.
Every estimator centres a reward on its group's mean; they differ in the scale:
  group   (GRPO)          / (std of the group + eps)
  batch   (ScaleRL)       / (std of all rewards in the batch + eps)
  none    (Dr.GRPO)       no scaling
  rloo                    r_i - mean of the OTHER n-1 rewards of the group = n/(n-1) (r_i - mean)
Standard deviations are the unbiased (n-1) estimate, as TRL and verl compute them.

Overflow: squaring a reward of 1e20 (or summing a few of 1e38) overflows float32, which used to
turn a group's std into inf and its advantages into 0 or NaN. Every estimator is therefore
computed on rewards divided by a power of two s with s <= max |r| < 2 s (max over the group, or
over the batch for the batch std) and multiplied back where the result has the rewards' units.
Scaling by a power of two is exact, so wherever the unscaled formula neither overflows nor
underflows the advantages are bitwise the same; the eps of the std modes is divided by s too, so
each estimator keeps its meaning at any reward scale.
Non-finite rewards (inf, NaN) still give non-finite advantages for their group: the train step
skips such an update (train_step.py) instead of learning from it.

Failed rewards (valid_N, TaskConfig.on_reward_error = 'mask'): a row whose reward failed is no sample of
its group. Every estimator then takes its statistics over the valid rows only (a group's mean and std, the
batch's std, RLOO's leave-one-out mean, counted over the k valid rows with k - 1 for the unbiased std),
gives invalid rows advantage 0, and a group with fewer than 2 valid rows carries no signal (advantages 0,
dropped by the zero-variance mask). valid_N=None is the unmasked formula, the same program as before.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def _groups(rewards_N, num_generations):
  """[N] -> [G, n] f32, checking the contiguous-group layout."""
  if not (isinstance(num_generations, int) and num_generations >= 1):
    raise ValueError(f"num_generations={num_generations!r} must be a positive int")
  rewards_N = jnp.asarray(rewards_N)
  if rewards_N.ndim != 1 or rewards_N.shape[0] % num_generations:
    raise ValueError(f"rewards_N has shape {tuple(rewards_N.shape)}; allowed: 1-D with a length "
                     f"that is a multiple of num_generations={num_generations}")
  return rewards_N.astype(jnp.float32).reshape(-1, num_generations)


def _valid(valid_N, r_GxN):
  """valid_N [N] bool -> [G, n] bool beside r_GxN, or None (every row valid)."""
  if valid_N is None:
    return None
  valid_N = jnp.asarray(valid_N)
  if valid_N.shape != (r_GxN.size,):
    raise ValueError(f"valid_N has shape {tuple(valid_N.shape)}; it must match rewards_N: ({r_GxN.size},)")
  return valid_N.astype(bool).reshape(r_GxN.shape)


def _mean(x, axis=None, valid=None):
  """Mean over `axis` (keepdims), of the valid entries only when `valid` is given (0 where there are none)."""
  if valid is None:
    return x.mean(axis=axis, keepdims=True)
  count = valid.sum(axis=axis, keepdims=True)
  return jnp.where(valid, x, 0).sum(axis=axis, keepdims=True) / jnp.maximum(count, 1)


def _std(x, axis=None, valid=None):
  """Unbiased std over `axis` (keepdims); with `valid`, over the valid entries (n - 1 -> k - 1)."""
  if valid is None:
    n = x.size if axis is None else x.shape[axis]
    var = ((x - x.mean(axis=axis, keepdims=True)) ** 2).sum(axis=axis, keepdims=True)
    return jnp.sqrt(var / max(n - 1, 1))
  k = valid.sum(axis=axis, keepdims=True)
  var = jnp.where(valid, (x - _mean(x, axis, valid)) ** 2, 0).sum(axis=axis, keepdims=True)
  return jnp.sqrt(var / jnp.maximum(k - 1, 1))


def _pow2_scale(r, axis=None, valid=None):
  """A power of two s with s <= max|r| < 2 s over `axis` (1/2 for all-zero rewards).

  r / s then lies in (-2, 2): its squares and sums cannot overflow. The exponent is clipped to
  [-126, 126], so s and 1/s are both normal floats (XLA may divide by s as a product with 1/s,
  and flushes subnormals to zero); only rewards above 2^127 then reach |r / s| < 4. An inf or NaN
  reward gives s = 1/2.
  """
  _, e = jnp.frexp((jnp.abs(r) if valid is None else jnp.where(valid, jnp.abs(r), 0)).max(axis=axis, keepdims=True))
  return jnp.ldexp(jnp.ones((), r.dtype), jnp.clip(e - 1, -126, 126))


STD_MODES = ("group", "batch", "none")


def group_advantages(rewards_N, num_generations, std_mode="group", eps=1e-6, valid_N=None):
  """Rewards minus their group mean, divided by the group's or the batch's std (or nothing); with
  valid_N, statistics over the valid rows only and 0 for the others (module docstring)."""
  if std_mode not in STD_MODES:
    raise ValueError(f"std_mode={std_mode!r} is not one of {list(STD_MODES)}")
  r_GxN = _groups(rewards_N, num_generations)
  valid = _valid(valid_N, r_GxN)
  axis = None if std_mode == "batch" else 1
  s = _pow2_scale(r_GxN, axis=axis, valid=valid)  # [1, 1] or [G, 1]
  x_GxN = r_GxN / s
  centred_GxN = x_GxN - _mean(x_GxN, 1, valid)
  if valid is not None:
    centred_GxN = jnp.where(valid & (valid.sum(1, keepdims=True) >= 2), centred_GxN, 0)
  if std_mode == "none":
    return (centred_GxN * s).reshape(-1)
  std = _std(x_GxN, axis=axis, valid=valid)
  # (r - mean) / (std(r) + eps) with r = s x. eps / s may underflow to 0 for a huge s; the
  # denominator is then 0 only where every centred value is exactly 0 too, so it is floored.
  denom = jnp.maximum(std + eps / s, jnp.finfo(x_GxN.dtype).tiny)
  return (centred_GxN / denom).reshape(-1)


def rloo_advantages(rewards_N, num_generations, valid_N=None):
  """Leave-one-out baseline: each reward minus the mean of the other n-1 of its group (with valid_N: of
  the other valid rows, 0 for invalid rows and for groups with fewer than 2 valid rows)."""
  r_GxN = _groups(rewards_N, num_generations)
  if num_generations < 2:
    raise ValueError(f"num_generations={num_generations} must be >= 2 for RLOO (the baseline "
                     "is the mean of the other completions)")
  valid = _valid(valid_N, r_GxN)
  s = _pow2_scale(r_GxN, axis=1, valid=valid)  # the group's sum must not overflow
  x_GxN = r_GxN / s
  if valid is None:
    others_GxN = (x_GxN.sum(axis=1, keepdims=True) - x_GxN) / (num_generations - 1)
    return ((x_GxN - others_GxN) * s).reshape(-1)
  x_GxN = jnp.where(valid, x_GxN, 0)
  k = valid.sum(axis=1, keepdims=True)
  others_GxN = (x_GxN.sum(axis=1, keepdims=True) - x_GxN) / jnp.maximum(k - 1, 1)
  return jnp.where(valid & (k >= 2), (x_GxN - others_GxN) * s, 0).reshape(-1)


def zero_variance_mask(rewards_N, num_generations, valid_N=None):
  """[N] bool, True where the row's group has differing rewards (keep it): an all-equal group
  has zero advantage under every estimator and only dilutes the batch. With valid_N, over the valid
  rows of each group (fewer than 2 valid rows: no signal); per group, so an invalid row of a kept group
  is True here (the trainer zeroes its loss mask row by row)."""
  r_GxN = _groups(rewards_N, num_generations)
  valid = _valid(valid_N, r_GxN)
  if valid is None:
    keep_G = r_GxN.max(axis=1) > r_GxN.min(axis=1)  # exact, unlike std > eps
  else:
    keep_G = jnp.where(valid, r_GxN, -jnp.inf).max(axis=1) > jnp.where(valid, r_GxN, jnp.inf).min(axis=1)
  return jnp.repeat(keep_G, num_generations)


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {  # (rewards_N, num_generations, valid_N=None) -> adv_N
    "grpo": lambda r, n, v=None: group_advantages(r, n, "group", valid_N=v),
    "group_std": lambda r, n, v=None: group_advantages(r, n, "group", valid_N=v),
    "scalerl": lambda r, n, v=None: group_advantages(r, n, "batch", valid_N=v),
    "batch_std": lambda r, n, v=None: group_advantages(r, n, "batch", valid_N=v),
    "dr_grpo": lambda r, n, v=None: group_advantages(r, n, "none", valid_N=v),
    "no_std": lambda r, n, v=None: group_advantages(r, n, "none", valid_N=v),
    "rloo": rloo_advantages,
}


def compute_advantages(name, rewards_N, num_generations, valid_N=None):
  """Advantages [N] by estimator name (see ADVANTAGE_ESTIMATORS); valid_N: the rows whose reward did
  not fail (None = all)."""
  if name not in ADVANTAGE_ESTIMATORS:
    raise ValueError(f"advantage estimator {name!r} is not one of "
                     f"{sorted(ADVANTAGE_ESTIMATORS)}")
  return ADVANTAGE_ESTIMATORS[name](rewards_N, num_generations, valid_N)


@functools.partial(jax.jit, static_argnames=("name", "num_generations", "filter_zero_variance"))
def advantages_and_keep(rewards_N, name, num_generations, filter_zero_variance=True, valid_N=None):
  """The trainer's one program per rollout: the advantages [N] f32 and the groups to keep [N] bool
  (zero_variance_mask, or all rows when filter_zero_variance is off), on the devices. valid_N [N] bool:
  statistics over the valid rows only (None: all rows, the unmasked program)."""
  adv_N = compute_advantages(name, rewards_N, num_generations, valid_N)
  keep_N = (zero_variance_mask(rewards_N, num_generations, valid_N) if filter_zero_variance
            else jnp.ones(adv_N.shape, bool))
  return adv_N, keep_N
