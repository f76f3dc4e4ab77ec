"""The one record every prompt source yields."""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Example:
  """A prompt and the answer its verifier checks against.

  `meta` carries task details a verifier may need (countdown numbers, a reference
  solution); it should stay JSON-serialisable so examples travel to the reward worker
  and into logs unchanged. `origin` says where the example came from ("file.jsonl:12")
  so a check that rejects it can name the line; "" for generated examples. It takes no
  part in equality: the same prompt and answer are the same example wherever they come from.
  """

  prompt: str
  answer: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
  origin: str = dataclasses.field(default="", compare=False)


def reference_completion(example: Example) -> str:
  """A completion the task's verifier accepts: the target text for supervised warm-up.

  Countdown's answer is the target number, but a correct completion is an expression,
  so tasks whose completion differs from the answer store it as meta["solution"].
  """
  return str(example.meta.get("solution", example.answer))
