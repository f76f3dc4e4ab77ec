"""experiments/recipes/qwen3_1p7b_dapo.gin, the real recipe: one RL iteration on CPU from the recipe file itself
(tiny sizes by --gin_param-style overrides, Qwen3-1.7B's config with the real vocabulary, a tokenizer with Qwen3's
special tokens at their real ids and its chat template, DAPO-Math-17k-layout data), and its update compiled at
the real shapes (1.7B, 32 rows x 8k) to report XLA's memory figures. benchmarks/bench_recipe.py prints the rest.
"""

import json
import os
import sys

import jax
import numpy as np
import pytest

from cispo_jax import cli
from cispo_jax.model.hf_io.config import config_from_hf_dict
from cispo_jax.scale.memory import QWEN3_1P7B_CONFIG_JSON

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPES = os.path.join(os.path.dirname(HERE), "experiments", "recipes")
RECIPE = os.path.join(RECIPES, "qwen3_1p7b_dapo.gin")
sys.path.insert(0, RECIPES)
import make_dapo_parquet  # noqa: E402

# Qwen3's added tokens, ids 151643.. in this order, and whether each is `special` (its tokenizer_config.json).
QWEN3_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
               ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
               ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
               ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
               ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
               ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False),
               ("</tool_response>", False), ("<think>", False), ("</think>", False)]
ENDOFTEXT, IM_START, IM_END, THINK_END = 151643, 151644, 151645, 151668
# Qwen3's chat template for system / user / assistant turns (tools left out): no default system turn, earlier
# assistant turns lose their thinking, the generation prompt opens the assistant turn (thinking mode), and
# enable_thinking=False writes the empty think block.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
DAPO_INSTRUCTION = ("Solve the following math problem step by step. The last line of your response should be of the "
                    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_REMINDER = "\n\nRemember to put your answer on its own line after \"Answer:\"."


def qwen3_tokenizer():
  """A byte-level BPE (no merges: one token a byte) padded with reserved tokens up to 151643, then Qwen3's
  added tokens at their real ids, eos <|im_end|>, pad <|endoftext|>, no bos, and the chat template."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
  vocab.update({f"<reserved_{i}>": i for i in range(len(vocab), ENDOFTEXT)})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN3_ADDED])
  out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                additional_special_tokens=[t for t, s in QWEN3_ADDED[1:] if s],
                                clean_up_tokenization_spaces=False)
  out.chat_template = QWEN3_CHAT_TEMPLATE
  return out


def write_model(path: str, tok) -> str:
  """Qwen3-1.7B's config.json at tiny sizes except the vocabulary (hidden 64, 2 layers: ~10M parameters, most of
  them the tied embedding), random weights, Qwen3's generation_config.json. The embedding gets a constant
  direction that favours <|im_end|>, so some rows of a random policy end their turn within the test's budget."""
  from cispo_jax.model.hf_io import save_model
  from cispo_jax.model.tiny import random_params

  raw = dict(QWEN3_1P7B_CONFIG_JSON, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_window_layers=2)
  cfg = config_from_hf_dict(raw)
  params = random_params(cfg, seed=0)
  embed = np.array(params["embed"])
  embed[:, 0] = 8.0
  embed[IM_END, 0] += 2.0
  params["embed"] = embed
  save_model(path, cfg, params, tokenizer=tok)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": ENDOFTEXT, "eos_token_id": [IM_END, ENDOFTEXT], "pad_token_id": ENDOFTEXT,
               "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}, f)
  return path


