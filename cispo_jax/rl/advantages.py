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


def _std(x, axis=None):
  n = x.size if axis is None else x.shape[axis]
  var = ((x - x.mean(axis=axis, keepdims=True)) ** 2).sum(axis=axis, keepdims=True)
  return jnp.sqrt(var / max(n - 1, 1))


def _pow2_scale(r, axis=None):
  """A power of two s with s <= max|r| < 2 s over `axis` (1/2 for all-zero rewards).

  r / s then lies in (-2, 2): its squares and sums cannot overflow. The exponent is clipped to
  [-126, 126], so s and 1/s are both normal floats (XLA may divide by s as a product with 1/s,
  and flushes subnormals to zero); only rewards above 2^127 then reach |r / s| < 4. An inf or NaN
  reward gives s = 1/2.
  """
  _, e = jnp.frexp(jnp.abs(r).max(axis=axis, keepdims=True))
  return jnp.ldexp(jnp.ones((), r.dtype), jnp.clip(e - 1, -126, 126))


STD_MODES = ("group", "batch", "none")


def group_advantages(rewards_N, num_generations, std_mode="group", eps=1e-6):
  """Rewards minus their group mean, divided by the group's or the batch's std (or nothing)."""
  if std_mode not in STD_MODES:
    raise ValueError(f"std_mode={std_mode!r} is not one of {list(STD_MODES)}")
  r_GxN = _groups(rewards_N, num_generations)
  s = _pow2_scale(r_GxN, axis=None if std_mode == "batch" else 1)  # [1, 1] or [G, 1]
  x_GxN = r_GxN / s
  centred_GxN = x_GxN - x_GxN.mean(axis=1, keepdims=True)
  if std_mode == "none":
    return (centred_GxN * s).reshape(-1)
  std = _std(x_GxN, axis=None if std_mode == "batch" else 1)
  # (r - mean) / (std(r) + eps) with r = s x. eps / s may underflow to 0 for a huge s; the
  # denominator is then 0 only where every centred value is exactly 0 too, so it is floored.
  denom = jnp.maximum(std + eps / s, jnp.finfo(x_GxN.dtype).tiny)
  return (centred_GxN / denom).reshape(-1)


def rloo_advantages(rewards_N, num_generations):
  """Leave-one-out baseline: each reward minus the mean of the other n-1 of its group."""
  r_GxN = _groups(rewards_N, num_generations)
  if num_generations < 2:
    raise ValueError(f"num_generations={num_generations} must be >= 2 for RLOO (the baseline "
                     "is the mean of the other completions)")
  s = _pow2_scale(r_GxN, axis=1)  # the group's sum must not overflow
  x_GxN = r_GxN / s
  others_GxN = (x_GxN.sum(axis=1, keepdims=True) - x_GxN) / (num_generations - 1)
  return ((x_GxN - others_GxN) * s).reshape(-1)


def zero_variance_mask(rewards_N, num_generations):
  """[N] bool, True where the row's group has differing rewards (keep it): an all-equal group
  has zero advantage under every estimator and only dilutes the batch."""
  r_GxN = _groups(rewards_N, num_generations)
  keep_G = r_GxN.max(axis=1) > r_GxN.min(axis=1)  # exact, unlike std > eps
  return jnp.repeat(keep_G, num_generations)


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {
    "grpo": lambda r, n: group_advantages(r, n, "group"),
    "group_std": lambda r, n: group_advantages(r, n, "group"),
    "scalerl": lambda r, n: group_advantages(r, n, "batch"),
    "batch_std": lambda r, n: group_advantages(r, n, "batch"),
    "dr_grpo": lambda r, n: group_advantages(r, n, "none"),
    "no_std": lambda r, n: group_advantages(r, n, "none"),
    "rloo": rloo_advantages,
}


def compute_advantages(name, rewards_N, num_generations):
  """Advantages [N] by estimator name (see ADVANTAGE_ESTIMATORS)."""
  if name not in ADVANTAGE_ESTIMATORS:
    raise ValueError(f"advantage estimator {name!r} is not one of "
                     f"{sorted(ADVANTAGE_ESTIMATORS)}")
  return ADVANTAGE_ESTIMATORS[name](rewards_N, num_generations)


@functools.partial(jax.jit, static_argnames=("name", "num_generations", "filter_zero_variance"))
def advantages_and_keep(rewards_N, name, num_generations, filter_zero_variance=True):
  """The trainer's one program per rollout: the advantages [N] f32 and the rows to keep [N] bool
  (zero_variance_mask, or all rows when filter_zero_variance is off), on the devices."""
  adv_N = compute_advantages(name, rewards_N, num_generations)
  keep_N = (zero_variance_mask(rewards_N, num_generations) if filter_zero_variance
            else jnp.ones(adv_N.shape, bool))
  return adv_N, keep_N
