"""Prompt sources: synthetic verifiable tasks, JSONL files, and a resumable batch stream."""

from cispo_jax.data.example import Example, reference_completion
from cispo_jax.data.expr import ExprError, check_countdown, evaluate, parse_expression
from cispo_jax.data.jsonl import load_jsonl
from cispo_jax.data.prompts import TOO_LONG_POLICIES, check_prompts, tokenize_prompts
from cispo_jax.data.stream import PromptStream
from cispo_jax.data.tasks import (ALPHABET, TASKS, ArithmeticTask, CountdownTask, holdout_split,
                                  make_task, split_of)

__all__ = [
    "ALPHABET", "ArithmeticTask", "CountdownTask", "Example", "ExprError", "PromptStream",
    "TASKS", "TOO_LONG_POLICIES", "check_countdown", "check_prompts", "evaluate", "holdout_split",
    "load_jsonl", "make_task", "parse_expression", "reference_completion", "split_of", "tokenize_prompts",
]
