"""Bad inputs end in a clear error naming the file / line / key, or a counted, logged skip.

Data: prompts too long for the run (checked at load, before anything compiles), non-UTF-8
JSONL, a file too small for its held-out split. Model directories: missing tokenizer files,
a tokenizer without eos/pad, a truncated safetensors file or a broken config.json, a tied
config whose file holds its own lm_head (transformers unties it), a config without
`architectures`, token ids outside the model's vocabulary. Tiny models only; nothing trains.
"""

import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cispo_jax.rollout import sampling
from cispo_jax.data import Example, check_prompts, load_jsonl
from cispo_jax.model.hf_io import load_config, load_model, load_params, load_tokenizer
from cispo_jax.model.tiny import SIMPLE_CHAT_TEMPLATE, build_char_tokenizer, make_tiny_model_dir
from cispo_jax.task import TaskConfig, make_sources


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny qwen2 directory: char tokenizer with a chat template, max_position_embeddings=64."""
  root = tmp_path_factory.mktemp("bad_inputs")
  tok = build_char_tokenizer(chat_template=SIMPLE_CHAT_TEMPLATE)
  return make_tiny_model_dir(str(root / "base"), tokenizer=tok, max_position_embeddings=64)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _edit_json(path, drop=(), **kw):
  raw = json.load(open(path))
  for key in drop:
    raw.pop(key, None)
  raw.update(kw)
  json.dump(raw, open(path, "w"))


def _jsonl(path, prompts):
  with open(path, "w") as f:
    for i, p in enumerate(prompts):
      f.write(json.dumps({"prompt": p, "answer": str(i)}) + "\n")
  return str(path)


def _sources(task, model_dir, **kw):
  train, held = make_sources(task, seed=0)
  kw.setdefault("process_count", 1)
  return task.check_sources(train, held, load_tokenizer(model_dir), load_config(model_dir), **kw)


# ----------------------------------------------------------------------------- 1. prompt length


def test_too_long_prompts_are_dropped_counted_and_logged(base, tmp_path, caplog):
  train = _jsonl(tmp_path / "train.jsonl", ["1+1=", "x" * 40, "2+2=", "y" * 33, "3+3="])
  held = _jsonl(tmp_path / "eval.jsonl", ["4+4=", "z" * 50])
  task = TaskConfig(task="jsonl", train_path=train, eval_path=held)  # too_long="drop" by default
  with caplog.at_level(logging.WARNING, logger="cispo_jax.data.prompts"):
    src, ev = _sources(task, base, max_new_tokens=8, prompt_buckets=(8, 16, 32))
  assert [e.prompt for e in src] == ["1+1=", "2+2=", "3+3="]
  assert [e.origin for e in src] == [f"{train}:1", f"{train}:3", f"{train}:5"]
  assert [e.prompt for e in ev] == ["4+4="]
  assert f"{train}: dropped 2 of 5 prompts longer than 32 tokens (the largest prompt bucket" in caplog.text
  assert f"{train}:2 (40 tokens), {train}:4 (33 tokens)" in caplog.text
  assert f"{held}: dropped 1 of 2 prompts" in caplog.text and f"{held}:2 (50 tokens)" in caplog.text


def test_too_long_prompt_refused_names_file_and_line(base, tmp_path):
  train = _jsonl(tmp_path / "train.jsonl", ["1+1=", "x" * 40, "2+2=", "y" * 33])
  task = TaskConfig(task="jsonl", train_path=train, eval_path=train, too_long="refuse")
  with pytest.raises(ValueError, match=re.escape(f"{train}:2: prompt has 40 tokens, more than the 32 a prompt may "
                                                 "have (the largest prompt bucket of prompt_buckets=(8, 16, 32)); "
                                                 "2 of the 4 prompts of") + r".*train\.jsonl:4 \(33 tokens\)"
                                                 r".*too_long='drop'"):
    _sources(task, base, max_new_tokens=8, prompt_buckets=(8, 16, 32))


def test_prompt_plus_completion_must_fit_max_position_embeddings(base, tmp_path):
  """Buckets up to 2048 would take a 50-token prompt; the model's 64 positions less 16 new tokens don't."""
  train = _jsonl(tmp_path / "train.jsonl", ["1+1=", "q" * 50])
  task = TaskConfig(task="jsonl", train_path=train, eval_path=train, too_long="refuse")
  with pytest.raises(ValueError, match=re.escape(f"{train}:2: prompt has 50 tokens, more than the 48 a prompt may "
                                                 "have (the model's max_position_embeddings=64 less "
                                                 "max_new_tokens=16)")):
    _sources(task, base, max_new_tokens=16, prompt_buckets=(16, 32, 64, 128, 256, 512, 1024, 2048))
  with pytest.raises(ValueError, match="max_new_tokens=64 leaves no room for a prompt.*max_position_embeddings is 64"):
    _sources(task, base, max_new_tokens=64, prompt_buckets=(2048,))


def test_length_counts_the_chat_template(base, tmp_path):
  """20 characters fit 32 tokens, but not once wrapped as "user: ...\\nassistant: " (38 tokens)."""
  train = _jsonl(tmp_path / "train.jsonl", ["1", "a" * 20])
  task = TaskConfig(task="jsonl", train_path=train, eval_path=train)
  src, _ = _sources(task, base, max_new_tokens=8, prompt_buckets=(32,))
  assert len(src) == 2
  src, _ = _sources(task, base, max_new_tokens=8, prompt_buckets=(32,), apply_chat_template=True)
  assert [e.prompt for e in src] == ["1"]


def test_all_prompts_too_long_and_bad_policy(base, tmp_path):
  train = _jsonl(tmp_path / "train.jsonl", ["x" * 40, "y" * 40])
  task = TaskConfig(task="jsonl", train_path=train, eval_path=train)
  with pytest.raises(ValueError, match=re.escape(f"{train}: all 2 prompts are longer than 32 tokens")):
    _sources(task, base, max_new_tokens=8, prompt_buckets=(32,))
  with pytest.raises(ValueError, match=r"TaskConfig.too_long='truncate'; allowed: \['drop', 'refuse'\]"):
    TaskConfig(too_long="truncate")


def test_builtin_task_is_checked_and_kept_as_is(base):
  task = TaskConfig(task="arithmetic", train_size=64, eval_size=8)
  train, held = make_sources(task, seed=0)
  src, ev = task.check_sources(train, held, load_tokenizer(base), load_config(base), max_new_tokens=8,
                               prompt_buckets=(8, 16), process_count=1)
  assert src is train and ev == list(held)  # nothing dropped: the task object itself, no copy
  with pytest.raises(ValueError, match=r"arithmetic train split example #0 \(\d tokens\)"):
    task.check_sources(train, held, load_tokenizer(base), load_config(base), max_new_tokens=8,
                       prompt_buckets=(4,), process_count=1)


# ----------------------------------------------------------------------------- 2. encoding


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
  with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16"):
    load_jsonl(path)
  with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not valid UTF-8"):
    make_sources(TaskConfig(task="jsonl", train_path=str(path)), seed=0)
  bom = tmp_path / "bom.jsonl"  # a UTF-8 byte-order mark is not an error
  bom.write_bytes(b'\xef\xbb\xbf{"prompt": "1+1=", "answer": "2"}\n')
  assert load_jsonl(bom) == [Example("1+1=", "2")]


# ----------------------------------------------------------------------------- 3. too few examples


def test_tiny_file_names_file_and_counts(base, tmp_path):
  path = _jsonl(tmp_path / "three.jsonl", ["0+1=", "1+1=", "2+1="])
  with pytest.raises(ValueError, match=re.escape(f"{path}: 3 examples; the held-out split by prompt hash "
                                                 "(TaskConfig.eval_fraction=0.1) put 3 in train and 0 in eval, and "
                                                 "each needs at least 1 (at eval_fraction=0.1, about 10 examples")):
    make_sources(TaskConfig(task="jsonl", train_path=path), seed=0)
  # Where the old `max() arg is an empty sequence` came from: encoding no prompts.
  with pytest.raises(ValueError, match="no prompts to encode"):
    sampling.encode_prompts(load_tokenizer(base), [], sampling.SamplingConfig())
  # Every process evaluates its share: fewer held-out examples than processes is refused at load.
  task = TaskConfig(task="jsonl", train_path=path, eval_path=_jsonl(tmp_path / "one.jsonl", ["5+5="]))
  with pytest.raises(ValueError, match=r"one\.jsonl: 1 held-out examples; evaluation needs at least 2"):
    _sources(task, base, max_new_tokens=8, prompt_buckets=(32,), process_count=2)


# ----------------------------------------------------------------------------- 4-5. tokenizer files


def test_missing_tokenizer_files_are_named(base, tmp_path):
  d = _copy(base, tmp_path / "no_tok")
  os.remove(os.path.join(d, "tokenizer.json"))
  with pytest.raises(FileNotFoundError, match=re.escape(f"{d}: no tokenizer vocabulary file: none of tokenizer.json")
                     + r".*files present: \[.*'config.json', 'model.safetensors', 'tokenizer_config.json'\]"):
    load_tokenizer(d)
  json.dump({"a": 3}, open(os.path.join(d, "vocab.json"), "w"))
  with pytest.raises(FileNotFoundError, match=re.escape(f"{d}: tokenizer file merges.txt is missing")):
    load_tokenizer(d)


def test_tokenizer_without_eos_says_so(base, tmp_path, caplog):
  # A model-type tokenizer class (a real Qwen2 checkpoint's) gets transformers' class default '<|endoftext|>',
  # which the vocabulary lacks.
  d = _copy(base, tmp_path / "no_eos")
  _edit_json(os.path.join(d, "tokenizer_config.json"), drop=("eos_token",), tokenizer_class="Qwen2Tokenizer")
  with pytest.raises(ValueError, match=r"the tokenizer has no eos token in the model's vocabulary: eos_token "
                                       r"'<\|endoftext\|>' has id 86 >= vocab_size=86.*files set no eos_token"):
    load_tokenizer(d)
  # Tokenizer files alone: no eos at all.
  d = str(tmp_path / "tok_only")
  build_char_tokenizer().save_pretrained(d)
  _edit_json(os.path.join(d, "tokenizer_config.json"), drop=("eos_token",))
  with pytest.raises(ValueError, match=re.escape(f"{d}: the tokenizer has no eos_token")):
    load_tokenizer(d)


def test_tokenizer_without_pad_falls_back_to_eos(base, tmp_path, caplog):
  d = _copy(base, tmp_path / "no_pad")  # a model-type class, which fills in a default pad the vocabulary lacks
  _edit_json(os.path.join(d, "tokenizer_config.json"), drop=("pad_token",), tokenizer_class="Qwen2Tokenizer")
  with caplog.at_level(logging.WARNING, logger="cispo_jax.model.hf_io"):
    tok = load_tokenizer(d)
  assert tok.pad_token_id == tok.eos_token_id == 1
  assert "files set no pad_token" in caplog.text and "using its eos_token '<eos>' (id 1) as pad" in caplog.text
  _edit_json(os.path.join(d, "tokenizer_config.json"), pad_token="<|pad|>")  # set, but not in the vocabulary
  with pytest.raises(ValueError, match=r"pad_token '<\|pad\|>' has id 86 >= the model's vocab_size=86"):
    load_tokenizer(d)


# ----------------------------------------------------------------------------- 6. broken files


def test_truncated_safetensors_and_bad_json_name_the_file(base, tmp_path):
  d = _copy(base, tmp_path / "trunc")
  weights = os.path.join(d, "model.safetensors")
  data = open(weights, "rb").read()
  for cut in (len(data) // 2, 20):  # data cut short; header cut short
    open(weights, "wb").write(data[:cut])
    with pytest.raises(ValueError, match=re.escape(f"{weights}: not a readable safetensors file")):
      load_model(d)

  d = _copy(base, tmp_path / "bad_json")
  open(os.path.join(d, "config.json"), "w").write('{"vocab_size": 86,,}')
  with pytest.raises(ValueError, match=re.escape(f"{d}/config.json: invalid JSON (Expecting property name")):
    load_config(d)
  open(os.path.join(d, "config.json"), "w").write("[1, 2]")
  with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, got list"):
    load_config(d)

  d = _copy(base, tmp_path / "bad_field")
  _edit_json(os.path.join(d, "config.json"), hidden_size="big")
  with pytest.raises(ValueError, match=r"config\.json: a size field is not an integer"):
    load_config(d)

  d = _copy(base, tmp_path / "bad_index")
  open(os.path.join(d, "model.safetensors.index.json"), "w").write("{")
  with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: invalid JSON"):
    load_model(d)


# ----------------------------------------------------------------------------- 7. tied head


def _torch_logits(model_dir, ids):
  torch = pytest.importorskip("torch", reason="torch (test-only dependency) is needed for parity tests")
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(
      model_dir, dtype=torch.float32, attn_implementation="eager", local_files_only=True)
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def test_tied_config_with_its_own_lm_head_is_untied_like_transformers(tmp_path, caplog):
  from cispo_jax.model import forward
  from cispo_jax.model.hf_io.config import _read_json, config_from_hf_dict

  d = make_tiny_model_dir(str(tmp_path / "tied"), tie_word_embeddings=True)
  weights = os.path.join(d, "model.safetensors")
  tensors = load_file(weights)
  same = dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].copy()})
  save_file(same, weights, metadata={"format": "pt"})
  assert load_config(d).tie_word_embeddings  # an identical stored head: still tied

  head = np.random.default_rng(1).standard_normal(tensors["model.embed_tokens.weight"].shape).astype(np.float32) / 8
  save_file(dict(tensors, **{"lm_head.weight": head}), weights, metadata={"format": "pt"})
  with caplog.at_level(logging.WARNING, logger="cispo_jax.model.hf_io"):
    cfg, params = load_model(d)
  assert not cfg.tie_word_embeddings and "using the file's lm_head (untied), as transformers does" in caplog.text
  np.testing.assert_array_equal(np.asarray(params["lm_head"]), head.T)

  ids = np.array([[3, 4, 5, 6, 7, 8]], np.int32)
  ours = np.asarray(jax.jit(forward, static_argnums=(1,))(params, cfg, ids)[0])
  ref = _torch_logits(d, ids)
  assert np.abs(ours - ref).max() <= 1e-4

  # A tied config passed straight to load_params would drop the file's head: refused.
  tied = config_from_hf_dict(_read_json(os.path.join(d, "config.json")))
  with pytest.raises(ValueError, match=r"model\.safetensors: holds an lm_head\.weight different from "
                                       r"model\.embed_tokens\.weight, but the config has tie_word_embeddings=True"):
    load_params(d, tied)


# ----------------------------------------------------------------------------- 8. architectures


@pytest.mark.parametrize("family,arch", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                         ("qwen3", "Qwen3ForCausalLM")])
def test_config_without_architectures_loads_by_model_type(tmp_path, family, arch):
  d = make_tiny_model_dir(str(tmp_path / family), family=family, num_layers=1)
  expected = load_config(d)
  _edit_json(os.path.join(d, "config.json"), drop=("architectures",))
  cfg, params = load_model(d)
  assert cfg == expected and cfg.architecture == arch and "embed" in params
  _edit_json(os.path.join(d, "config.json"), model_type="gpt2")
  with pytest.raises(ValueError, match=r"no 'architectures' and model_type='gpt2' is not supported; allowed: "
                                       r"architectures \[.*\] or model_type \['llama', 'qwen2', 'qwen3'\]"):
    load_config(d)


# ----------------------------------------------------------------------------- 9. token ids vs vocab


def test_token_ids_outside_the_model_vocab_are_refused(tmp_path, caplog):
  """The char tokenizer has 86 tokens, the model 40 rows: 'L' is id 40."""
  d = make_tiny_model_dir(str(tmp_path / "small_vocab"), vocab_size=40, num_layers=1)
  with caplog.at_level(logging.WARNING, logger="cispo_jax.model.hf_io"):
    tok = load_tokenizer(d)
  assert "the tokenizer has 86 tokens but the model's vocab_size is 40" in caplog.text
  assert tok("L")["input_ids"] == [40]

  # At load: the line, whatever the too_long policy.
  train = _jsonl(tmp_path / "train.jsonl", ["abc", "ALL", "de"])
  task = TaskConfig(task="jsonl", train_path=train, eval_path=train)
  with pytest.raises(ValueError, match=re.escape(f"{train}:2: prompt holds token id 40 ('L'), outside the model's "
                                                 "vocab_size=40: the tokenizer does not match the model")):
    _sources(task, d, max_new_tokens=4, prompt_buckets=(8,))
  with pytest.raises(ValueError, match=r"example #1: prompt holds token id 40"):
    check_prompts([Example("ab", "1"), Example("L", "1")], tok, max_prompt_tokens=8, vocab_size=40, source="x")

  # At encode time, and in generate itself (before anything compiles): never NaN logits and token 0.
  sc = sampling.SamplingConfig(max_new_tokens=2, prompt_buckets=(8,), stop_token_ids=(1,))
  with pytest.raises(ValueError, match=r"text 1 \('ALL'\) holds token id 40, outside the model's vocab_size=40"):
    sampling.encode_prompts(tok, ["abc", "ALL"], sc, vocab_size=40)
  cfg, params = load_model(d)
  tokens, mask = sampling.encode_prompts(tok, ["abc", "ALL"], sc)
  with pytest.raises(ValueError, match=r"prompt row 1 holds token id 40, outside the model's vocab_size=40"):
    sampling.generate(params, cfg, tokens, mask, jax.random.PRNGKey(0), sc)
