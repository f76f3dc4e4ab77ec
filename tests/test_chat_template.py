"""Prompt rendering: a real (Qwen ChatML-style) chat template with system prompt, few-shot turns and
the generation prompt; raw text for base models; a template that writes BOS; errors."""

import dataclasses
import types

import pytest

from cispo_jax.data import Example, chat, tokenize_prompts
from cispo_jax.model import hf_io
from cispo_jax.model.tiny import build_char_tokenizer, make_tiny_model_dir
from cispo_jax.task import TaskConfig

# Qwen2.5's ChatML template, trimmed of tool calls: a default system turn when the chat has none.
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Llama-3 style: the template writes the BOS itself.
WITH_BOS = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def chatml_tokenizer():
  tok = build_char_tokenizer(chat_template=CHATML)
  tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
  return tok


FMT = chat.PromptFormat("chat", template="Solve: {prompt}\nPut the answer in \\boxed{{}}.", system="Be exact.",
                        few_shot=(("1+1?", "\\boxed{2}"),))


def test_chatml_render_with_system_few_shot_and_generation_prompt():
  tok = chatml_tokenizer()
  [out] = chat.render_source([Example("2+3?", "5", origin="f.parquet[row 0]")], FMT, tok, "f.parquet")
  assert out.prompt == (
      "<|im_start|>system\nBe exact.<|im_end|>\n"
      "<|im_start|>user\nSolve: 1+1?\nPut the answer in \\boxed{}.<|im_end|>\n"
      "<|im_start|>assistant\n\\boxed{2}<|im_end|>\n"
      "<|im_start|>user\nSolve: 2+3?\nPut the answer in \\boxed{}.<|im_end|>\n"
      "<|im_start|>assistant\n")
  assert out.answer == "5" and out.origin == "f.parquet[row 0]"
  ids = tokenize_prompts(tok, [out.prompt])[0]
  start = tok.convert_tokens_to_ids("<|im_start|>")
  assert ids.count(start) == 5 and ids[-len("assistant\n") - 1] == start  # the special tokens stay single tokens
  assert ids == list(tok.apply_chat_template(chat.messages_of(Example("2+3?", "5"), FMT, ""), tokenize=True,
                                             add_generation_prompt=True)["input_ids"])


def test_default_system_turn_and_a_rows_own_chat():
  tok = chatml_tokenizer()
  plain = chat.PromptFormat("chat")
  [out] = chat.render_source([Example("hi", "1")], plain, tok, "s")
  assert out.prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
  msgs = [{"role": "system", "content": "Terse."}, {"role": "user", "content": "2*4?"}]
  row = Example("2*4?", "8", {"messages": msgs}, origin="c.parquet[row 3]")
  [out] = chat.render_source([row], dataclasses.replace(plain, template="Q: {prompt}", few_shot=(("1*1?", "1"),)),
                             tok, "c.parquet")
  assert out.prompt == ("<|im_start|>system\nTerse.<|im_end|>\n<|im_start|>user\nQ: 1*1?<|im_end|>\n"
                        "<|im_start|>assistant\n1<|im_end|>\n<|im_start|>user\nQ: 2*4?<|im_end|>\n"
                        "<|im_start|>assistant\n")
  with pytest.raises(ValueError, match=r"c.parquet\[row 3\]: the row's chat has its own system message"):
    chat.render_source([row], dataclasses.replace(plain, system="Other."), tok, "c.parquet")


def test_raw_mode_for_base_models():
  tok = build_char_tokenizer()
  fmt = chat.PromptFormat("raw", template="Question: {prompt}\nAnswer: ", system="Answer with a number.",
                          few_shot=(("1+1?", "2"), ("2+2?", "4")))
  [out] = chat.render_source([Example("3+3?", "6")], fmt, tok, "s")
  assert out.prompt == ("Answer with a number.\n\nQuestion: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer: 4\n\n"
                        "Question: 3+3?\nAnswer: ")
  src = [Example("3+3?", "6")]
  assert chat.render_source(src, chat.PromptFormat(), tok, "s") is src  # the default renders nothing
  with_meta = chat.PromptFormat("raw", template="[{level}] {prompt}")
  assert chat.render_source([Example("q", "1", {"level": 2})], with_meta, tok, "s")[0].prompt == "[2] q"
  with pytest.raises(ValueError, match=r"d.csv\[row 0\]: TaskConfig.prompt_template names \{level\}"):
    chat.render_source([Example("q", "1", origin="d.csv[row 0]")], with_meta, tok, "d.csv")
  with pytest.raises(ValueError, match="a chat can only be rendered by a chat template"):
    chat.render_source([Example("q", "1", {"messages": [{"role": "user", "content": "q"}]})], chat.PromptFormat(),
                       tok, "s")


def test_a_template_that_writes_bos_gives_one_bos():
  from tokenizers import processors
  tok = build_char_tokenizer(chat_template=WITH_BOS)
  tok.add_special_tokens({"bos_token": "<s>"})
  tok._tokenizer.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
  assert tokenize_prompts(tok, ["x"])[0][0] == tok.bos_token_id  # this tokenizer adds BOS itself
  [out] = chat.render_source([Example("hi", "1")], chat.PromptFormat("chat"), tok, "s")
  ids = tokenize_prompts(tok, [out.prompt])[0]
  assert ids.count(tok.bos_token_id) == 1 and out.prompt == "[user] hi\n[assistant] "


def test_a_chat_model_directory_keeps_its_template(tmp_path):
  tok = chatml_tokenizer()
  path = make_tiny_model_dir(str(tmp_path / "m"), "qwen2", tokenizer=tok, hidden_size=16, num_layers=1,
                             num_heads=2, num_kv_heads=1)
  loaded = hf_io.load_tokenizer(path)
  assert loaded.chat_template == CHATML
  [a] = chat.render_source([Example("2+3?", "5")], FMT, loaded, "s")
  [b] = chat.render_source([Example("2+3?", "5")], FMT, tok, "s")
  assert a.prompt == b.prompt and tokenize_prompts(loaded, [a.prompt]) == tokenize_prompts(tok, [b.prompt])


def test_config_errors():
  with pytest.raises(ValueError, match=r"prompt_template='Q: \{question\}' must contain \{prompt\}"):
    TaskConfig(prompt_template="Q: {question}")
  with pytest.raises(ValueError, match="prompt_format='html'; allowed"):
    TaskConfig(prompt_format="html")
  with pytest.raises(ValueError, match=r"few_shot\[0\]"):
    TaskConfig(few_shot=(("only a question",),))
  with pytest.raises(ValueError, match="tokenizer has no chat_template"):
    chat.render_source([Example("q", "1")], chat.PromptFormat("chat"), build_char_tokenizer(), "s")
  task = TaskConfig(task="arithmetic", prompt_format="chat", train_size=4, eval_size=2)
  cfg = types.SimpleNamespace(max_position_embeddings=64, vocab_size=200)
  with pytest.raises(ValueError, match="RolloutConfig.apply_chat_template=True wraps each prompt"):
    task.check_sources([Example("1+1=", "2")], [Example("2+2=", "4")], chatml_tokenizer(), cfg, max_new_tokens=4,
                       prompt_buckets=(32,), apply_chat_template=True, process_count=1)
