"""Group-relative advantages against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cispo_jax.rl import advantages as A

# 3 prompts x 4 completions: one correct of four, all correct, two of four.
REWARDS = np.array([1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1], np.float32)
N = 4


def test_group_std_advantages():
  # group 0: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2; group 2: mean 1/2,
  # std sqrt(1/3); group 1 has no spread and gets zeros.
  s = np.sqrt(1 / 3)
  expected = [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0, -0.5 / s, 0.5 / s, -0.5 / s, 0.5 / s]
  np.testing.assert_allclose(A.group_advantages(REWARDS, N), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(A.compute_advantages("grpo", REWARDS, N), expected, rtol=1e-5,
                             atol=1e-6)


def test_batch_std_advantages():
  # 7 ones, 5 zeros: unbiased batch variance (7 (5/12)^2 + 5 (7/12)^2) / 11 = 420 / 1584.
  std = np.sqrt(420 / 1584)
  centred = [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -0.5, 0.5, -0.5, 0.5]
  for name in ("scalerl", "batch_std"):
    np.testing.assert_allclose(A.compute_advantages(name, REWARDS, N), np.array(centred) / std,
                               rtol=1e-5, atol=1e-6)


def test_no_std_advantages():
  centred = [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -0.5, 0.5, -0.5, 0.5]
  for name in ("dr_grpo", "no_std"):
    np.testing.assert_allclose(A.compute_advantages(name, REWARDS, N), centred, atol=1e-7)


def test_rloo_advantages():
  # each reward minus the mean of the other three of its group
  expected = [1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0, -2 / 3, 2 / 3, -2 / 3, 2 / 3]
  np.testing.assert_allclose(A.rloo_advantages(REWARDS, N), expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(A.compute_advantages("rloo", REWARDS, N), expected, rtol=1e-6,
                             atol=1e-7)


def test_every_estimator_centres_each_group():
  r = np.random.default_rng(0).normal(size=24).astype(np.float32)
  for name in A.ADVANTAGE_ESTIMATORS:
    adv = np.asarray(A.compute_advantages(name, r, 6)).reshape(4, 6)
    np.testing.assert_allclose(adv.sum(1), 0.0, atol=1e-5, err_msg=name)


def test_zero_variance_mask():
  keep = A.zero_variance_mask(REWARDS, N)
  assert keep.dtype == jnp.bool_
  np.testing.assert_array_equal(keep, [True] * 4 + [False] * 4 + [True] * 4)
  # non-binary rewards: equal fractional rewards are zero-variance, a tiny spread is not
  np.testing.assert_array_equal(A.zero_variance_mask(np.array([0.3, 0.3, 0.3, 0.30001]), 2),
                                [False, False, True, True])


def test_advantages_under_jit():
  f = jax.jit(A.compute_advantages, static_argnums=(0, 2))
  np.testing.assert_allclose(f("grpo", jnp.asarray(REWARDS), N), A.group_advantages(REWARDS, N))
  np.testing.assert_array_equal(jax.jit(A.zero_variance_mask, static_argnums=1)(REWARDS, N),
                                A.zero_variance_mask(REWARDS, N))


@pytest.mark.parametrize("call,fragments", [
    (lambda: A.compute_advantages("gae", REWARDS, N), ["'gae'", "'grpo'", "'rloo'", "'scalerl'"]),
    (lambda: A.group_advantages(REWARDS, 5), ["rewards_N", "(12,)", "num_generations=5"]),
    (lambda: A.group_advantages(REWARDS.reshape(3, 4), N), ["rewards_N", "1-D"]),
    (lambda: A.group_advantages(REWARDS, N, std_mode="global"), ["std_mode", "'batch'"]),
    (lambda: A.rloo_advantages(REWARDS, 1), ["num_generations=1", ">= 2"]),
    (lambda: A.zero_variance_mask(REWARDS, 0), ["num_generations=0", "positive int"]),
])
def test_bad_input_raises(call, fragments):
  with pytest.raises(ValueError) as e:
    call()
  for f in fragments:
    assert f in str(e.value), (f, str(e.value))


@pytest.mark.parametrize("name", sorted(A.ADVANTAGE_ESTIMATORS))
def test_advantages_and_keep_is_the_trainers_program(name):
  """The trainer's jitted program gives the estimator's advantages and the zero-variance mask (or all rows)."""
  adv, keep = A.advantages_and_keep(jnp.asarray(REWARDS), name, N, True)
  np.testing.assert_allclose(adv, A.compute_advantages(name, REWARDS, N), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(keep, A.zero_variance_mask(REWARDS, N))
  assert adv.dtype == jnp.float32 and keep.dtype == jnp.bool_
  _, keep_all = A.advantages_and_keep(jnp.asarray(REWARDS), name, N, False)
  assert np.asarray(keep_all).all()
