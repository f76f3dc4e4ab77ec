"""Rewards for tests/test_evaluate.py, importable by the reward worker: decided by the completion's
text alone, so a random tiny model passes some and fails others."""


def first_lower(completion, example):
  """1.0 iff the completion starts with a lowercase letter."""
  return float(completion[:1].islower())


def has_digit(completion, example):
  """The format check of first_lower: 0.0 (a format error) when the completion holds no digit."""
  return float(any(c.isdigit() for c in completion))


first_lower.format_reward = "eval_reward_fns:has_digit"