def write_dapo(path: str, problems) -> str:
  """Rows in BytedTsinghua-SIA/DAPO-Math-17k's layout: a chat `prompt` with DAPO's instruction, the answer in
  reward_model.ground_truth."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = [{"data_source": "math_dapo", "ability": "MATH",
           "prompt": [{"content": DAPO_INSTRUCTION + q + DAPO_REMINDER, "role": "user"}],
           "reward_model": {"ground_truth": a, "style": "rule-lean"}, "extra_info": {"index": str(i)}}
          for i, (q, a) in enumerate(problems)]
  pq.write_table(pa.Table.from_pylist(rows + rows[:1]), path)  # a repeated row, as in the original
  return path


PROBLEMS = [(f"What is {a} + {b}?", str(a + b)) for a, b in [(2, 3), (7, 5), (11, 4), (9, 9), (6, 1), (8, 13)]]
# Sizes, paths and steps only: everything else is the recipe's.
TINY = ["RLConfig.total_steps = 1", "RLConfig.prompts_per_step = 2", "RolloutConfig.num_generations = 4",
        "RolloutConfig.max_new_tokens = 96", "RolloutConfig.think_budget = 8", "RolloutConfig.paged_slots = 4",
        "RolloutConfig.paged_num_pages = 0", "RolloutConfig.prompt_buckets = (128,)", "UpdateConfig.micro_batches = 2",
        "ModelRunConfig.logprob_chunk = 32", "EvalConfig.eval_size = 2"]


def test_make_dapo_parquet_strips_the_answer_line_instruction_and_duplicates(tmp_path):
  src = write_dapo(str(tmp_path / "dapo.parquet"), PROBLEMS)
  dst = str(tmp_path / "out.parquet")
  assert make_dapo_parquet.convert(src, dst) == len(PROBLEMS)
  import pyarrow.parquet as pq
  rows = pq.read_table(dst).to_pylist()
  assert [(r["prompt"], r["answer"]) for r in rows] == PROBLEMS
  # open-r1/DAPO-Math-17k-Processed: the same user message as a string, the answer in `solution`
  assert make_dapo_parquet.problem_text(DAPO_INSTRUCTION + "Find x." + DAPO_REMINDER) == "Find x."
  assert make_dapo_parquet.answer_of({"solution": "7"}) == "7"
  with pytest.raises(ValueError, match="no answer"):
    make_dapo_parquet.answer_of({"reward_model": {"style": "rule"}})


def _recipe_trainer(tmp_path, tok):
  """A Trainer built from the recipe file with TINY and the test's paths: the model, DAPO-layout data converted by
  make_dapo_parquet (train, and a held-out file)."""
  from cispo_jax.trainer import Trainer

  model = write_model(str(tmp_path / "model"), tok)
  for name, problems in (("t", PROBLEMS), ("e", PROBLEMS[:2])):
    make_dapo_parquet.convert(write_dapo(str(tmp_path / f"dapo_{name}.parquet"), problems),
                              str(tmp_path / f"{name}.parquet"))
  paths = [f"RLConfig.model_dir = '{model}'", f"RLConfig.run_dir = '{tmp_path / 'run'}'",
           f"TaskConfig.train_path = '{tmp_path / 't.parquet'}'", f"TaskConfig.eval_path = '{tmp_path / 'e.parquet'}'"]
  built = cli.parse([RECIPE], gin_params=paths + TINY)
  rl, loss = built["RLConfig"], built["LossConfig"]
  assert (loss.loss_type, loss.aggregation, loss.kl_coef) == ("cispo", "prompt-mean", 0.0)
  assert (rl.update.advantage, rl.update.filter_zero_variance, rl.model_run.lm_head_f32) == ("batch_std", True, True)
  assert (rl.rollout.engine, rl.model_run.dtype) == ("paged", "auto")
  return Trainer(rl, loss, built["OptimConfig"], built["MeshConfig"], built["TaskConfig"],
                 operative_config=built["operative"], devices=jax.devices()[:1])


def _one_iteration(trainer):
  """trainer.step() and the rollout it trained on. A random policy never answers right, so every group would be
  all zeros and filtered out: the recipe's own scorer reads the first completion of each group with a right boxed
  answer appended, which gives the update a signal."""
  made, make, score = [], trainer._make_rollout, trainer.scorer
  n = trainer.rl.rollout.num_generations

  def answer_first_of_each_group(texts, examples):
    return score([t + f" \\boxed{{{ex.answer}}}" if i % n == 0 else t
                  for i, (t, ex) in enumerate(zip(texts, examples))], examples)

  trainer.scorer = answer_first_of_each_group  # the rollout maker's scorer: set before wrapping the maker
  trainer._make_rollout = lambda *a: made.append(make(*a)) or made[-1]
  try:
    return trainer.step(), made[0]
  finally:
    trainer._make_rollout, trainer.scorer = make, score


def test_recipe_runs_one_iteration_on_cpu(tmp_path):
  """The recipe file, sizes / paths / steps overridden: the chat template renders the prompt (<|im_start|>
  first), <|im_end|> stops rows, the forced interruption appends its text, rewards are the boxed-answer
  reward's, and one update runs. Its ScaleRL settings are the ones built."""
  tok = qwen3_tokenizer()
  assert [tok.convert_tokens_to_ids(t) for t, _ in QWEN3_ADDED] == list(range(ENDOFTEXT, ENDOFTEXT + len(QWEN3_ADDED)))
  trainer = _recipe_trainer(tmp_path, tok)
  rl = trainer.rl
  try:
    assert trainer.model_cfg.vocab_size == 151936 and trainer.model_cfg.qk_norm and trainer.model_cfg.tie_word_embeddings
    assert trainer.model_cfg.dtype == "float32"  # 'auto' on CPU
    assert {IM_END, ENDOFTEXT} <= set(trainer.stops.token_ids)
    metrics, rollout = _one_iteration(trainer)
    assert np.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
    out = rollout.out
    prompt_B = [row[mask.astype(bool)] for row, mask in zip(np.asarray(out.prompt_tokens_BxP),
                                                           np.asarray(out.prompt_mask_BxP))]
    assert all(p[0] == IM_START for p in prompt_B)
    text = tok.decode(prompt_B[0].tolist())
    assert text.startswith("<|im_start|>user\nWhat is ") and "Answer:" not in text
    assert text.endswith("put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    tokens, lengths, stopped = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B), np.asarray(out.stopped_B)
    last = tokens[np.arange(len(lengths)), lengths - 1]
    assert (last[stopped] == IM_END).any() and set(last[stopped]) <= {IM_END, ENDOFTEXT}
    assert (lengths[~stopped] == rl.rollout.max_new_tokens).all()
    forced = np.asarray(out.forced_BxN)
    b = int(np.flatnonzero(forced.any(axis=1))[0])
    assert tok.decode(tokens[b][forced[b].astype(bool)].tolist()) == rl.rollout.interrupt_text
    assert tokens[b][forced[b].astype(bool)][-3] == THINK_END
    # the rewards are the boxed-answer reward's: 1 for the completions given a right boxed answer, 0 for the
    # random ones; and DAPO's own "Answer:" line scores 0 (why make_dapo_parquet strips that instruction)
    n = rl.rollout.num_generations
    assert rollout.rewards_B.tolist() == [float(i % n == 0) for i in range(len(lengths))]
    ex = trainer.stream.next_batch()[0]
    rewards, _ = trainer.scorer([f"</think>\n\nSo \\boxed{{{ex.answer}}}", f"Answer: {ex.answer}"], [ex, ex])
    assert rewards.tolist() == [1.0, 0.0]
  finally:
    trainer.close()


def test_recipe_update_compiles_at_the_real_shapes():
  """The recipe's update (AdamW step, loss and gradient) for the real Qwen3-1.7B shapes in bf16 with f32 master
  weights: one micro-batch of two prompt groups (32 rows) x (512 prompt + 8192 completion) positions, over 8
  (fake CPU) devices as on the 8-GPU host it is sized for. Compiled, not run: XLA:CPU's per-device figures
  (printed; about 2.4 GiB of arguments and 17 GiB of temporaries when measured). Asserted: the arguments are
  exactly the f32 params + Adam moments split 8 ways, and the whole fits the 80 GB device the recipe names."""
  from jax.sharding import Mesh

  from cispo_jax.model.config import resolve_dtype
  from cispo_jax.scale.compiled import compiled_memory
  from cispo_jax.scale.memory import param_count

  built = cli.parse([RECIPE])
  rl = built["RLConfig"]
  cfg = config_from_hf_dict(QWEN3_1P7B_CONFIG_JSON, **rl.model_run.overrides(platform="gpu"))
  assert cfg.dtype == resolve_dtype("auto", "gpu") == "bfloat16" and cfg.remat
  assert cfg.max_position_embeddings >= max(rl.rollout.prompt_buckets) + rl.rollout.max_new_tokens
  groups = rl.prompts_per_step // (rl.update.num_minibatches * rl.update.micro_batches)
  rows = groups * rl.rollout.num_generations
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  m = compiled_memory("train_step", cfg, mesh, batch=rows, prompt_len=512, n_completion=rl.rollout.max_new_tokens,
                      loss=built["LossConfig"])
  gib = 2 ** 30
  print(f"\nrecipe update, {rows} rows x {512 + rl.rollout.max_new_tokens} positions, per device of 8: "
        f"argument {m.argument / gib:.2f} GiB, temp {m.temp / gib:.2f} GiB, output {m.output / gib:.2f} GiB, "
        f"peak {m.peak / gib:.2f} GiB (compiled in {m.compile_s:.1f} s)")
  n = param_count(cfg)
  assert 1.6e9 < n < 1.8e9  # Qwen3-1.7B: 1.72B with the tied embedding
  assert m.argument == pytest.approx(3 * 4 * n / 8, rel=0.01)  # f32 params + 2 Adam moments, split 8 ways
  assert 0 < m.temp and m.peak < 80e9
