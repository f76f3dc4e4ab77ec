"""What a run trains on: the prompt sources (train / held-out) and the reward mix."""

from __future__ import annotations

import dataclasses
import math
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
  # A prompt too long for the run (the largest prompt bucket, or the model's
  # max_position_embeddings less max_new_tokens), found when the data is loaded:
  # "drop" = leave it out, counted and logged; "refuse" = fail naming its file:line.
  too_long: str = "drop"

  def __post_init__(self):
    allowed = sorted(data_lib.TASKS) + ["jsonl"]
    if self.task not in allowed:
      raise ValueError(f"TaskConfig.task={self.task!r}; allowed: {allowed}")
    if self.task == "jsonl" and not self.train_path:
      raise ValueError("TaskConfig.train_path is required when TaskConfig.task='jsonl'")
    if self.too_long not in data_lib.TOO_LONG_POLICIES:
      raise ValueError(f"TaskConfig.too_long={self.too_long!r}; allowed: {list(data_lib.TOO_LONG_POLICIES)}")
    if not self.reward_timeout_s > 0:
      raise ValueError(f"TaskConfig.reward_timeout_s={self.reward_timeout_s}; must be > 0")
    for item in self.reward_list():
      if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
        raise ValueError(f"TaskConfig.rewards entry {item!r}; expected (name, weight)")

  def reward_list(self) -> list[tuple[str, float]]:
    if not self.rewards:
      return [(DEFAULT_REWARD[self.task], 1.0)]
    return [(str(n), float(w)) for n, w in self.rewards]

  def source_names(self) -> tuple[str, str]:
    """How messages name the (train, held-out) sources."""
    if self.task == "jsonl":
      return self.train_path, self.eval_path or f"{self.train_path} (held-out split)"
    return f"{self.task} train split", f"{self.task} eval split"

  def check_sources(self, train: Sequence[data_lib.Example], held: Sequence[data_lib.Example], tokenizer,
                    model_cfg, *, max_new_tokens: int, prompt_buckets: Sequence[int],
                    apply_chat_template: bool = False, process_count: int | None = None,
                    ) -> tuple[Sequence[data_lib.Example], list[data_lib.Example]]:
    """(train, held) of make_sources with every prompt checked before anything is compiled.

    A prompt may have at most min(largest of `prompt_buckets`, model_cfg.max_position_embeddings
    - max_new_tokens) tokens, counted as the sampler encodes it (`apply_chat_template` included);
    longer ones are dropped or refused by `too_long` (data.check_prompts). A token id outside
    model_cfg.vocab_size is always an error naming the line. Held-out examples must number at
    least `process_count` (default jax.process_count(): each process evaluates its share).
    Every source is a finite list (built-in tasks are materialised), so all of it is checked.
    """
    largest, max_pos = max(prompt_buckets), model_cfg.max_position_embeddings
    room = max_pos - max_new_tokens
    if room < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt: the model's "
                       f"max_position_embeddings is {max_pos}")
    if room < largest:
      limit, reason = room, f"the model's max_position_embeddings={max_pos} less max_new_tokens={max_new_tokens}"
    else:
      limit, reason = largest, f"the largest prompt bucket of prompt_buckets={tuple(prompt_buckets)}"
    names = self.source_names()
    checked = [data_lib.check_prompts(src, tokenizer, max_prompt_tokens=limit, policy=self.too_long, source=name,
                                      vocab_size=model_cfg.vocab_size, apply_chat_template=apply_chat_template,
                                      limit_reason=reason)
               for src, name in zip((train, held), names)]
    train, held = checked[0], list(checked[1])
    if process_count is None:
      import jax  # here: the data layer itself needs no jax

      process_count = jax.process_count()
    if len(held) < max(1, process_count):
      raise ValueError(f"{names[1]}: {len(held)} held-out examples; evaluation needs at least "
                       f"{max(1, process_count)} (one per process)")
    return train, held


# The held-out sample of a built-in task is drawn with this seed whatever the run's seed: runs over
# seeds (experiments/sweep.py) then differ in training randomness, not in the problems they are
# scored on, so their spread and the gaps between arms are not inflated by eval sampling.
EVAL_SEED = 0


def make_sources(cfg: TaskConfig, seed: int) -> tuple[Sequence[data_lib.Example], list[data_lib.Example]]:
  """(train source, held-out examples); the train split deterministic in (cfg, seed), the held-out one
  in cfg alone (EVAL_SEED); disjoint by construction."""
  if cfg.task == "jsonl":
    examples = data_lib.load_jsonl(cfg.train_path, cfg.prompt_key, cfg.answer_key)
    if cfg.eval_path:
      return examples, data_lib.load_jsonl(cfg.eval_path, cfg.prompt_key, cfg.answer_key)
    train, held = data_lib.holdout_split(examples, cfg.eval_fraction)
    if not train or not held:
      f = cfg.eval_fraction
      raise ValueError(
          f"{cfg.train_path}: {len(examples)} examples; the held-out split by prompt hash "
          f"(TaskConfig.eval_fraction={f}) put {len(train)} in train and {len(held)} in eval, and each "
          f"needs at least 1 (at eval_fraction={f}, about {max(2, math.ceil(1 / min(f, 1 - f)))} examples "
          "or more are needed): add examples, change TaskConfig.eval_fraction, or give TaskConfig.eval_path")
    return train, held
  train = data_lib.make_task(cfg.task, cfg.train_size, seed=seed, split="train", **cfg.task_args)
  held = data_lib.make_task(cfg.task, cfg.eval_size, seed=EVAL_SEED, split="eval", **cfg.task_args)
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
