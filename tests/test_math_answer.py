"""Math answers: extraction on the fixture cases, equivalence, format errors, and unbiased pass@k."""

import itertools
import json
import math
import os

import numpy as np
import pytest

from cispo_jax.data import Example
from cispo_jax.evals.passk import mean_pass_at_k, pass_at_k
from cispo_jax.rewards import RewardConfig, RewardScorer, get_reward, math_answer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "math_answers.jsonl")
CASES = [json.loads(line) for line in open(FIXTURE, encoding="utf-8") if line.strip()]


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_fixture_case(case):
  extracted, fmt = math_answer.extract_answer(case["completion"])
  assert (extracted, fmt) == (case["extracted"], case["format"])
  example = Example("q", case["gold"])
  reward = get_reward(case.get("reward", "math_answer"))(case["completion"], example)
  format_ok = get_reward("math_format")(case["completion"], example)
  expect = case["expect"]
  assert format_ok == (0.0 if expect == "format_error" else 1.0)
  assert reward == (1.0 if expect == "correct" else 0.0)


def test_fixture_covers_every_format_and_outcome():
  assert {c["format"] for c in CASES} == {"boxed", "gsm8k", "answer_is", "none"}
  assert {c["expect"] for c in CASES} == {"correct", "wrong", "format_error"}


def test_deeply_nested_boxed():
  text = r"\boxed{\frac{\frac{1}{\sqrt{\frac{4}{1}}}}{1}} and \boxed{3" + "{" * 50
  assert math_answer.last_boxed(text) == r"\frac{\frac{1}{\sqrt{\frac{4}{1}}}}{1}"
  assert math_answer.score(text, "0.5") == 1.0


def test_scored_in_the_isolated_worker_with_format_errors_apart():
  """The registered rewards run in the reward worker like any other (math-verify's SIGALRM timeouts
  are live there): format errors and wrong answers are told apart by math_format."""
  completions = [r"\boxed{\frac{1}{2}}", "#### 3", "no answer here"]
  examples = [Example("q", "0.5"), Example("q", "4"), Example("q", "1")]
  with_pass = RewardScorer(RewardConfig((("math_answer", 1.0),), timeout_s=30.0))
  with_format = RewardScorer(RewardConfig((("math_format", 1.0),), timeout_s=30.0))
  try:
    passed, stats = with_pass.score(completions, examples)
    formatted, _ = with_format.score(completions, examples)
  finally:
    with_pass.close()
    with_format.close()
  assert passed.tolist() == [1.0, 0.0, 0.0] and stats["errors"] == 0
  assert formatted.tolist() == [1.0, 1.0, 0.0]
  assert get_reward("math_answer").format_reward == "math_format"


def _brute_force(n, c, k):
  """The probability that a uniformly drawn k-subset of n samples (c passing) holds a pass."""
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow():
  n, c, k = 2000, 3, 1000
  exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # exact integers, then one division
  assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
  assert pass_at_k(n, 1, 1) == pytest.approx(1 / n)
  assert mean_pass_at_k(4, np.array([0, 4, 2]), 2) == pytest.approx((0 + 1 + (1 - 1 / 6)) / 3)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_refuses_bad_arguments(n, c, k):
  with pytest.raises(ValueError, match="pass_at_k"):
    pass_at_k(n, c, k)
