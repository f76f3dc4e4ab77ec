"""How an example becomes the model's input text: raw text for base models, or the chat template.

PromptFormat (from TaskConfig) holds a prompt template ("{prompt}" and the example's meta fields),
a system prompt and few-shot (question, answer) pairs.
  raw:  system + blank line + each shot as template(question) + answer + blank line + template(prompt)
  chat: [system] + (user template(question), assistant answer) per shot + the user turn, rendered by
        the tokenizer's chat template with the generation prompt (the assistant's header) at the end.
        A row with its own chat (meta["messages"]) keeps it; the template applies to its last user turn.
The rendered text is the example's new prompt, and the sampler tokenizes it as any raw prompt. So
that this gives exactly apply_chat_template(tokenize=True)'s ids, a BOS the template writes is left
out when the tokenizer adds one itself, and the first example of every source is checked for it.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Sequence

from cispo_jax.data.example import Example
from cispo_jax.data.prompts import tokenize_prompts

PROMPT_FORMATS = ("raw", "chat")


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  kind: str = "raw"
  template: str = "{prompt}"
  system: str = ""
  few_shot: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    if self.kind not in PROMPT_FORMATS:
      raise ValueError(f"TaskConfig.prompt_format={self.kind!r}; allowed: {list(PROMPT_FORMATS)}")
    try:
      fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
    except ValueError as e:
      raise ValueError(f"TaskConfig.prompt_template={self.template!r} is not a format string ({e}); "
                       "write literal braces as {{ and }}") from None
    if "prompt" not in fields:
      raise ValueError(f"TaskConfig.prompt_template={self.template!r} must contain {{prompt}}")
    for i, shot in enumerate(self.few_shot):
      if not (isinstance(shot, (tuple, list)) and len(shot) == 2 and all(isinstance(x, str) for x in shot)):
        raise ValueError(f"TaskConfig.few_shot[{i}]={shot!r}; expected a (question, answer) pair of strings")

  @property
  def identity(self) -> bool:
    """Whether every raw prompt renders as itself (the built-in tasks' default)."""
    return self.kind == "raw" and self.template == "{prompt}" and not self.system and not self.few_shot


class _Fields(dict):
  def __init__(self, example: Example, prompt: str, where: str):
    super().__init__(example.meta)
    self["prompt"] = prompt
    self.where = where

  def __missing__(self, key):
    raise ValueError(f"{self.where}: TaskConfig.prompt_template names {{{key}}}, which this example lacks "
                     f"(fields: {sorted(self)}; extra columns come through TaskConfig.extra_keys)")


def _fill(fmt: PromptFormat, example: Example, text: str, where: str) -> str:
  return fmt.template.format_map(_Fields(example, text, where))


def messages_of(example: Example, fmt: PromptFormat, where: str) -> list[dict[str, str]]:
  """The chat the model is asked to continue: system, few-shot turns, then the example's own."""
  own = [dict(m) for m in example.meta.get("messages", [{"role": "user", "content": example.prompt}])]
  own[-1]["content"] = _fill(fmt, example, own[-1]["content"], where)
  head = []
  if fmt.system:
    if own[0]["role"] == "system":
      raise ValueError(f"{where}: the row's chat has its own system message and TaskConfig.system_prompt is set; "
                       "keep one of them")
    head.append({"role": "system", "content": fmt.system})
  elif own[0]["role"] == "system":
    head, own = own[:1], own[1:]
  for question, answer in fmt.few_shot:
    head += [{"role": "user", "content": _fill(fmt, example, question, where)},
             {"role": "assistant", "content": answer}]
  return head + own


def _template_ids(tokenizer, messages) -> list[int]:
  out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
  return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def render_text(example: Example, fmt: PromptFormat, tokenizer, where: str) -> str:
  """The text the sampler tokenizes for `example`."""
  if fmt.kind == "raw":
    if "messages" in example.meta:
      raise ValueError(f"{where}: the row is a chat (TaskConfig.messages_key) and TaskConfig.prompt_format='raw'; "
                       "a chat can only be rendered by a chat template: set prompt_format='chat'")
    parts = [fmt.system] if fmt.system else []
    parts += [_fill(fmt, example, q, where) + a for q, a in fmt.few_shot]
    return "\n\n".join(parts + [_fill(fmt, example, example.prompt, where)])
  text = tokenizer.apply_chat_template(messages_of(example, fmt, where), tokenize=False, add_generation_prompt=True)
  bos = tokenizer.bos_token
  if bos and text.startswith(bos) and _adds_bos(tokenizer):
    text = text[len(bos):]  # the tokenizer puts it back: written twice, it would be two tokens
  return text


def _adds_bos(tokenizer) -> bool:
  ids = tokenizer("x")["input_ids"]
  return bool(ids) and ids[0] == tokenizer.bos_token_id


def render_source(examples: Sequence[Example], fmt: PromptFormat, tokenizer, source: str) -> Sequence[Example]:
  """`examples` with each prompt rendered by `fmt` (the same object when it renders nothing)."""
  if fmt.identity and not (len(examples) and "messages" in examples[0].meta):  # a chat in raw mode: refused below
    return examples
  if fmt.kind == "chat" and not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"{source}: TaskConfig.prompt_format='chat' but the tokenizer has no chat_template "
                     "(tokenizer_config.json or chat_template.jinja); use prompt_format='raw' for a base model")
  out = []
  for i, ex in enumerate(examples):
    where = ex.origin or f"{source} example #{i}"
    out.append(dataclasses.replace(ex, prompt=render_text(ex, fmt, tokenizer, where)))
  if fmt.kind == "chat" and out:  # the sampler's tokens must be the template's own
    ex = examples[0]
    want = _template_ids(tokenizer, messages_of(ex, fmt, ex.origin or source))
    got = tokenize_prompts(tokenizer, [out[0].prompt])[0]
    if got != want:
      raise ValueError(f"{source}: the rendered chat prompt tokenizes to {got[:12]}... but the chat template "
                       f"gives {want[:12]}...; this tokenizer adds special tokens the template does not expect")
  return out
