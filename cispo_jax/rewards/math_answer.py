"""Math answers: extraction in the formats the common sets use, and equivalence via math-verify.

Extraction (`extract_answer`) looks, in this order, for the last `\\boxed{...}` / `\\fbox{...}`
(braces nested to any depth), GSM8K's `#### 42` line, and "the (final) answer is ...". Text
with none of these is a *format error*, which `math_format` reports apart from a wrong answer.
The gold answer goes through the same extraction (GSM8K's answer column is a whole solution
ending in `#### 72`) and is used as is when nothing is found.

Comparison (`answers_match`): equal normalised strings or equal exact numbers ("1,234" ==
"1234.0") decide without sympy; otherwise math-verify parses both sides as LaTeX and checks
them for symbolic / numeric equivalence (1/2 == 0.5 == \\dfrac12), with its own timeouts.
Those use SIGALRM, which only the main thread may set: the reward worker runs rewards there;
elsewhere they are off and the scorer's timeout (RewardConfig.timeout_s) bounds the time.

Units: `math_answer` strips a trailing unit after a number ("18 dollars", "5 cm", "\\text{ km}",
"\\$18", "25%") on both sides before comparing; `math_answer_strict` does not. A reward with
other units is two lines in your module:
  def my_reward(completion, example):
    return math_answer.score(completion, example.answer, units=("parsecs", "ly"))
"""

from __future__ import annotations

import fractions
import re
import threading

from cispo_jax.data.example import Example
from cispo_jax.rewards.registry import register_reward

MAX_CHARS = 20_000  # longer completions are searched in their last MAX_CHARS characters only
DEFAULT_UNITS = (
    "dollars", "dollar", "cents", "cent", "percent", "%", "degrees", "degree", "°", "meters", "meter",
    "metres", "metre", "cm", "mm", "km", "m", "kg", "grams", "gram", "g", "pounds", "pound", "lbs", "lb",
    "ounces", "oz", "liters", "liter", "litres", "ml", "l", "hours", "hour", "hrs", "h", "minutes",
    "minute", "mins", "min", "seconds", "second", "sec", "s", "days", "day", "weeks", "week", "months",
    "month", "years", "year", "miles", "mile", "mph", "feet", "foot", "ft", "inches", "inch", "in",
    "yards", "yard", "units", "unit", "square units", "sq units", "people", "students", "items",
)

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K_RE = re.compile(r"####\s*([^\n]*\S)")
_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}) whose braces close; None if there is none."""
  for match in reversed(list(_BOXED_RE.finditer(text))):
    depth, start = 1, match.end()
    for i in range(start, len(text)):
      ch = text[i]
      if ch == "{" and text[i - 1] != "\\":
        depth += 1
      elif ch == "}" and text[i - 1] != "\\":
        depth -= 1
        if depth == 0:
          return text[start:i].strip()
  return None


def _answer_like(text: str | None) -> bool:
  """A letter, digit or LaTeX command: "####" followed by more #s, or "\\boxed{.}", answers nothing."""
  return bool(text) and re.search(r"[0-9A-Za-z\\]", text) is not None


def extract_answer(text: str) -> tuple[str | None, str]:
  """(answer text, format) with format "boxed" | "gsm8k" | "answer_is"; (None, "none") if none is found."""
  text = text[-MAX_CHARS:]
  boxed = last_boxed(text)
  if _answer_like(boxed):
    return boxed, "boxed"
  hashes = [h for h in _GSM8K_RE.findall(text) if _answer_like(h.strip("# "))]
  if hashes:
    return hashes[-1].strip("# "), "gsm8k"
  said = _ANSWER_IS_RE.findall(text)
  if said:
    answer = said[-1].strip()
    # "The answer is 42. So we are done": the sentence ends at a period followed by a space.
    answer = re.split(r"\.\s", answer, maxsplit=1)[0].strip().rstrip(".").strip()
    answer = last_boxed(answer) or answer.strip("$ ").strip()
    if _answer_like(answer):
      return answer, "answer_is"
  return None, "none"


