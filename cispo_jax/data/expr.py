"""A safe evaluator for integer arithmetic expressions: + - * / and parentheses.

Model completions are untrusted text, so no eval(): a tokenizer that only knows
integers, the four operators and parentheses, and a recursive-descent parser with
bounds on length, nesting and literal size. Values are exact Fractions, so "7/2*2"
is 7 and no float rounding can make a wrong expression hit its target.
"""

from __future__ import annotations

import collections
import fractions
import re
from typing import Sequence

MAX_CHARS = 256
MAX_DEPTH = 32
MAX_DIGITS = 12

_TOKEN_RE = re.compile(r"\s*(?:(\d+)|([-+*/()]))")


class ExprError(ValueError):
  """The text is not an allowed expression (bad character, syntax, x/0, too big)."""


def _tokenize(text: str) -> list[str]:
  tokens, pos = [], 0
  text = text.rstrip()
  while pos < len(text):
    m = _TOKEN_RE.match(text, pos)
    if m is None:
      raise ExprError(f"unexpected character {text[pos]!r} at {pos}; allowed: digits + - * / ( )")
    number, op = m.groups()
    if number is not None and len(number) > MAX_DIGITS:
      raise ExprError(f"integer literal longer than {MAX_DIGITS} digits")
    tokens.append(number if number is not None else op)
    pos = m.end()
  return tokens


class _Parser:
  """expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*;
  factor := INT | '(' expr ')'. No unary minus: countdown numbers are given, not negated."""

  def __init__(self, tokens: list[str]):
    self.tokens = tokens
    self.pos = 0
    self.depth = 0
    self.numbers: list[int] = []

  def peek(self) -> str | None:
    return self.tokens[self.pos] if self.pos < len(self.tokens) else None

  def take(self) -> str:
    tok = self.peek()
    if tok is None:
      raise ExprError("unexpected end of expression")
    self.pos += 1
    return tok

  def expr(self) -> fractions.Fraction:
    value = self.term()
    while self.peek() in ("+", "-"):
      if self.take() == "+":
        value += self.term()
      else:
        value -= self.term()
    return value

  def term(self) -> fractions.Fraction:
    value = self.factor()
    while self.peek() in ("*", "/"):
      op = self.take()
      rhs = self.factor()
      if op == "*":
        value *= rhs
      elif rhs == 0:
        raise ExprError("division by zero")
      else:
        value /= rhs
    return value

  def factor(self) -> fractions.Fraction:
    tok = self.take()
    if tok == "(":
      self.depth += 1
      if self.depth > MAX_DEPTH:
        raise ExprError(f"parentheses nested deeper than {MAX_DEPTH}")
      value = self.expr()
      if self.take() != ")":
        raise ExprError("expected ')'")
      self.depth -= 1
      return value
    if tok.isdigit():
      self.numbers.append(int(tok))
      return fractions.Fraction(int(tok))
    raise ExprError(f"unexpected token {tok!r}")


def parse_expression(text: str) -> tuple[fractions.Fraction, list[int]]:
  """Returns (exact value, integer literals in order of appearance); ExprError if not allowed."""
  if len(text) > MAX_CHARS:
    raise ExprError(f"expression longer than {MAX_CHARS} characters")
  tokens = _tokenize(text)
  if not tokens:
    raise ExprError("empty expression")
  parser = _Parser(tokens)
  value = parser.expr()
  if parser.pos != len(tokens):
    raise ExprError(f"unexpected token {tokens[parser.pos]!r} after a complete expression")
  return value, parser.numbers


def evaluate(text: str) -> fractions.Fraction:
  return parse_expression(text)[0]


def check_countdown(expression: str, numbers: Sequence[int], target: int) -> bool:
  """True iff `expression` is allowed, uses each given number at most once, and equals target.

  "At most once" counts multiplicity: with numbers (3, 3, 7), "3*3+7" is fine and
  "3*3*3" is not. Numbers may be left unused. Malformed input is False, never an error.
  """
  try:
    value, used = parse_expression(expression)
  except ExprError:
    return False
  available = collections.Counter(int(n) for n in numbers)
  if any(count > available[n] for n, count in collections.Counter(used).items()):
    return False
  return value == target
