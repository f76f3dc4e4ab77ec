"""Group-relative advantages from verifiable rewards, as pure JAX functions.

Rewards come flat, shaped [prompts * n]: rows [g*n, (g+1)*n) are the n completions of prompt g.
Every estimator centres a reward on its group's mean; they differ in the scale:
  group   (GRPO)          / (std of the group + eps)
  batch   (ScaleRL)       / (std of all rewards in the batch + eps)
  none    (Dr.GRPO)       no scaling
  rloo                    r_i - mean of the OTHER n-1 rewards of the group = n/(n-1) (r_i - mean)
Standard deviations are the unbiased (n-1) estimate, as TRL and verl compute them.
"""

from typing import Callable

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


STD_MODES = ("group", "batch", "none")


def group_advantages(rewards_N, num_generations, std_mode="group", eps=1e-6):
  """Rewards minus their group mean, divided by the group's or the batch's std (or nothing)."""
  if std_mode not in STD_MODES:
    raise ValueError(f"std_mode={std_mode!r} is not one of {list(STD_MODES)}")
  r_GxN = _groups(rewards_N, num_generations)
  centred_GxN = r_GxN - r_GxN.mean(axis=1, keepdims=True)
  if std_mode == "group":
    centred_GxN = centred_GxN / (_std(r_GxN, axis=1) + eps)
  elif std_mode == "batch":
    centred_GxN = centred_GxN / (_std(r_GxN) + eps)
  return centred_GxN.reshape(-1)


def rloo_advantages(rewards_N, num_generations):
  """Leave-one-out baseline: each reward minus the mean of the other n-1 of its group."""
  r_GxN = _groups(rewards_N, num_generations)
  if num_generations < 2:
    raise ValueError(f"num_generations={num_generations} must be >= 2 for RLOO (the baseline "
                     "is the mean of the other completions)")
  others_GxN = (r_GxN.sum(axis=1, keepdims=True) - r_GxN) / (num_generations - 1)
  return (r_GxN - others_GxN).reshape(-1)


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
