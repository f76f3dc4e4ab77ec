"""Local datasets through Hugging Face `datasets`: every file format, the column mapping, bad rows,
the resumable sharded stream over them, and load-time length filtering."""

import logging
import os
import shutil
import types

import datasets
import pytest

from cispo_jax import cli, data
from cispo_jax.config import fields
from cispo_jax.data import hf_data
from cispo_jax.model.tiny import build_char_tokenizer
from cispo_jax.task import TaskConfig, make_sources

ROWS = [{"question": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1), "level": i % 3,
         "source": "synthetic"} for i in range(40)]
CHATS = [{"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"What is {i} times 2?"}], "answer": str(2 * i)} for i in range(6)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("datasets")
  ds = datasets.Dataset.from_list(ROWS)
  out = {"parquet": str(d / "x.parquet"), "jsonl": str(d / "x.jsonl"), "json": str(d / "x.json"),
         "csv": str(d / "x.csv"), "disk": str(d / "saved"), "arrow": str(d / "x.arrow"), "dict": str(d / "dict")}
  ds.to_parquet(out["parquet"])
  ds.to_json(out["jsonl"], lines=True)
  ds.to_json(out["json"], lines=False)
  ds.to_csv(out["csv"], index=False)
  ds.save_to_disk(out["disk"])
  shutil.copy(os.path.join(out["disk"], "data-00000-of-00001.arrow"), out["arrow"])
  datasets.DatasetDict({"train": ds.select(range(30)), "test": ds.select(range(30, 40))}).save_to_disk(out["dict"])
  out["chat"] = str(d / "chat.parquet")
  datasets.Dataset.from_list(CHATS).to_parquet(out["chat"])
  return out


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json", "csv", "disk", "arrow"])
def test_every_format_gives_the_same_examples(files, fmt):
  examples = hf_data.load_examples(files[fmt], prompt_key="question")
  assert [(e.prompt, e.answer) for e in examples] == [(r["question"], r["answer"]) for r in ROWS]
  # every other column reaches the rewards, with its type (csv infers the int column as int too)
  assert examples[4].meta == {"level": 1, "source": "synthetic"}
  assert examples[7].origin == f"{files[fmt]}[row 7]"


def test_dataset_dict_splits(files):
  test = hf_data.load_examples(files["dict"] + "::test", prompt_key="question")
  assert [e.answer for e in test] == [r["answer"] for r in ROWS[30:]]
  with pytest.raises(ValueError, match=r"DatasetDict with splits \['test', 'train'\]; name one"):
    hf_data.load_examples(files["dict"], prompt_key="question")
  with pytest.raises(ValueError, match="no split 'dev'"):
    hf_data.load_examples(files["dict"] + "::dev", prompt_key="question")
  with pytest.raises(ValueError, match="a file is one split"):
    hf_data.load_examples(files["parquet"] + "::train", prompt_key="question")


def test_column_mapping(files):
  only = hf_data.load_examples(files["parquet"], prompt_key="question", extra_keys=("level",))
  assert only[5].meta == {"level": 2}
  none = hf_data.load_examples(files["parquet"], prompt_key="question", extra_keys=())
  assert none[5].meta == {}
  swapped = hf_data.load_examples(files["parquet"], prompt_key="answer", answer_key="question", extra_keys=())
  assert (swapped[3].prompt, swapped[3].answer) == (ROWS[3]["answer"], ROWS[3]["question"])
  chats = hf_data.load_examples(files["chat"], messages_key="messages")
  assert chats[2].prompt == "What is 2 times 2?" and chats[2].answer == "4"
  assert chats[2].meta["messages"] == CHATS[2]["messages"]


@pytest.mark.parametrize("rows,kw,match", [
    ([{"q": "a", "answer": "1"}], {}, r"no column 'prompt' \(columns: \['q', 'answer'\]\); set TaskConfig.prompt_key"),
    ([{"prompt": "a", "ans": "1"}], {}, r"no column 'answer' .*TaskConfig.answer_key"),
    ([{"prompt": "a", "answer": "1"}], {"extra_keys": ("lvl",)}, r"no column 'lvl' .*TaskConfig.extra_keys"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "", "answer": "2"}], {}, r"\[row 1\]: column 'prompt' must be a non-empty"),
    ([{"prompt": "a", "answer": None}], {}, r"\[row 0\]: column 'answer' must be a string or a number"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "42"}], "answer": "4"}],
     {"messages_key": "messages"}, r"\[row 0\] column 'messages': the last message must be the user's"),
    ([{"messages": [{"role": "bot", "content": "hi"}], "answer": "4"}], {"messages_key": "messages"},
     r"message 0 has role 'bot'"),
])
def test_bad_rows_name_file_row_and_column(tmp_path, rows, kw, match):
  path = str(tmp_path / "bad.jsonl")
  datasets.Dataset.from_list(rows).to_json(path, lines=True)
  with pytest.raises(ValueError, match=match) as err:
    hf_data.load_examples(path, **kw)
  assert path in str(err.value)


