"""A chat model directory for the GSM8K-format example, made offline.

A character tokenizer with Qwen's ChatML template (<|im_start|> / <|im_end|> as special tokens,
<|im_end|> the eos, as in Qwen2.5-Instruct), a random small Qwen2, and a short supervised warm start
on the training split: each prompt rendered by the gin file's prompt format (system prompt, chat
template, generation prompt), each target the row's solution without GSM8K's <<calculator>> notes.
The result is an ordinary HF directory that training and `python -m cispo_jax.evaluate` load.

  python experiments/gsm8k_synth/make_model.py   # -> runs/gsm8k_synth/model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re

CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def main():
  here = os.path.dirname(__file__)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gin_file", default=os.path.join(here, "gsm8k.gin"))
  p.add_argument("--out", default="runs/gsm8k_synth/model")
  p.add_argument("--sft_steps", type=int, default=600)
  p.add_argument("--hidden_size", type=int, default=128)
  p.add_argument("--num_layers", type=int, default=2)
  args = p.parse_args()

  import jax
  import jax.numpy as jnp

  from cispo_jax import cli
  from cispo_jax.bootstrap import BootstrapConfig, _sft_arrays, sft
  from cispo_jax.data import chat
  from cispo_jax.model.hf_io import save_model
  from cispo_jax.model.tiny import build_char_tokenizer, tiny_config
  from cispo_jax.model.transformer import init_params
  from cispo_jax.task import make_sources

  task = cli.parse([args.gin_file])["TaskConfig"]
  tok = build_char_tokenizer(chat_template=CHATML)
  tok.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
  train, _ = make_sources(task, seed=0)
  rendered = chat.render_source(train, task.prompt_renderer(), tok, task.train_path)
  # The warm start's target: the worked solution, calculator notes dropped ("12 + 7 = 19").
  examples = [dataclasses.replace(ex, meta={"solution": re.sub(r"<<[^>]*>>", "", ex.answer)}) for ex in rendered]
  model_cfg = tiny_config("qwen2", vocab_size=len(tok), hidden_size=args.hidden_size,
                          intermediate_size=3 * args.hidden_size, num_layers=args.num_layers, num_heads=4,
                          num_kv_heads=2, max_position_embeddings=512)
  boot = BootstrapConfig(sft_steps=args.sft_steps, sft_batch_size=32, sft_learning_rate=3e-3)
  tokens, valid, target = _sft_arrays(tok, examples, tok.eos_token_id)
  params = init_params(model_cfg, jax.random.PRNGKey(0))
  params, curve = sft(params, model_cfg, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(target), boot)
  save_model(args.out, model_cfg, jax.device_get(params), tok)
  with open(os.path.join(args.out, "make_model.json"), "w") as f:
    json.dump({"sft_steps": args.sft_steps, "sft_loss_first": curve[:1], "sft_loss_last": curve[-1:],
               "examples": len(examples), "max_tokens": int(tokens.shape[1])}, f)
  print(f"{args.out}: {len(tok)} tokens, SFT loss {curve[0]:.3f} -> {curve[-1]:.3f} on {len(examples)} examples")


if __name__ == "__main__":
  main()
