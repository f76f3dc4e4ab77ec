"""Reward registry, built-in verifiers, and isolated scoring (exceptions, hangs, crashes)."""

import logging

import numpy as np
import pytest

from cispo_jax.data import ArithmeticTask, CountdownTask, Example
from cispo_jax.rewards import (RewardConfig, RewardScorer, get_reward, register_reward,
                               registered_rewards, score)

import user_reward_fns  # noqa: F401  (registers "test_flaky")

NUM = Example("23+58=", "81", {"task": "arithmetic"})
CD = Example("29:3,7,25=", "29", {"task": "countdown", "numbers": [3, 7, 25], "target": 29,
                                  "solution": "25+7-3"})


@pytest.mark.parametrize("completion, expected", [
    ("81", 1.0), (" 81 ", 1.0), ("\t81", 1.0), ("81.0", 1.0), ("81\n99", 1.0), ("81 is it", 1.0),
    ("80", 0.0), ("811", 0.0), ("8 1", 0.0), ("99\n81", 0.0), ("", 0.0), ("abc", 0.0), ("-81", 0.0),
])
def test_exact_numeric(completion, expected):
  assert get_reward("exact_numeric")(completion, NUM) == expected


def test_exact_numeric_negative_and_non_numeric_answer():
  assert get_reward("exact_numeric")("-55", Example("3-58=", "-55")) == 1.0
  with pytest.raises(ValueError, match="not a number"):
    get_reward("exact_numeric")("1", Example("q", "one"))


@pytest.mark.parametrize("completion, expected", [
    ("25+7-3", 1.0), (" 25 + 7 - 3 ", 1.0), ("(25-3)+7\nmore", 1.0), ("25+7-3=29", 1.0),
    ("25+7+3", 0.0), ("25+7-3-3", 0.0), ("29", 0.0), ("25+7-3+3-3", 0.0), ("__import__('os')", 0.0), ("", 0.0),
])
def test_countdown_reward(completion, expected):
  assert get_reward("countdown")(completion, CD) == expected


def test_countdown_reward_needs_countdown_meta():
  with pytest.raises(ValueError, match="meta"):
    get_reward("countdown")("1+1", NUM)


@pytest.mark.parametrize("completion, example, expected", [
    ("81", NUM, 1.0), (" 81\n", NUM, 1.0), ("80", NUM, 1.0), ("81 yes", NUM, 0.0), ("", NUM, 0.0),
    ("81\n81", NUM, 0.0), ("25+7+3", CD, 1.0), ("25+", CD, 0.0), ("x", Example("q", "one"), 1.0),
])
def test_format_reward(completion, example, expected):
  assert get_reward("format")(completion, example) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("so the answer is \\boxed{0.5}", "\\frac{1}{2}", 1.0), ("$\\frac{2}{4}$", "0.5", 1.0),
    ("81", "81", 1.0), ("\\boxed{80}", "81", 0.0), ("no idea", "81", 0.0),
])
def test_math_verify_reward(completion, answer, expected):
  assert get_reward("math_verify")(completion, Example("q", answer)) == expected


def test_registry_names_and_import_paths():
  assert {"exact_numeric", "countdown", "math_verify", "format", "test_flaky"} <= set(registered_rewards())
  assert get_reward("user_reward_fns:length_bonus")(" abcd ", NUM) == 1.0
  with pytest.raises(ValueError, match="unknown reward 'exactnumeric'.*exact_numeric"):
    get_reward("exactnumeric")
  with pytest.raises(ValueError, match="'no_such_pkg.mod:f'.*cannot import module 'no_such_pkg.mod'"):
    get_reward("no_such_pkg.mod:f")
  with pytest.raises(ValueError, match="'user_reward_fns:missing'.*no attribute 'missing'"):
    get_reward("user_reward_fns:missing")
  with pytest.raises(ValueError, match="not callable"):
    get_reward("user_reward_fns:RELEASE.is_set.__name__")
  with pytest.raises(ValueError, match="already registered"):
    register_reward("exact_numeric")(lambda c, e: 0.0)


def test_reward_config_validation():
  with pytest.raises(ValueError, match="unknown reward 'nope'"):
    RewardConfig((("nope", 1.0),))
  with pytest.raises(ValueError, match="isolation must be one of"):
    RewardConfig(isolation="docker")
  with pytest.raises(ValueError, match="weight"):
    RewardConfig((("format", float("nan")),))

  @register_reward("test_local")
  def local(completion, example):
    return 1.0

  with pytest.raises(ValueError, match="cannot be imported by the reward worker"):
    RewardConfig((("test_local", 1.0),))
  assert RewardConfig((("test_local", 1.0),), isolation="thread").isolation == "thread"