def normalize(answer: str, units: tuple[str, ...] = DEFAULT_UNITS) -> str:
  """Whitespace, $ delimiters, a trailing period, thousands commas and (with `units`) a unit dropped."""
  s = answer.strip().strip("$").strip().rstrip(".").strip()
  s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", " ").replace("\\left", "").replace("\\right", "")
  if units:
    s = re.sub(r"^\\\$\s*|^\$\s*", "", s)  # a currency sign before the number
    s = _TEXT_RE.sub(lambda m: " " + m.group(1) + " ", s).strip()
    number = _NUMBER_RE.match(s)
    if number:
      rest = s[number.end():].strip().rstrip(".").strip()
      rest = rest.replace("\\%", "%").strip()
      if rest.lower() in units:
        s = number.group()
    s = re.sub(r"\^\s*\{?\\circ\}?$", "", s).strip()  # 90^\circ
  if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
    s = s.replace(",", "")
  return s


def _exact_number(s: str) -> fractions.Fraction | None:
  try:
    return fractions.Fraction(s) if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?", s) else None
  except (ValueError, ZeroDivisionError):
    return None


def _extraction_config(strip_units: bool):
  from math_verify import ExprExtractionConfig, LatexExtractionConfig
  from math_verify.parser import NormalizationConfig

  norm = NormalizationConfig(basic_latex=True, units=strip_units, malformed_operators=True, nits=True,
                             boxed="all", equations=False)
  return [LatexExtractionConfig(normalization_config=norm), ExprExtractionConfig()]


def answers_match(gold: str, pred: str, timeout_s: int | None = 5, strip_units: bool = True) -> bool:
  """Whether two (normalised) answers are equal: by string or exact number first, then math-verify
  (which drops \\text{} units itself unless strip_units=False)."""
  if gold == pred:
    return True
  a, b = _exact_number(gold), _exact_number(pred)
  if a is not None and b is not None:
    return a == b
  from math_verify import parse, verify  # sympy is slow to import: only when needed

  if threading.current_thread() is not threading.main_thread():
    timeout_s = None  # SIGALRM cannot be set here; the caller's isolation bounds the time
  config, parsed = _extraction_config(strip_units), []
  for s in (gold, pred):
    p = (parse(f"${s}$", extraction_config=config, parsing_timeout=timeout_s)
         or parse(s, extraction_config=config, parsing_timeout=timeout_s))
    if not p:
      return False
    parsed.append(p)
  return bool(verify(parsed[0], parsed[1], timeout_seconds=timeout_s))


def gold_answer(answer: str) -> str:
  """The gold answer of a dataset row: extracted when it is a whole solution ("... #### 72")."""
  found, _ = extract_answer(answer)
  return found if found is not None else answer.strip()


def score(completion: str, gold: str, *, units: tuple[str, ...] = DEFAULT_UNITS, timeout_s: int | None = 5) -> float:
  """1.0 iff an answer is extracted from the completion and matches the gold answer."""
  pred, _ = extract_answer(completion)
  if pred is None:
    return 0.0
  return float(answers_match(normalize(gold_answer(gold), units), normalize(pred, units), timeout_s,
                             strip_units=bool(units)))


@register_reward("math_answer")
def math_answer(completion: str, example: Example) -> float:
  """1.0 iff the extracted answer (boxed / #### / "the answer is") equals the gold one, units stripped."""
  return score(completion, example.answer)


@register_reward("math_answer_strict")
def math_answer_strict(completion: str, example: Example) -> float:
  """math_answer without unit stripping: "18 dollars" does not match "18"."""
  return score(completion, example.answer, units=())


@register_reward("math_format")
def math_format(completion: str, example: Example) -> float:
  """1.0 iff an answer can be extracted at all: 0.0 is a format error, not a wrong answer."""
  return float(extract_answer(completion)[0] is not None)


def _warm() -> None:
  import math_verify  # noqa: F401  (the first scored batch should not pay for sympy)


math_answer.warmup = math_answer_strict.warmup = _warm
# Evaluation reports the format-error rate of a pass reward that names its format check here.
math_answer.format_reward = math_answer_strict.format_reward = "math_format"
