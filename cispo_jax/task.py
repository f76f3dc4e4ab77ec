"""What a run trains on: the prompt sources (train / held-out) and the reward mix."""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from typing import Any, Sequence

import numpy as np

from cispo_jax import data as data_lib
from cispo_jax import rewards as reward_lib
from cispo_jax.data import chat, hf_data

# The reward each source is judged by when TaskConfig.rewards is left empty.
DEFAULT_REWARD = {"arithmetic": "final_numeric", "countdown": "countdown", "jsonl": "math_verify",
                  "dataset": "math_answer"}
HELDOUT = "heldout"  # the name evaluation gives the held-out split
# How rewards are run and their failures treated: they do not shape the bootstrap model, so its key leaves them out.
REWARD_FIELDS = ("rewards", "reward_timeout_s", "reward_batch_timeout_s", "reward_workers", "on_reward_error")
ON_REWARD_ERROR = ("mask", "zero")
# Fields added after bootstrap models were first keyed on this config: left out of that key at their defaults.
LATER_FIELDS = ("messages_key", "extra_keys", "prompt_format", "prompt_template", "system_prompt", "few_shot",
                "eval_sets", "eval_samples", "eval_k", "eval_batch_size")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  task: str = "arithmetic"  # a built-in task (data.TASKS), "jsonl", or "dataset" (local files via HF datasets)
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
  reward_timeout_s: float = 5.0  # per (item, reward) evaluation
  reward_batch_timeout_s: float | None = 120.0  # per scored batch (what is left counts as timed out); None = unbounded
  reward_workers: int = 0  # isolated worker processes a batch is split over; 0 = by cores (rewards/scoring.py)
  # A row whose reward failed (timeout, exception, crashed worker, non-finite value): "mask" = out of the update
  # and out of its group's statistics (rl/advantages.py); "zero" = scored 0 like a wrong answer (the old way).
  on_reward_error: str = "mask"
  # A prompt too long for the run (the largest prompt bucket, or the model's
  # max_position_embeddings less max_new_tokens), found when the data is loaded:
  # "drop" = leave it out, counted and logged; "refuse" = fail naming its file:line.
  too_long: str = "drop"
  # task="dataset" reads train_path / eval_path with Hugging Face `datasets`, offline (data/hf_data.py):
  # parquet, json / jsonl, csv, arrow, or a save_to_disk directory ("dir::split" for a DatasetDict).
  messages_key: str = ""  # a column holding the chat to continue ([{role, content}, ...]) instead of prompt_key
  extra_keys: tuple[str, ...] | None = None  # columns passed to the rewards in Example.meta; None = all others
  # How a prompt becomes the model's input (data/chat.py): "raw" text for base models, or "chat": the
  # tokenizer's chat template with the generation prompt. (RolloutConfig.apply_chat_template is the older
  # one-user-turn switch; the two are not combined.)
  prompt_format: str = "raw"
  prompt_template: str = "{prompt}"  # str.format with {prompt} and the example's meta fields
  system_prompt: str = ""
  few_shot: tuple[tuple[str, str], ...] = ()  # (question, answer) pairs shown before each prompt
  # Evaluation (evals/evaluator.py): in training every EvalConfig.eval_every, and `python -m cispo_jax.evaluate`.
  eval_sets: dict[str, str] = dataclasses.field(default_factory=dict)  # more held-out sets: name -> path
  eval_samples: int = 0  # completions sampled per eval prompt for pass@k; 0 = greedy pass@1 only
  eval_k: tuple[int, ...] = ()  # the k of sampled pass@k, each <= eval_samples; () = (1, eval_samples)
  eval_batch_size: int = 0  # prompts per generation call in eval; 0 = a whole set at once

  def __post_init__(self):
    allowed = sorted(data_lib.TASKS) + ["jsonl", "dataset"]
    if self.task not in allowed:
      raise ValueError(f"TaskConfig.task={self.task!r}; allowed: {allowed}")
    if self.task in ("jsonl", "dataset") and not self.train_path:
      raise ValueError(f"TaskConfig.train_path is required when TaskConfig.task={self.task!r}")
    if self.task != "dataset" and (self.messages_key or self.extra_keys is not None):
      raise ValueError(f"TaskConfig.messages_key / extra_keys map dataset columns: they need "
                       f"TaskConfig.task='dataset', not {self.task!r}")
    self.prompt_renderer()  # checks prompt_format, prompt_template and few_shot
    if self.eval_samples < 0 or self.eval_batch_size < 0:
      raise ValueError(f"TaskConfig.eval_samples={self.eval_samples} and eval_batch_size={self.eval_batch_size} "
                       "must be >= 0")
    for k in self.eval_k:
      if not 1 <= k <= self.eval_samples:
        raise ValueError(f"TaskConfig.eval_k={self.eval_k}: each k must be in [1, TaskConfig.eval_samples="
                         f"{self.eval_samples}] (pass@k needs k <= n samples)")
    for name, path in self.eval_sets.items():
      if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name == HELDOUT:
        raise ValueError(f"TaskConfig.eval_sets name {name!r}: use letters, digits, '_', '.', '-' (it names "
                         f"metrics), and not {HELDOUT!r} (the held-out split's)")
      if not path:
        raise ValueError(f"TaskConfig.eval_sets[{name!r}] is empty; give a local file or directory")
    if self.too_long not in data_lib.TOO_LONG_POLICIES:
      raise ValueError(f"TaskConfig.too_long={self.too_long!r}; allowed: {list(data_lib.TOO_LONG_POLICIES)}")
    if not self.reward_timeout_s > 0:
      raise ValueError(f"TaskConfig.reward_timeout_s={self.reward_timeout_s}; must be > 0")
    if self.reward_batch_timeout_s is not None and not self.reward_batch_timeout_s > 0:
      raise ValueError(f"TaskConfig.reward_batch_timeout_s={self.reward_batch_timeout_s}; must be > 0 or None")
    if not isinstance(self.reward_workers, int) or isinstance(self.reward_workers, bool) or self.reward_workers < 0:
      raise ValueError(f"TaskConfig.reward_workers={self.reward_workers!r}; must be an int >= 0 (0 = by cores)")
    if self.on_reward_error not in ON_REWARD_ERROR:
      raise ValueError(f"TaskConfig.on_reward_error={self.on_reward_error!r}; allowed: {list(ON_REWARD_ERROR)}")
    for item in self.reward_list():
      if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
        raise ValueError(f"TaskConfig.rewards entry {item!r}; expected (name, weight)")

  def prompt_renderer(self) -> chat.PromptFormat:
    return chat.PromptFormat(self.prompt_format, self.prompt_template, self.system_prompt,
                             tuple(tuple(x) for x in self.few_shot))

  def pass_k(self) -> tuple[int, ...]:
    """The k of sampled pass@k (none when eval_samples is 0)."""
    if not self.eval_samples:
      return ()
    return tuple(sorted(set(self.eval_k or (1, self.eval_samples))))

  def load(self, path: str) -> list[data_lib.Example]:
    """The examples of a jsonl or dataset path, by this config's column mapping."""
    if self.task == "jsonl":
      return data_lib.load_jsonl(path, self.prompt_key, self.answer_key)
    return hf_data.load_examples(path, prompt_key=self.prompt_key, answer_key=self.answer_key,
                                 messages_key=self.messages_key, extra_keys=self.extra_keys)

  def reward_list(self) -> list[tuple[str, float]]:
    if not self.rewards:
      return [(DEFAULT_REWARD[self.task], 1.0)]
    return [(str(n), float(w)) for n, w in self.rewards]

  def source_names(self) -> tuple[str, str]:
    """How messages name the (train, held-out) sources."""
    if self.task in ("jsonl", "dataset"):
      return self.train_path, self.eval_path or f"{self.train_path} (held-out split)"
    return f"{self.task} train split", f"{self.task} eval split"

  def check_sources(self, train: Sequence[data_lib.Example], held: Sequence[data_lib.Example], tokenizer,
                    model_cfg, *, max_new_tokens: int, prompt_buckets: Sequence[int],
                    apply_chat_template: bool = False, process_count: int | None = None,
                    ) -> tuple[Sequence[data_lib.Example], list[data_lib.Example]]:
    """(train, held) of make_sources rendered (prompt_format) and checked before anything is compiled.

    A prompt may have at most min(largest of `prompt_buckets`, model_cfg.max_position_embeddings
    - max_new_tokens) tokens, counted as the sampler encodes it (`apply_chat_template` included);
    longer ones are dropped or refused by `too_long` (data.check_prompts). A token id outside
    model_cfg.vocab_size is always an error naming the line. Held-out examples must number at
    least `process_count` (default jax.process_count(): each process evaluates its share).
    Every source is a finite list (built-in tasks are materialised), so all of it is checked.
    """
    names = self.source_names()
    checked = [self._prepare(src, name, tokenizer, model_cfg, max_new_tokens, prompt_buckets, apply_chat_template)
               for src, name in zip((train, held), names)]
    train, held = checked[0], list(checked[1])
    if process_count is None:
      import jax  # here: the data layer itself needs no jax

      process_count = jax.process_count()
    if len(held) < max(1, process_count):
      raise ValueError(f"{names[1]}: {len(held)} held-out examples; evaluation needs at least "
                       f"{max(1, process_count)} (one per process)")
    return train, held

  def eval_sources(self, tokenizer, model_cfg, *, max_new_tokens: int, prompt_buckets: Sequence[int],
                   apply_chat_template: bool = False) -> dict[str, list[data_lib.Example]]:
    """TaskConfig.eval_sets, each read like train_path, rendered and checked like the held-out split."""
    return {name: list(self._prepare(self.load(path), path, tokenizer, model_cfg, max_new_tokens, prompt_buckets,
                                     apply_chat_template))
            for name, path in self.eval_sets.items()}

  def _prepare(self, src, name, tokenizer, model_cfg, max_new_tokens, prompt_buckets, apply_chat_template):
    """One source rendered by the prompt format, then checked against the run's prompt limit."""
    fmt = self.prompt_renderer()
    if apply_chat_template and not fmt.identity:
      raise ValueError(f"RolloutConfig.apply_chat_template=True wraps each prompt as a user turn, and TaskConfig."
                       f"prompt_format={fmt.kind!r} renders prompts itself; use prompt_format='chat' alone")
    src = chat.render_source(src, fmt, tokenizer, name)
    largest, max_pos = max(prompt_buckets), model_cfg.max_position_embeddings
    room = max_pos - max_new_tokens
    if room < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt: the model's "
                       f"max_position_embeddings is {max_pos}")
    if room < largest:
      limit, reason = room, f"the model's max_position_embeddings={max_pos} less max_new_tokens={max_new_tokens}"
    else:
      limit, reason = largest, f"the largest prompt bucket of prompt_buckets={tuple(prompt_buckets)}"
    return data_lib.check_prompts(src, tokenizer, max_prompt_tokens=limit, policy=self.too_long, source=name,
                                  vocab_size=model_cfg.vocab_size, apply_chat_template=apply_chat_template,
                                  limit_reason=reason)


