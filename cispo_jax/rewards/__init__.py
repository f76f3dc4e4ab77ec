"""Rewards: a registry of verifiers and isolated, timed-out batch scoring."""

from cispo_jax.rewards.registry import (RewardFn, get_reward, importable_ref, register_reward,
                                        registered_rewards)
from cispo_jax.rewards import builtin, math_answer  # noqa: F401  (registers the built-in rewards)
from cispo_jax.rewards.builtin import STOP, answer_text
from cispo_jax.rewards.scoring import ISOLATIONS, RewardConfig, RewardScorer, score

__all__ = [
    "ISOLATIONS", "RewardConfig", "RewardFn", "RewardScorer", "STOP", "answer_text", "get_reward",
    "importable_ref", "register_reward", "registered_rewards", "score",
]
