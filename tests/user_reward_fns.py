"""Reward functions for tests/test_rewards.py, importable by the reward worker process.

Misbehaviour is keyed on the completion text so one batch mixes good and bad items.
"""

import os
import threading

from cispo_jax.rewards import register_reward

RELEASE = threading.Event()  # ends the thread-mode hang so no spinning thread outlives its test


def length_bonus(completion, example):
  """A user reward given by import path: 'user_reward_fns:length_bonus'."""
  return 0.25 * len(completion.strip())


@register_reward("test_flaky")
def flaky(completion, example):
  """Raises on 'boom', loops forever on 'hang', kills its process on 'exit', else 0.5."""
  if completion == "boom":
    raise RuntimeError("boom goes the reward")
  if completion == "hang":
    while True:
      pass
  if completion == "exit":
    os._exit(3)
  if completion == "nan":
    return float("nan")
  return 0.5


def hang_until_released(completion, example):
  """Spins on 'spin' until the test sets RELEASE (thread mode cannot kill a thread)."""
  if completion == "spin":
    while not RELEASE.is_set():
      pass
  return 1.0
