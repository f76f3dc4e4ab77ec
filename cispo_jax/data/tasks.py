"""Built-in synthetic tasks with verifiable answers: integer arithmetic and Countdown.

Both are deterministic functions of their arguments, so a run is reproducible from its
config. Prompts are short strings over ALPHABET so a character-level model of a few
million parameters can learn them on a CPU in minutes.

Held-out split: every problem has a canonical key whose stable hash puts it in "eval"
(hash < eval_fraction) or "train". The split is a partition of the problem space, so
for the same task arguments no eval problem can appear in train, whatever the seeds or
sizes; the two splits also draw from different random streams.
"""

from __future__ import annotations

import collections.abc
import hashlib
import inspect
import random
from typing import Callable, Sequence

from cispo_jax.data.example import Example
from cispo_jax.data.expr import evaluate

# Every character a built-in prompt, answer or reference solution can contain; the
# char tokenizer is built from it. The space is never generated, but models emit it
# and verifiers tolerate it, so it gets a token.
ALPHABET = "0123456789+-*/()=,: "

SPLITS = ("train", "eval")
_OPS = "+-*/"
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def split_of(key: str, eval_fraction: float) -> str:
  """'eval' or 'train' for a problem key, by a stable (not per-process salted) hash."""
  digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
  return "eval" if int.from_bytes(digest, "big") / 2.0**64 < eval_fraction else "train"


def holdout_split(examples: Sequence[Example], eval_fraction: float = 0.1) -> tuple[list[Example], list[Example]]:
  """(train, eval) for any example list (e.g. a JSONL file), partitioned by prompt hash."""
  _check_fraction(eval_fraction)
  train = [ex for ex in examples if split_of(ex.prompt, eval_fraction) == "train"]
  held = [ex for ex in examples if split_of(ex.prompt, eval_fraction) == "eval"]
  return train, held


def _check_fraction(eval_fraction: float) -> None:
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")


def _check_common(name: str, size: int, split: str, ops: str, eval_fraction: float) -> None:
  if size < 1:
    raise ValueError(f"{name}: size must be >= 1, got {size}")
  if split not in SPLITS:
    raise ValueError(f"{name}: split must be one of {SPLITS}, got {split!r}")
  if not ops or any(op not in _OPS for op in ops):
    raise ValueError(f"{name}: ops must be a non-empty string over {_OPS!r}, got {ops!r}")
  _check_fraction(eval_fraction)


def _sample_unique(name: str, draw: Callable[[random.Random], tuple[str, Example] | None],
                   size: int, seed: int, split: str, eval_fraction: float) -> list[Example]:
  """`size` distinct problems of `split`, by rejection; fails loudly if the space is too small."""
  rng = random.Random(f"{name}:{split}:{seed}")
  seen: set[str] = set()
  out: list[Example] = []
  max_draws = 50 * size + 1000
  for _ in range(max_draws):
    drawn = draw(rng)
    if drawn is None:
      continue
    key, example = drawn
    if key in seen or split_of(key, eval_fraction) != split:
      continue
    seen.add(key)
    out.append(example)
    if len(out) == size:
      return out
  raise ValueError(
      f"{name}: found only {len(out)} distinct {split!r} problems in {max_draws} draws, "
      f"size={size} is too large for these ranges; widen them or lower size")


class _Task(collections.abc.Sequence):
  """An indexable, immutable list of Examples (a prompt source for PromptStream)."""

  _examples: list[Example]

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index):
    return self._examples[index]


def addition_scratchpad(a: int, b: int) -> str:
  """Column addition written out, units first, then the answer: 47+38 -> "7+8=15,4+3+1=8:85"."""
  da, db = str(a)[::-1], str(b)[::-1]
  steps, carry = [], 0
  for i in range(max(len(da), len(db))):
    x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
    total = x + y + carry
    steps.append(f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}")
    carry = total // 10
  return ",".join(steps) + f":{a + b}"


