"""Prompts as token ids, and the load-time check that every prompt fits the run.

`tokenize_prompts` is the one place a prompt text becomes token ids (the sampler's
`encode_prompts` uses it), so the check at load time counts exactly the tokens the
sampler will later feed. `check_prompts` runs that count over a whole source when the
data is loaded, before anything is compiled: a prompt that cannot fit is dropped (counted
and logged) or refused (an error naming its file:line), instead of crashing the run at
the iteration that happens to draw it, and again at every resume.
"""

from __future__ import annotations

import logging
from typing import Sequence

from cispo_jax.data.example import Example

log = logging.getLogger(__name__)

TOO_LONG_POLICIES = ("drop", "refuse")
_CHUNK = 1024  # prompts per tokenizer call
_SHOW = 5  # offending prompts named in a log line or an error


def tokenize_prompts(tokenizer, texts: Sequence[str], apply_chat_template: bool = False) -> list[list[int]]:
  """Token ids of each prompt text, optionally wrapped as one user turn of the chat template."""
  if isinstance(texts, str):
    raise ValueError("tokenize_prompts: texts must be a list of strings, got a single str")
  texts = list(texts)
  if not texts:
    return []
  if apply_chat_template:
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError("apply_chat_template=True but the tokenizer has no chat_template")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True) for t in texts]
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
  return [list(x) for x in tokenizer(texts)["input_ids"]]


def _token_text(tokenizer, token_id: int) -> str:
  try:
    return repr(tokenizer.convert_ids_to_tokens(int(token_id)))
  except Exception:  # noqa: BLE001 -- only for a message; an id the tokenizer itself doesn't know
    return "?"


def _where(example: Example, index: int, source: str) -> str:
  return example.origin or f"{source} example #{index}"


def check_prompts(examples: Sequence[Example], tokenizer, *, max_prompt_tokens: int, policy: str = "drop",
                  source: str = "prompts", vocab_size: int | None = None, apply_chat_template: bool = False,
                  limit_reason: str = "") -> Sequence[Example]:
  """Every prompt of `examples`, tokenized as the sampler will, checked against the run's limits.

  - longer than `max_prompt_tokens`: policy "drop" leaves it out (the count and the first few
    file:line are logged as a warning); policy "refuse" raises ValueError naming the first
    offender's file:line and how many there are. `limit_reason` says where the limit comes from.
  - a token id >= `vocab_size` (the tokenizer does not match the model) or a prompt of zero
    tokens (a tokenizer without its vocabulary): always a ValueError naming file:line, whatever
    the policy, since every prompt of the source is then suspect.

  Returns `examples` itself when nothing is dropped (a built-in task stays what it is), else a
  new list in the same order. Deterministic in its inputs, so a resumed run drops the same ones.
  `source` names the examples in messages when they have no `origin` (generated ones).
  """
  if policy not in TOO_LONG_POLICIES:
    raise ValueError(f"too_long policy {policy!r}; allowed: {list(TOO_LONG_POLICIES)}")
  if max_prompt_tokens < 1:
    raise ValueError(f"{source}: max_prompt_tokens={max_prompt_tokens} leaves no room for a prompt"
                     f"{f' ({limit_reason})' if limit_reason else ''}")
  too_long: list[tuple[int, int]] = []  # (index, tokens)
  for start in range(0, len(examples), _CHUNK):
    chunk = [examples[i] for i in range(start, min(start + _CHUNK, len(examples)))]
    for k, ids in enumerate(tokenize_prompts(tokenizer, [ex.prompt for ex in chunk], apply_chat_template)):
      i, ex = start + k, chunk[k]
      if not ids:
        raise ValueError(f"{_where(ex, i, source)}: prompt {ex.prompt!r:.60} encodes to zero tokens "
                         "(does the tokenizer have its vocabulary files?)")
      if vocab_size is not None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
          raise ValueError(
              f"{_where(ex, i, source)}: prompt holds token id {bad[0]} "
              f"({_token_text(tokenizer, bad[0])}), outside the "
              f"model's vocab_size={vocab_size}: the tokenizer does not match the model "
              "(its embedding has no row for this token)")
      if len(ids) > max_prompt_tokens:
        too_long.append((i, len(ids)))
  if not too_long:
    return examples
  why = f" ({limit_reason})" if limit_reason else ""
  first = ", ".join(f"{_where(examples[i], i, source)} ({n} tokens)" for i, n in too_long[:_SHOW])
  more = f" and {len(too_long) - _SHOW} more" if len(too_long) > _SHOW else ""
  if policy == "refuse":
    i, n = too_long[0]
    raise ValueError(
        f"{_where(examples[i], i, source)}: prompt has {n} tokens, more than the {max_prompt_tokens} a prompt "
        f"may have{why}; {len(too_long)} of the {len(examples)} prompts of {source} are too long: "
        f"{first}{more}. Shorten them, or set TaskConfig.too_long='drop' to skip them")
  if len(too_long) == len(examples):
    raise ValueError(f"{source}: all {len(examples)} prompts are longer than {max_prompt_tokens} tokens{why}: "
                     f"nothing left to train on ({first}{more})")
  skip = {i for i, _ in too_long}
  kept = [ex for i, ex in enumerate(examples) if i not in skip]
  log.warning("%s: dropped %d of %d prompts longer than %d tokens%s: %s%s", source, len(too_long),
              len(examples), max_prompt_tokens, why, first, more)
  return kept
