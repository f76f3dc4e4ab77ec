"""Built-in verifiers for the synthetic tasks and for math answers.

Completion convention for the built-in tasks: the completion is the answer itself
("81", or "25+7-3" for countdown), ended by the tokenizer's EOS. Text after a newline
(STOP) is ignored by the answer checks, so a model that keeps going after a correct
answer is not punished there; the "format" reward is what asks for a clean stop.
"""

from __future__ import annotations

import fractions
import re
import threading

from cispo_jax.data.example import Example
from cispo_jax.data.expr import ExprError, check_countdown, parse_expression
from cispo_jax.rewards.registry import register_reward

STOP = "\n"
_FIRST_NUMBER_RE = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def answer_text(completion: str) -> str:
  """The part of the completion the answer checks read: up to the first STOP."""
  return completion.split(STOP, 1)[0]


def _as_number(text: str) -> fractions.Fraction:
  try:
    return fractions.Fraction(text.strip())
  except (ValueError, ZeroDivisionError):
    raise ValueError(f"answer {text!r} is not a number") from None


@register_reward("exact_numeric")
def exact_numeric(completion: str, example: Example) -> float:
  """1.0 iff the first number before STOP equals the answer exactly ("81" == " 81.0")."""
  match = _FIRST_NUMBER_RE.search(answer_text(completion))
  if match is None:
    return 0.0
  return float(_as_number(match.group()) == _as_number(example.answer))


@register_reward("final_numeric")
def final_numeric(completion: str, example: Example) -> float:
  """1.0 iff the last number before STOP equals the answer: a worked solution
  ("7+8=15,4+3+1=8:85") is judged by the result it ends with, a bare answer ("85") as is."""
  matches = _FIRST_NUMBER_RE.findall(answer_text(completion))
  if not matches:
    return 0.0
  return float(_as_number(matches[-1]) == _as_number(example.answer))


@register_reward("countdown")
def countdown(completion: str, example: Example) -> float:
  """1.0 iff the text before STOP (and before any '=') is an expression that uses the
  example's numbers at most once each and equals its target."""
  try:
    numbers, target = example.meta["numbers"], example.meta["target"]
  except KeyError:
    raise ValueError("countdown reward needs meta['numbers'] and meta['target'] "
                     "(a CountdownTask example)") from None
  expression = answer_text(completion).split("=", 1)[0]
  return float(check_countdown(expression, numbers, int(target)))


@register_reward("math_verify")
def math_verify(completion: str, example: Example) -> float:
  """1.0 iff math-verify finds the completion's answer equivalent to the gold answer.

  math-verify's own timeouts use SIGALRM, which only the main thread may set; the
  process-isolated worker runs rewards there, and elsewhere its timeouts are switched
  off (the caller's isolation then bounds the time).
  """
  from math_verify import parse, verify  # sympy is slow to import: only when used

  limit = 5 if threading.current_thread() is threading.main_thread() else None
  gold = parse(example.answer, parsing_timeout=limit) or parse(f"${example.answer}$", parsing_timeout=limit)
  if not gold:
    raise ValueError(f"math_verify: cannot parse the gold answer {example.answer!r}")
  pred = parse(completion, parsing_timeout=limit)
  return float(bool(pred) and verify(gold, pred, timeout_seconds=limit))


def _warm_math_verify() -> None:
  import math_verify  # noqa: F401  (so the first scored batch does not pay for sympy)


math_verify.warmup = _warm_math_verify


@register_reward("format")
def format_reward(completion: str, example: Example) -> float:
  """1.0 iff the whole completion (surrounding whitespace aside) is a well-formed answer:
  an expression for countdown, a single number when the answer is numeric, otherwise
  any non-empty single line. Meant as a small shaping term (weight ~0.1)."""
  text = completion.strip()
  if example.meta.get("task") == "countdown":
    try:
      parse_expression(text)
      return 1.0
    except ExprError:
      return 0.0
  if _NUMBER_RE.fullmatch(example.answer.strip()):
    return float(_NUMBER_RE.fullmatch(text) is not None)
  return float(bool(text) and STOP not in text)
