"""Non-finite values: huge rewards keep finite advantages; a non-finite loss or gradient skips the step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cispo_jax.rl import advantages as A
from cispo_jax.rl import losses
from cispo_jax.model.tiny import random_params, tiny_config
from cispo_jax.rl.optim import OptimConfig, make_optimizer
from cispo_jax.rl.train_step import RolloutBatch, StepConfig, TrainState, train_step, update_on_rollout

# ----------------------------------------------------------------------------- advantages

SCALE_FREE = ("grpo", "group_std", "scalerl", "batch_std")  # divided by a std: unitless
IN_REWARD_UNITS = ("dr_grpo", "no_std", "rloo")
assert set(SCALE_FREE + IN_REWARD_UNITS) == set(A.ADVANTAGE_ESTIMATORS)
N = 4
# two groups: +-1 alternating, and one right of four
UNIT = np.array([1, -1, 1, -1, 1, 0, 0, 0], np.float32)
_jitted = jax.jit(A.compute_advantages, static_argnums=(0, 2))


def _both(name, r):
  """Eager and jitted advantages (XLA may rewrite r / s as r * (1/s))."""
  return [np.asarray(f(name, jnp.asarray(r), N)) for f in (A.compute_advantages, _jitted)]


@pytest.mark.parametrize("name", sorted(A.ADVANTAGE_ESTIMATORS))
def test_huge_rewards_give_the_scaled_advantages(name):
  """1e30 / -1e30 used to overflow the variance (std = inf): advantages 0, no update."""
  ref = np.asarray(A.compute_advantages(name, UNIT, N))
  assert np.abs(ref).max() > 0.5  # a real signal to compare against
  for huge in _both(name, UNIT * np.float32(1e30)):
    assert np.isfinite(huge).all(), huge
    if name in SCALE_FREE:  # eps = 1e-6 against a std of ~1 is the only difference
      np.testing.assert_allclose(huge, ref, rtol=1e-5)
    else:
      np.testing.assert_allclose(huge, ref * 1e30, rtol=1e-6)
  # a power-of-two scale changes nothing at all in the unit-carrying estimators
  for pow2 in _both(name, UNIT * np.float32(2.0 ** 100)):
    if name in IN_REWARD_UNITS:
      np.testing.assert_array_equal(pow2, ref * np.float32(2.0 ** 100))


@pytest.mark.parametrize("name", sorted(A.ADVANTAGE_ESTIMATORS))
def test_mixed_huge_and_small_rewards_stay_finite(name):
  r = np.array([1e30, 0, 1, -1e30,  # huge and small in one group
                1, 0, 0, 1,  # a small group beside it
                2e38, 2e38, 2e38, 0], np.float32)  # near float32's max: the group's sum overflowed
  for adv in _both(name, r):
    assert np.isfinite(adv).all(), adv
    for a_g, r_g in zip(adv.reshape(3, N), r.reshape(3, N)):  # still centred, to float32 rounding
      units = np.abs(r_g).max() if name in IN_REWARD_UNITS else 1.0
      assert abs(a_g.sum()) <= 1e-6 * units, (a_g, r_g)
    if name in ("grpo", "group_std"):
      # per group: the small group is untouched by its neighbours, the others are unitless
      np.testing.assert_array_equal(adv[4:8], np.asarray(A.compute_advantages(name, r[4:8], N)))
      np.testing.assert_allclose(adv[:4], [1.2247449, 0, 0, -1.2247449], atol=1e-6)
      np.testing.assert_allclose(adv[8:], np.asarray(A.compute_advantages(name, r[8:] / 1e38, N)), rtol=1e-5)
    if name in SCALE_FREE:
      assert np.abs(adv).max() < 10


def test_nonfinite_rewards_give_nonfinite_advantages_in_their_group_only():
  """A broken reward is not hidden: its group's advantages are NaN (and the step is skipped)."""
  r = np.array([np.inf, 0, 1, 0, 1, 0, 0, 1], np.float32)
  adv = np.asarray(A.compute_advantages("grpo", r, N))
  assert not np.isfinite(adv[:4]).any() and np.isfinite(adv[4:]).all()


# ----------------------------------------------------------------------------- skipped steps

NG, GROUPS, P, T, V = 2, 2, 4, 4, 32  # completions per prompt, prompts, prompt / completion length, vocab
ITERS, MINIS = 2, 2  # 4 optimizer steps per update; with 2 groups each minibatch is one group


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
  params = jax.tree.map(jnp.asarray, random_params(cfg, 0))
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2), 100)
  step_cfg = StepConfig(model=cfg, loss=losses.LossConfig().resolved(), temperature=1.0, micro_batches=1,
                        num_generations=NG, use_ref=False)
  update = jax.jit(functools.partial(update_on_rollout, cfg=step_cfg, tx=tx, schedule=schedule,
                                     num_iterations=ITERS, num_minibatches=MINIS))
  step = jax.jit(functools.partial(train_step, cfg=step_cfg, tx=tx, schedule=schedule))
  return dict(cfg=cfg, step_cfg=step_cfg, state=TrainState.create(params, tx, seed=0), update=update, step=step)


