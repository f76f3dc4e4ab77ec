"""What a run trains on: the prompt sources (train / held-out) and the reward mix."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from cispo_jax import data as data_lib
from cispo_jax import rewards as reward_lib

# The reward each source is judged by when TaskConfig.rewards is left empty.
DEFAULT_REWARD = {"arithmetic": "final_numeric", "countdown": "countdown", "jsonl": "math_verify"}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  task: str = "arithmetic"  # a built-in task (data.TASKS) or "jsonl"
  task_args: dict = dataclasses.field(default_factory=dict)  # e.g. {"max_operand": 49}
  train_size: int = 10000  # built-in tasks: problems in the training split
  eval_size: int = 256  # built-in tasks: problems in the held-out split
  train_path: str = ""  # jsonl
  eval_path: str = ""  # jsonl; "" = hold out eval_fraction of train_path by prompt hash
  eval_fraction: float = 0.1
  prompt_key: str = "prompt"
  answer_key: str = "answer"
  # (name, weight) pairs from the reward registry, or "module:function"; () = the task's default.
  rewards: tuple = ()
  reward_timeout_s: float = 5.0

  def __post_init__(self):
    allowed = sorted(data_lib.TASKS) + ["jsonl"]
    if self.task not in allowed:
      raise ValueError(f"TaskConfig.task={self.task!r}; allowed: {allowed}")
    if self.task == "jsonl" and not self.train_path:
      raise ValueError("TaskConfig.train_path is required when TaskConfig.task='jsonl'")
    if not self.reward_timeout_s > 0:
      raise ValueError(f"TaskConfig.reward_timeout_s={self.reward_timeout_s}; must be > 0")
    for item in self.reward_list():
      if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
        raise ValueError(f"TaskConfig.rewards entry {item!r}; expected (name, weight)")

  def reward_list(self) -> list[tuple[str, float]]:
    if not self.rewards:
      return [(DEFAULT_REWARD[self.task], 1.0)]
    return [(str(n), float(w)) for n, w in self.rewards]


def make_sources(cfg: TaskConfig, seed: int) -> tuple[Sequence[data_lib.Example], list[data_lib.Example]]:
  """(train source, held-out examples); deterministic in (cfg, seed), disjoint by construction."""
  if cfg.task == "jsonl":
    train = data_lib.load_jsonl(cfg.train_path, cfg.prompt_key, cfg.answer_key)
    if cfg.eval_path:
      return train, data_lib.load_jsonl(cfg.eval_path, cfg.prompt_key, cfg.answer_key)
    return data_lib.holdout_split(train, cfg.eval_fraction)
  train = data_lib.make_task(cfg.task, cfg.train_size, seed=seed, split="train", **cfg.task_args)
  held = data_lib.make_task(cfg.task, cfg.eval_size, seed=seed, split="eval", **cfg.task_args)
  return train, list(held)


class Scorer:
  """Weighted reward mix for training; the first reward alone decides a pass in eval.

  One isolated worker process per mix, booted now so its start-up overlaps model loading.
  """

  def __init__(self, cfg: TaskConfig):
    mix = tuple(cfg.reward_list())
    self._train = reward_lib.RewardScorer(reward_lib.RewardConfig(mix, timeout_s=cfg.reward_timeout_s))
    self._pass = self._train if len(mix) == 1 else reward_lib.RewardScorer(
        reward_lib.RewardConfig(mix[:1], timeout_s=cfg.reward_timeout_s))
    self._scorers = [self._train] if self._pass is self._train else [self._train, self._pass]
    for scorer in self._scorers:
      scorer.start()

  def __call__(self, completions: list[str], examples: list[data_lib.Example]) -> tuple[np.ndarray, dict[str, Any]]:
    return self._train.score(completions, examples)

  def passed(self, completions: list[str], examples: list[data_lib.Example]) -> np.ndarray:
    scores, _ = self._pass.score(completions, examples)
    return scores >= 1.0

  def close(self):
    for scorer in self._scorers:
      scorer.close()
