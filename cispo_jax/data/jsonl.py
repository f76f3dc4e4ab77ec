"""Prompts from a JSONL file: one JSON object per line with a prompt and an answer."""

from __future__ import annotations

import json
import os

from cispo_jax.data.example import Example


def _decode(raw: bytes, where: str, first: bool) -> str:
  try:
    return raw.decode("utf-8-sig" if first else "utf-8")  # a BOM may open the file
  except UnicodeDecodeError as e:
    raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}: "
                     f"{e.reason}); JSONL files must be UTF-8 text") from None


def load_jsonl(path: str | os.PathLike, prompt_key: str = "prompt",
               answer_key: str = "answer") -> list[Example]:
  """Reads every non-blank line as an Example; other fields of the object go to meta.

  The answer may be a JSON string or number (numbers become their text). Any bad line
  (bad UTF-8, bad JSON, a missing or mistyped key) fails the whole load with ValueError
  naming file:line, so a typo in a dataset is found before training rather than turning
  into silent zero rewards. Each example's `origin` is its "file:line".
  """
  path = os.fspath(path)
  examples = []
  with open(path, "rb") as f:  # bytes: a decoding error can then name its line
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      line = _decode(raw, where, lineno == 1)
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {prompt_key!r} and {answer_key!r}, "
                         f"got {type(record).__name__}")
      for key in (prompt_key, answer_key):
        if key not in record:
          raise ValueError(f"{where}: missing key {key!r} (present: {sorted(record)})")
      prompt, answer = record.pop(prompt_key), record.pop(answer_key)
      if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: key {prompt_key!r} must be a non-empty string, got {prompt!r:.60}")
      if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"{where}: key {answer_key!r} must be a string or a number, got {answer!r:.60}")
      examples.append(Example(prompt, str(answer), record, origin=where))
  if not examples:
    raise ValueError(f"{path}: no examples (the file is empty or blank)")
  return examples