def _batch(groups=GROUPS, seed=0):
  rng = np.random.default_rng(seed)
  B = groups * NG
  mask = np.ones((B, T), np.float32)
  mask[1, 3:] = 0  # a padded tail
  return RolloutBatch(
      tokens_BxL=jnp.asarray(rng.integers(1, V, (B, P + T)), jnp.int32),
      kv_valid_BxL=jnp.ones((B, P + T), bool), mask_BxN=jnp.asarray(mask),
      old_logps_BxN=jnp.asarray(-np.log(V) + rng.normal(0, 0.1, (B, T)), jnp.float32),
      ref_logps_BxN=jnp.zeros((B, T), jnp.float32),
      adv_BxN=jnp.asarray(np.repeat(rng.normal(size=(B, 1)), T, 1), jnp.float32),
      group_ids_B=jnp.repeat(jnp.arange(groups, dtype=jnp.int32), NG))


def _poison(batch, rows, field, value):
  """`value` at one valid token of each of `rows` (a padded position would be masked out)."""
  x = np.array(getattr(batch, field))
  x[rows, 0] = value
  return batch._replace(**{field: jnp.asarray(x)})


def _host(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_equal(a, b):
  for x, y in zip(_host(a), _host(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _changed(a, b):
  return [not np.array_equal(x, y) for x, y in zip(_host(a), _host(b), strict=True)]


@pytest.mark.parametrize("field,value", [("adv_BxN", np.inf), ("adv_BxN", np.nan), ("old_logps_BxN", np.nan)])
def test_nonfinite_batch_skips_every_step(setup, field, value):
  state = setup["state"]
  bad = _poison(_batch(), list(range(0, GROUPS * NG, NG)), field, value)  # a row of every group
  new, metrics = setup["update"](state, bad)
  np.testing.assert_array_equal(metrics["skipped_nonfinite"], [1] * ITERS * MINIS)
  assert int(new.step) == int(state.step) == 0  # the LR schedule did not advance
  _assert_equal(new.params, state.params)  # bitwise
  _assert_equal(new.opt_state, state.opt_state)  # Adam's moments and counts too


def test_finite_batch_is_not_skipped(setup):
  state = setup["state"]
  new, metrics = setup["update"](state, _batch())
  assert metrics["skipped_nonfinite"].dtype == jnp.int32
  np.testing.assert_array_equal(metrics["skipped_nonfinite"], [0] * ITERS * MINIS)
  assert int(new.step) == ITERS * MINIS
  assert all(_changed(new.params, state.params)), "every parameter should move"
  assert all(np.isfinite(x).all() for x in _host(new.params))
  assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())


def test_only_the_nonfinite_minibatch_is_skipped(setup):
  """Group 0 poisoned, group 1 clean: per epoch one step skipped, the other applied as if alone."""
  state = setup["state"]
  batch = _batch()
  bad = _poison(batch, [0], "adv_BxN", np.nan)
  new, metrics = setup["update"](state, bad)
  skipped = np.asarray(metrics["skipped_nonfinite"]).reshape(ITERS, MINIS)
  np.testing.assert_array_equal(skipped.sum(1), [1] * ITERS)  # which one depends on the shuffle
  assert int(new.step) == ITERS
  # the applied steps are exactly the steps on the clean group (its minibatch, whatever the order)
  clean = jax.tree.map(lambda x: x[NG:], batch)
  expected = state
  for _ in range(ITERS):
    expected, m = setup["step"](expected, clean)
    assert int(m["skipped_nonfinite"]) == 0
  for x, y in zip(_host((new.params, new.opt_state, new.step)),
                  _host((expected.params, expected.opt_state, expected.step)), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
  assert any(_changed(new.params, state.params))


def test_nonfinite_micro_batch_skips_the_whole_step(setup):
  """Accumulation: a NaN in the second of two micro-batches is not averaged away."""
  step_cfg = setup["step_cfg"]._replace(micro_batches=2)
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2), 100)
  step = jax.jit(functools.partial(train_step, cfg=step_cfg, tx=tx, schedule=schedule))
  state, batch = setup["state"], _batch()
  new, m = step(state, batch)
  assert int(m["skipped_nonfinite"]) == 0 and any(_changed(new.params, state.params))
  # micro-batch j holds the groups j, j + 2, ...: row NG (group 1) lands in the second one
  new, m = step(state, _poison(batch, [NG], "old_logps_BxN", np.nan))
  assert int(m["skipped_nonfinite"]) == 1 and int(new.step) == 0
  _assert_equal((new.params, new.opt_state), (state.params, state.opt_state))


def test_divergent_learning_rate_never_reaches_nonfinite_params(setup):
  """lr = 1e9: the first step takes the params to ~1e9 (finite, not asked to be caught); from there
  the loss stays finite but the gradient is NaN, and those steps are skipped. Before the check the
  second step wrote NaN into every parameter."""
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e9), 100)
  step = jax.jit(functools.partial(train_step, cfg=setup["step_cfg"], tx=tx, schedule=schedule))
  state = TrainState.create(setup["state"].params, tx, seed=0)
  skipped = []
  for seed in range(4):
    state, m = step(state, jax.tree.map(lambda x: x[:NG], _batch(seed=seed)))
    skipped.append(int(m["skipped_nonfinite"]))
    assert all(np.isfinite(x).all() for x in _host((state.params, state.opt_state)))
  assert skipped[0] == 0 and sum(skipped) >= 1, skipped
  assert max(np.abs(x).max() for x in _host(state.params)) > 1e8
  assert int(state.step) == 4 - sum(skipped)