class ArithmeticTask(_Task):
  """"23+58=" -> "81". `num_operands` integers in [min_operand, max_operand] joined by ops.

  Two-operand additions also carry meta["scratchpad"], the column-addition working
  ("3+8=11,2+5+1=8:81") that ends in the answer (see the `final_numeric` reward).
  `scratchpad_marker` (e.g. "(") opens every worked solution with a token no bare answer starts
  with: the fork between the two behaviours is then one token at the first position, which
  experiments/fork_probe.py measures (a warm start with few worked solutions rarely emits it).

  Usual precedence applies ("2+3*4=" -> "14"). Division is exact by construction: the
  divisor is drawn from the operand range and so is the quotient, so the dividend may
  exceed max_operand ("56/8=" -> "7"); it is only offered with two operands.
  """

  def __init__(self, size: int, seed: int = 0, split: str = "train", min_operand: int = 0,
               max_operand: int = 99, ops: str = "+-", num_operands: int = 2,
               eval_fraction: float = 0.1, scratchpad_marker: str = ""):
    _check_common("arithmetic", size, split, ops, eval_fraction)
    marker_ok = all(c in ALPHABET for c in scratchpad_marker) and scratchpad_marker[:1] not in tuple("0123456789-")
    if scratchpad_marker and not marker_ok:
      raise ValueError(f"arithmetic: scratchpad_marker={scratchpad_marker!r} must use characters of {ALPHABET!r} "
                       "and must not start like a bare answer (a digit or '-')")
    if not 0 <= min_operand <= max_operand:
      raise ValueError(f"arithmetic: need 0 <= min_operand <= max_operand, got {min_operand}, {max_operand}")
    if num_operands < 2:
      raise ValueError(f"arithmetic: num_operands must be >= 2, got {num_operands}")
    if "/" in ops and (num_operands != 2 or max_operand < 1):
      raise ValueError("arithmetic: '/' in ops needs num_operands=2 and max_operand >= 1")

    def draw(rng: random.Random):
      chosen = [rng.choice(ops) for _ in range(num_operands - 1)]
      operands = [rng.randint(min_operand, max_operand) for _ in range(num_operands)]
      if chosen == ["/"]:
        divisor = rng.randint(max(1, min_operand), max_operand)
        operands = [divisor * operands[0], divisor]
      text = str(operands[0]) + "".join(op + str(x) for op, x in zip(chosen, operands[1:]))
      prompt = text + "="
      answer = str(int(evaluate(text)))
      meta = {"task": "arithmetic"}
      if chosen == ["+"]:  # a worked solution, for warm starts that mix direct and step-by-step answers
        meta["scratchpad"] = scratchpad_marker + addition_scratchpad(*operands)
      return prompt, Example(prompt, answer, meta)

    self._examples = _sample_unique("arithmetic", draw, size, seed, split, eval_fraction)


def _combine(left: tuple[str, int, int], right: tuple[str, int, int], op: str):
  """Joins two (text, value, precedence) subexpressions with the fewest parentheses."""
  ltext, lval, lprec = left
  rtext, rval, rprec = right
  prec = _PREC[op]
  if lprec < prec:
    ltext = f"({ltext})"
  if rprec < prec or (rprec == prec and op in "-/"):
    rtext = f"({rtext})"
  value = {"+": lambda: lval + rval, "-": lambda: lval - rval,
           "*": lambda: lval * rval, "/": lambda: lval // rval}[op]()
  return f"{ltext}{op}{rtext}", value, prec


class CountdownTask(_Task):
  """"31:3,7,25=" -> an expression over the numbers that equals the target, e.g. "25+7-3".

  The prompt is "<target>:<numbers>=". A problem is built by combining all numbers in a
  random order with random ops, keeping every intermediate a positive integer, so it is
  solvable; meta["solution"] holds that expression. The verifier accepts any expression
  using each number at most once (check_countdown). Answer = the target as text.
  """

  def __init__(self, size: int, seed: int = 0, split: str = "train", num_numbers: int = 3,
               min_number: int = 1, max_number: int = 20, min_target: int = 1,
               max_target: int = 100, ops: str = "+-*/", eval_fraction: float = 0.1):
    _check_common("countdown", size, split, ops, eval_fraction)
    if num_numbers < 2:
      raise ValueError(f"countdown: num_numbers must be >= 2, got {num_numbers}")
    if not 1 <= min_number <= max_number:
      raise ValueError(f"countdown: need 1 <= min_number <= max_number, got {min_number}, {max_number}")
    if not 1 <= min_target <= max_target:
      raise ValueError(f"countdown: need 1 <= min_target <= max_target, got {min_target}, {max_target}")

    def draw(rng: random.Random):
      numbers = [rng.randint(min_number, max_number) for _ in range(num_numbers)]
      pool = [(str(n), n, _ATOM) for n in numbers]
      while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        a, b = pool[i], pool[j]
        op = rng.choice(ops)
        if op in "-/" and a[1] < b[1]:
          a, b = b, a
        if op == "-" and a[1] == b[1]:
          return None  # a zero intermediate makes the rest trivial
        if op == "/" and a[1] % b[1] != 0:
          return None
        pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [_combine(a, b, op)]
      solution, target, _ = pool[0]
      if not min_target <= target <= max_target or target in numbers:
        return None
      key = ",".join(map(str, sorted(numbers))) + f">{target}"
      prompt = f"{target}:{','.join(map(str, numbers))}="
      meta = {"task": "countdown", "numbers": numbers, "target": target, "solution": solution}
      return key, Example(prompt, str(target), meta)

    self._examples = _sample_unique("countdown", draw, size, seed, split, eval_fraction)


TASKS: dict[str, type[_Task]] = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}


def make_task(name: str, size: int, seed: int = 0, split: str = "train", **kwargs) -> _Task:
  """A built-in task by name; unknown names or arguments fail with the allowed values."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
  allowed = [p for p in inspect.signature(TASKS[name].__init__).parameters if p != "self"]
  for key in kwargs:
    if key not in allowed:
      raise ValueError(f"task {name!r} has no argument {key!r}; allowed: {allowed}")
  return TASKS[name](size=size, seed=seed, split=split, **kwargs)