# The held-out sample of a built-in task is drawn with this seed whatever the run's seed: runs over
# seeds (experiments/sweep.py) then differ in training randomness, not in the problems they are
# scored on, so their spread and the gaps between arms are not inflated by eval sampling.
EVAL_SEED = 0


def make_sources(cfg: TaskConfig, seed: int) -> tuple[Sequence[data_lib.Example], list[data_lib.Example]]:
  """(train source, held-out examples); the train split deterministic in (cfg, seed), the held-out one
  in cfg alone (EVAL_SEED); disjoint by construction."""
  if cfg.task in ("jsonl", "dataset"):
    examples = cfg.load(cfg.train_path)
    if cfg.eval_path:
      return examples, cfg.load(cfg.eval_path)
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
  """Weighted reward mix for training; the first reward alone decides a pass in eval, and the format
  check it names (its `format_reward` attribute, e.g. math_answer's math_format) tells format errors.

  TaskConfig.reward_workers isolated worker processes per mix (each scorer's own), booted now so their
  start-up overlaps model loading; the per-item and per-batch timeouts are TaskConfig's. Thread-safe:
  a pipelined run's rollout thread scores while eval may score on the trainer's thread, and a worker
  answers one request at a time.
  """

  def __init__(self, cfg: TaskConfig):
    self._lock = threading.Lock()
    mix = tuple(cfg.reward_list())
    make = lambda rewards: reward_lib.RewardScorer(reward_lib.RewardConfig(  # noqa: E731
        rewards, timeout_s=cfg.reward_timeout_s, batch_timeout_s=cfg.reward_batch_timeout_s,
        workers=cfg.reward_workers))
    self._train = make(mix)
    self._pass = self._train if len(mix) == 1 else make(mix[:1])
    self._scorers = [self._train] if self._pass is self._train else [self._train, self._pass]
    format_reward = getattr(reward_lib.get_reward(mix[0][0]), "format_reward", None)
    self._format = make(((format_reward, 1.0),)) if format_reward else None
    self._scorers += [self._format] if self._format is not None else []
    for scorer in self._scorers:
      scorer.start()

  def __call__(self, completions: list[str], examples: list[data_lib.Example]) -> tuple[np.ndarray, dict[str, Any]]:
    """(rewards, stats) of the training mix; stats["valid"]: the rows none of whose rewards failed."""
    with self._lock:
      return self._train.score(completions, examples)

  def passed(self, completions: list[str], examples: list[data_lib.Example]) -> np.ndarray:
    with self._lock:
      scores, _ = self._pass.score(completions, examples)
    return scores >= 1.0

  @property
  def checks_format(self) -> bool:
    return self._format is not None

  def format_ok(self, completions: list[str], examples: list[data_lib.Example]) -> np.ndarray | None:
    """Whether each completion has the answer format (None: the pass reward names no format check)."""
    if self._format is None:
      return None
    with self._lock:
      scores, _ = self._format.score(completions, examples)
    return scores >= 1.0

  def close(self):
    for scorer in self._scorers:
      scorer.close()
