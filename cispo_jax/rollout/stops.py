"""Where a completion ends: every stop token the checkpoint names, and the run's own.

A chat model's end of turn is often not its tokenizer's eos_token: Qwen2.5-Instruct lists both
`<|im_end|>` and `<|endoftext|>` in generation_config.json, Llama-3-Instruct ends a turn with `<|eot_id|>`.
A sampler that stops only on `tokenizer.eos_token_id` lets such a model run to max_new_tokens, and the
tokens after its end of turn are scored and trained on. So the stop set is the union of:

- the tokenizer's eos_token;
- every id of generation_config.json's `eos_token_id` (an int or a list), when the directory has one;
- the chat template's end-of-turn token: the special token the template writes right after an assistant
  message's content (found by rendering one), when the tokenizer has a template;
- RolloutConfig.stop_token_ids, and RolloutConfig.stop_strings: a string that is one token adds that id;
  a longer one stops the row when its tokens (the tokenizer's own encoding of the string) are generated
  in a row.

Each id is checked against the model's vocabulary, naming where it came from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

log = logging.getLogger(__name__)

_PROBE = "0q7x"  # assistant content of the probe conversation: text no template writes itself


@dataclasses.dataclass(frozen=True)
class Stops:
  token_ids: tuple[int, ...]  # any of these ends a row (it is kept as the row's last token)
  sequences: tuple[tuple[int, ...], ...] = ()  # multi-token stop strings, as token ids
  sources: tuple[tuple[int, str], ...] = ()  # (id, where it came from), for the log

  def describe(self, tokenizer) -> str:
    names = []
    for t in self.token_ids:
      where = ", ".join(s for i, s in self.sources if i == t)
      names.append(f"{t} {tokenizer.convert_ids_to_tokens(t)!r} ({where})")
    names += [f"{list(s)} {tokenizer.decode(list(s))!r} (RolloutConfig.stop_strings)" for s in self.sequences]
    return "; ".join(names)


def generation_config_eos(model_dir: str | None) -> list[int]:
  """generation_config.json's eos_token_id as a list ([] when the file or the key is absent)."""
  if not model_dir:
    return []
  path = os.path.join(model_dir, "generation_config.json")
  if not os.path.isfile(path):
    return []
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
  eos = raw.get("eos_token_id")
  if eos is None:
    return []
  ids = eos if isinstance(eos, list) else [eos]
  if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
    raise ValueError(f"{path}: key eos_token_id={eos!r}; expected a token id or a list of token ids (ints >= 0)")
  return ids


def chat_end_of_turn(tokenizer) -> int | None:
  """The special token the chat template writes right after an assistant message's content, or None
  (no template, or plain text follows the content)."""
  if not getattr(tokenizer, "chat_template", None):
    return None
  try:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                                         tokenize=False)
  except Exception as e:  # noqa: BLE001 -- a template that cannot render a reply: no end-of-turn token
    log.info("chat template could not render an assistant turn (%s: %s); no end-of-turn stop token",
             type(e).__name__, e)
    return None
  at = text.rfind(_PROBE)
  if at < 0:
    return None
  after = text[at + len(_PROBE):]
  ids = tokenizer.encode(after, add_special_tokens=False) if after else []
  special = set(tokenizer.all_special_ids)
  return ids[0] if ids and ids[0] in special else None


def resolve_stops(tokenizer, model_dir: str | None, vocab_size: int, *, stop_token_ids=(), stop_strings=()) -> Stops:
  """The stop set of a run (see the module docstring), every id checked to be < vocab_size."""
  sources: list[tuple[int, str]] = []
  if tokenizer.eos_token_id is not None:
    sources.append((int(tokenizer.eos_token_id), "tokenizer eos_token"))
  sources += [(i, "generation_config.json eos_token_id") for i in generation_config_eos(model_dir)]
  turn = chat_end_of_turn(tokenizer)
  if turn is not None:
    sources.append((int(turn), "chat template end of turn"))
  sources += [(int(i), "RolloutConfig.stop_token_ids") for i in stop_token_ids]
  sequences = []
  for s in stop_strings:
    if not isinstance(s, str) or not s:
      raise ValueError(f"RolloutConfig.stop_strings holds {s!r}; each stop string must be a non-empty str")
    ids = tokenizer.encode(s, add_special_tokens=False)
    if not ids:
      raise ValueError(f"RolloutConfig.stop_strings: {s!r} encodes to no tokens with this tokenizer")
    if len(ids) == 1:
      sources.append((ids[0], f"RolloutConfig.stop_strings {s!r}"))
    elif tuple(ids) not in sequences:
      sequences.append(tuple(ids))
  for i, where in sources:
    if not 0 <= i < vocab_size:
      raise ValueError(f"stop token id {i} (from {where}{_file(where, model_dir)}) is outside the model's "
                       f"vocab_size={vocab_size}")
  for seq in sequences:
    if max(seq) >= vocab_size:
      raise ValueError(f"RolloutConfig.stop_strings encode to ids {list(seq)}, outside vocab_size={vocab_size}")
  ids = tuple(sorted({i for i, _ in sources}))
  return Stops(ids, tuple(sequences), tuple(sources))


def _file(where: str, model_dir):
  return f", {os.path.join(model_dir, 'generation_config.json')}" if where.startswith("generation_config") else ""
