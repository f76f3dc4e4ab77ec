"""Stop tokens: the checkpoint's (tokenizer eos, generation_config.json, the chat template's end of turn)
and the run's (RolloutConfig.stop_token_ids / stop_strings), and a sampler that ends rows on any of them."""

import dataclasses
import json
import logging
import os

import jax
import numpy as np
import pytest

from cispo_jax import data
from cispo_jax.model import hf_io
from cispo_jax.model.tiny import build_char_tokenizer, make_tiny_model_dir
from cispo_jax.rollout import sampling, stops
from cispo_jax.rollout.config import RolloutConfig, run_stops, sampling_config

CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random 1-layer model over the arithmetic alphabet, weights scaled so its greedy rows vary."""
  path = str(tmp_path_factory.mktemp("stops_model"))
  make_tiny_model_dir(path, "qwen2", tokenizer=build_char_tokenizer(data.ALPHABET), hidden_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, seed=3)
  cfg, params = hf_io.load_model(path)
  return path, cfg, jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params), hf_io.load_tokenizer(path)


def _sample(tiny, stop_set, greedy, n=16, max_new=24):
  path, cfg, params, tok = tiny
  ro = RolloutConfig(max_new_tokens=max_new, temperature=1.0, prompt_buckets=(16,))
  sc = sampling_config(ro, tok, stop_set, greedy=greedy, n=n)
  prompts = ["12+34=", "5+6=", "77+8=", "9+90="]
  tokens, mask = sampling.encode_prompts(tok, prompts, sc)
  out = sampling.generate(params, cfg, tokens, mask, jax.random.PRNGKey(1), sc)
  return (np.asarray(out.tokens_BxN), np.asarray(out.lengths_B), np.asarray(out.stopped_B))


def test_generation_config_lists_two_eos_ids_and_the_model_stops_at_either(tiny, tmp_path):
  path, cfg, params, tok = tiny
  # Two characters the model emits often (counted over unstopped samples) become its eos ids.
  free, lengths, _ = _sample(tiny, stops.Stops((tok.eos_token_id,)), greedy=False)
  drawn = np.concatenate([row[:k] for row, k in zip(free, lengths)])
  ids, counts = np.unique(drawn[~np.isin(drawn, [tok.eos_token_id, tok.pad_token_id])], return_counts=True)
  a, b = (int(i) for i in ids[np.argsort(-counts)][:2])
  d = tmp_path / "model"
  os.makedirs(d)
  for name in os.listdir(path):
    os.symlink(os.path.join(path, name), d / name)
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [a, b], "bos_token_id": 0}))
  got = run_stops(RolloutConfig(), tok, str(d), cfg.vocab_size)
  assert set(got.token_ids) == {tok.eos_token_id, a, b}
  assert (a, "generation_config.json eos_token_id") in got.sources
  tokens, lengths, stopped = _sample(tiny, got, greedy=False)
  assert stopped.mean() > 0.5, stopped
  last = tokens[np.arange(len(tokens)), lengths - 1]
  ends = set(last[stopped].tolist())
  assert {a, b} <= ends <= {a, b, tok.eos_token_id}, (a, b, ends)  # rows ended on one and on the other
  for row, k in zip(tokens, lengths):  # nothing before a row's end is a stop token
    assert not np.isin(row[:k - 1], got.token_ids).any()
  # Without the file, the same draw runs past them.
  tokens0, _, stopped0 = _sample(tiny, run_stops(RolloutConfig(), tok, path, cfg.vocab_size), greedy=False)
  assert stopped0.mean() < stopped.mean() and np.isin(tokens0, [a, b]).any()


def test_bad_generation_config_names_file_and_key(tiny, tmp_path):
  _, cfg, _, tok = tiny
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
  with pytest.raises(ValueError, match=r"generation_config.json: key eos_token_id='2'"):
    run_stops(RolloutConfig(), tok, str(tmp_path), cfg.vocab_size)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 99999]}))
  with pytest.raises(ValueError, match=r"stop token id 99999 \(from generation_config.json eos_token_id, .*"
                                       r"generation_config.json\) is outside the model's vocab_size"):
    run_stops(RolloutConfig(), tok, str(tmp_path), cfg.vocab_size)
  with pytest.raises(ValueError, match=r"RolloutConfig.stop_token_ids"):
    run_stops(RolloutConfig(stop_token_ids=(cfg.vocab_size,)), tok, None, cfg.vocab_size)


def test_chat_template_end_of_turn_is_a_stop():
  tok = build_char_tokenizer(chat_template=CHATML)
  tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
  end = tok.convert_tokens_to_ids("<|im_end|>")
  assert stops.chat_end_of_turn(tok) == end
  got = stops.resolve_stops(tok, None, len(tok))
  assert got.token_ids == tuple(sorted({tok.eos_token_id, end}))
  assert (end, "chat template end of turn") in got.sources
  plain = build_char_tokenizer(chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
  assert stops.chat_end_of_turn(plain) is None  # plain text after the reply: no token to stop on
  assert stops.chat_end_of_turn(build_char_tokenizer()) is None


def test_stop_strings_one_token_and_several(tiny):
  path, cfg, params, tok = tiny
  base = run_stops(RolloutConfig(), tok, path, cfg.vocab_size)
  free, lengths, _ = _sample(tiny, base, greedy=True, n=1)
  row = free[0, :lengths[0]].tolist()
  assert len(row) >= 6, row
  pair = row[3:5]  # a 2-token string greedy decoding produces: the row must end right after its first occurrence
  first = next(i for i in range(len(row) - 1) if row[i:i + 2] == pair)
  got = run_stops(RolloutConfig(stop_strings=(tok.decode(pair), "+")), tok, path, cfg.vocab_size)
  assert got.sequences == (tuple(pair),)
  assert tok.convert_tokens_to_ids("+") in got.token_ids  # a one-token string is a stop id
  tokens, lengths2, stopped = _sample(tiny, dataclasses.replace(got, token_ids=base.token_ids), greedy=True, n=1)
  assert stopped[0] and lengths2[0] == first + 2 and tokens[0, :first + 2].tolist() == row[:first + 2]
  assert lengths2[1:].tolist() == [min(k, next((i + 2 for i in range(len(r) - 1) if r[i:i + 2].tolist() == pair), k))
                                   for r, k in zip(free[1:], lengths[1:])]
  with pytest.raises(ValueError, match=r"RolloutConfig.stop_strings holds ''"):
    run_stops(RolloutConfig(stop_strings=("",)), tok, path, cfg.vocab_size)


def test_trainer_warns_when_no_completion_stopped(model_dir, tmp_path, caplog):
  from cispo_jax.rl import losses
  from cispo_jax.rl.optim import OptimConfig
  from cispo_jax.sharding import MeshConfig
  from cispo_jax.task import TaskConfig
  from cispo_jax.trainer import RLConfig, Trainer

  rl = RLConfig().replace(run_dir=str(tmp_path), model_dir=model_dir, total_steps=1, prompts_per_step=4,
                          num_generations=2, max_new_tokens=4, eval_size=4, export_final=False)
  trainer = Trainer(rl, losses.LossConfig(), OptimConfig(), MeshConfig(fsdp=1), TaskConfig(), devices=jax.devices()[:1])
  trainer.train_sampling = dataclasses.replace(trainer.train_sampling, stop_token_ids=())
  try:
    with caplog.at_level(logging.WARNING, logger="cispo_jax.trainer.loop"):
      metrics = trainer.step()
  finally:
    trainer.close()
  assert metrics["completion/stopped"] == 0
  assert any("none of the 8 completions stopped on its own" in r.getMessage() for r in caplog.records)