@pytest.fixture(scope="module")
def scorer():
  """One process-isolated scorer for the module: the worker boots once."""
  scorer = RewardScorer(RewardConfig((("exact_numeric", 1.0), ("test_flaky", 2.0)),
                                     timeout_s=1.0, isolation="process"))
  yield scorer
  scorer.close()


def test_process_scoring_matches_direct_calls(scorer):
  examples = list(ArithmeticTask(256, seed=0))
  completions = [ex.answer if i % 3 else "0" for i, ex in enumerate(examples)]
  rewards_N, stats = scorer.score(completions, examples)
  direct = np.asarray([get_reward("exact_numeric")(c, ex) + 1.0 for c, ex in zip(completions, examples)])
  assert rewards_N.dtype == np.float32 and rewards_N.shape == (256,)
  np.testing.assert_allclose(rewards_N, direct)
  assert stats["errors"] == stats["timeouts"] == stats["worker_restarts"] == 0
  assert stats["test_flaky/mean"] == 0.5
  assert stats["exact_numeric/mean"] == pytest.approx(np.mean([i % 3 != 0 for i in range(256)]))


def test_raise_and_hang_give_zero_and_are_counted_and_logged(scorer, caplog):
  examples = [NUM] * 6
  completions = ["81", "boom", "hang", "81", "nan", "80"]
  with caplog.at_level(logging.WARNING):
    rewards_N, stats = scorer.score(completions, examples)
  # exact_numeric still scores every item; test_flaky (weight 2, 0.5 when fine) fails on 3.
  np.testing.assert_allclose(rewards_N, [2.0, 0.0, 0.0, 2.0, 0.0, 1.0])
  assert stats["test_flaky/errors"] == 2 and stats["test_flaky/timeouts"] == 1
  assert stats["errors"] == 2 and stats["timeouts"] == 1 and stats["worker_restarts"] == 1
  assert stats["exact_numeric/errors"] == stats["exact_numeric/timeouts"] == 0
  logged = caplog.text
  assert "'test_flaky'" in logged and "RuntimeError: boom goes the reward" in logged
  assert "timeout" in logged
  # The restarted worker keeps serving.
  rewards_N, stats = scorer.score(["81", "80"], [NUM, NUM])
  np.testing.assert_allclose(rewards_N, [2.0, 1.0])
  assert stats["errors"] == stats["timeouts"] == 0


def test_worker_crash_is_an_error_not_a_crash(scorer):
  rewards_N, stats = scorer.score(["exit", "81"], [NUM, NUM])
  np.testing.assert_allclose(rewards_N, [0.0, 2.0])
  assert stats["test_flaky/errors"] == 1 and stats["worker_restarts"] == 1


def test_batch_timeout_zeroes_the_rest():
  scorer = RewardScorer(RewardConfig((("test_flaky", 1.0),), timeout_s=0.5, batch_timeout_s=0.7))
  try:
    rewards_N, stats = scorer.score(["81", "hang", "hang", "81", "81"], [NUM] * 5)
  finally:
    scorer.close()
  np.testing.assert_allclose(rewards_N, [0.5, 0.0, 0.0, 0.0, 0.0])
  assert stats["timeouts"] == 4 and stats["errors"] == 0


def test_user_reward_by_import_path_in_worker():
  examples = list(CountdownTask(16, seed=0))
  completions = [ex.meta["solution"] for ex in examples]
  rewards_N, stats = score(completions, examples, [("countdown", 1.0), ("user_reward_fns:length_bonus", 0.5)])
  expected = [1.0 + 0.125 * len(c) for c in completions]
  np.testing.assert_allclose(rewards_N, expected, rtol=1e-6)
  assert stats["countdown/mean"] == 1.0 and stats["errors"] == 0


def test_thread_isolation_survives_raise_and_hang(caplog):
  examples = [NUM] * 4
  try:
    with caplog.at_level(logging.WARNING):
      rewards_N, stats = score(["81", "spin", "81", "boom"], examples,
                               [("user_reward_fns:hang_until_released", 1.0), ("test_flaky", 1.0)],
                               timeout_s=0.5, isolation="thread")
  finally:
    user_reward_fns.RELEASE.set()  # let the abandoned thread finish
  np.testing.assert_allclose(rewards_N, [1.5, 0.5, 1.5, 1.0])
  assert stats["timeouts"] == 1 and stats["errors"] == 1 and stats["worker_restarts"] == 1
  assert "'user_reward_fns:hang_until_released'" in caplog.text


def test_no_isolation_still_catches_exceptions():
  rewards_N, stats = score(["boom", "81"], [NUM, NUM], [("test_flaky", 1.0)], isolation="none")
  np.testing.assert_allclose(rewards_N, [0.0, 0.5])
  assert stats["errors"] == 1


def test_score_checks_lengths(scorer):
  with pytest.raises(ValueError, match="2 completions but 1 examples"):
    scorer.score(["1", "2"], [NUM])