def test_bad_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="local paths only"):
    hf_data.load_examples("openai/gsm8k")
  (tmp_path / "x.txt").write_text("hello")
  with pytest.raises(ValueError, match=r"unknown file type '.txt'"):
    hf_data.load_examples(str(tmp_path / "x.txt"))
  with pytest.raises(ValueError, match="save_to_disk"):
    hf_data.load_examples(str(tmp_path))
  (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
  with pytest.raises(ValueError, match=r"broken.parquet: cannot be read as parquet"):
    hf_data.load_examples(str(tmp_path / "broken.parquet"))


def test_stream_over_a_dataset_resumes_exactly_and_shards(files):
  """PromptStream's guarantees hold for a loaded dataset: a restored state continues the same order,
  and two processes' shares of each global batch are disjoint and make up the whole batch."""
  source = hf_data.load_examples(files["parquet"], prompt_key="question")
  whole = data.PromptStream(source, batch_size=6, seed=3)
  full = [whole.next_batch() for _ in range(12)]  # 72 draws: runs into the second epoch
  first = data.PromptStream(source, batch_size=6, seed=3)
  for _ in range(5):
    first.next_batch()
  resumed = data.PromptStream(hf_data.load_examples(files["jsonl"], prompt_key="question"), batch_size=6, seed=3)
  resumed.restore(first.state())
  assert [[e.prompt for e in resumed.next_batch()] for _ in range(7)] == [[e.prompt for e in b] for b in full[5:]]
  shards = [data.PromptStream(source, batch_size=6, seed=3).shard(p, 2) for p in range(2)]
  for batch in full[:4]:
    parts = [s.next_batch() for s in shards]
    assert parts[0] + parts[1] == batch and not set(parts[0]) & set(parts[1])
  with pytest.raises(ValueError, match="num_examples=40, this stream has 30"):
    data.PromptStream(source[:30], batch_size=6, seed=3).restore(first.state())


def _model_cfg(max_pos=64, vocab=200):
  return types.SimpleNamespace(max_position_embeddings=max_pos, vocab_size=vocab)


def test_length_filter_drops_counted_or_refuses_naming_the_row(files, tmp_path, caplog):
  rows = [dict(r) for r in ROWS]
  for i in (3, 17, 18):
    rows[i]["question"] = "How many? " * 8  # 80 characters: one token each with the char tokenizer
  path = str(tmp_path / "long.parquet")
  datasets.Dataset.from_list(rows).to_parquet(path)
  tok = build_char_tokenizer()
  task = TaskConfig(task="dataset", train_path=path, eval_path=files["parquet"], prompt_key="question")
  train, held = make_sources(task, seed=0)
  with caplog.at_level(logging.WARNING):
    kept, _ = task.check_sources(train, held, tok, _model_cfg(), max_new_tokens=8, prompt_buckets=(64,),
                                 process_count=1)
  assert len(kept) == 37 and all(len(e.prompt) < 56 for e in kept)
  assert "dropped 3 of 40 prompts longer than 56 tokens" in caplog.text and f"{path}[row 3]" in caplog.text
  refuse = TaskConfig(task="dataset", train_path=path, eval_path=files["parquet"], prompt_key="question",
                      too_long="refuse")
  with pytest.raises(ValueError, match=rf"{path}\[row 3\]: prompt has 80 tokens.*3 of the 40 prompts"):
    refuse.check_sources(train, held, tok, _model_cfg(), max_new_tokens=8, prompt_buckets=(64,), process_count=1)


def test_dataset_task_from_gin(files):
  built = cli.parse(gin_params=[
      "TaskConfig.task = 'dataset'", f"TaskConfig.train_path = {files['dict'] + '::train'!r}",
      f"TaskConfig.eval_path = {files['dict'] + '::test'!r}", "TaskConfig.prompt_key = 'question'",
      "TaskConfig.extra_keys = ('level',)", "TaskConfig.rewards = ()"])
  task = built["TaskConfig"]
  train, held = make_sources(task, seed=0)
  assert (len(train), len(held)) == (30, 10) and held[0].meta == {"level": 0}
  assert task.reward_list() == [("math_answer", 1.0)]
  with pytest.raises(fields.ConfigTypeError, match=r"TaskConfig.extra_keys expects tuple\[str, \.\.\.\] \| None"):
    cli.parse(gin_params=["TaskConfig.task = 'dataset'", "TaskConfig.train_path = 'x.parquet'",
                             "TaskConfig.extra_keys = 'level'"])
  with pytest.raises(ValueError, match="messages_key / extra_keys map dataset columns"):
    TaskConfig(task="arithmetic", messages_key="messages")
  with pytest.raises(ValueError, match="train_path is required when TaskConfig.task='dataset'"):
    TaskConfig(task="dataset")
