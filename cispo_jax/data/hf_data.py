"""Prompts from local dataset files, read with Hugging Face `datasets`, offline.

A path is a file, parquet (.parquet, .pq), JSON / JSON lines (.json, .jsonl), CSV (.csv) or
arrow (.arrow), or a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
A DatasetDict with several splits needs one named: "path::split". Hub names are not accepted
and nothing is downloaded: files go through the packaged builders with `data_files`, with
HF_DATASETS_OFFLINE set and a private cache directory that is deleted after the load;
directories through `load_from_disk` (arrow + JSON metadata; nothing is unpickled).

Column mapping: the prompt is `prompt_key` (a non-empty string) or `messages_key` (a chat: a list
of {"role", "content"} ending in a user turn; its last user text becomes Example.prompt and the
whole chat goes to meta["messages"]); the answer is `answer_key` (a string or a number);
`extra_keys` columns go to Example.meta for the reward functions (None: every other column).
A bad row fails the load naming the file, the row (0-based, as `dataset[i]`) and the column.
Each example's origin is "path[row i]".
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

from cispo_jax.data.example import Example

FILE_BUILDERS = {".parquet": "parquet", ".pq": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv",
                 ".arrow": "arrow"}
ROLES = ("system", "user", "assistant")
SPLIT_SEP = "::"


def split_path(spec: str) -> tuple[str, str]:
  """("path", "split") of "path::split"; split is "" when not given."""
  path, sep, split = spec.rpartition(SPLIT_SEP)
  return (path, split) if sep else (spec, "")


def load_table(spec: str):
  """The `datasets.Dataset` at a local path ("path" or "path::split"), held in memory."""
  path, split = split_path(spec)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or directory (datasets are read from local paths only; "
                            "hub names are not downloaded)")
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import datasets

  # The environment is read when datasets is first imported, maybe before this: set the switches too.
  datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
  datasets.disable_progress_bars()
  if os.path.isdir(path):
    if not os.path.exists(os.path.join(path, "state.json")) and not os.path.exists(
        os.path.join(path, "dataset_dict.json")):
      raise ValueError(f"{path}: a directory must be written by Dataset.save_to_disk or DatasetDict.save_to_disk "
                       "(no state.json or dataset_dict.json in it)")
    loaded = datasets.load_from_disk(path, keep_in_memory=True)
  else:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_BUILDERS:
      raise ValueError(f"{path}: unknown file type {ext!r}; readable: {sorted(FILE_BUILDERS)} files, or a "
                       "save_to_disk directory")
    if split:
      raise ValueError(f"{spec}: a split ('{SPLIT_SEP}{split}') can only be named for a save_to_disk "
                       "DatasetDict directory; a file is one split")
    with tempfile.TemporaryDirectory(prefix="cispo_jax_datasets_") as cache:
      try:
        return datasets.load_dataset(FILE_BUILDERS[ext], data_files={"train": os.path.abspath(path)},
                                     split="train", cache_dir=cache, keep_in_memory=True)
      except Exception as e:  # noqa: BLE001 -- re-raised naming the file
        raise ValueError(f"{path}: cannot be read as {FILE_BUILDERS[ext]} ({type(e).__name__}: {e})") from e
  if isinstance(loaded, datasets.DatasetDict):
    splits = sorted(loaded)
    if not split and len(splits) == 1:
      split = splits[0]
    if split not in loaded:
      raise ValueError(f"{path}: a DatasetDict with splits {splits}; name one as '{path}{SPLIT_SEP}<split>'"
                       + (f" (no split {split!r})" if split else ""))
    return loaded[split]
  if split:
    raise ValueError(f"{spec}: {path} holds a single Dataset, not a DatasetDict with split {split!r}")
  return loaded


def _check_messages(value: Any, where: str) -> list[dict[str, str]]:
  if not isinstance(value, (list, tuple)) or not value:
    raise ValueError(f"{where}: must be a non-empty list of {{'role', 'content'}} messages, got {value!r:.80}")
  out = []
  for j, m in enumerate(value):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise ValueError(f"{where}: message {j} must have string 'role' and 'content', got {m!r:.80}")
    if m["role"] not in ROLES:
      raise ValueError(f"{where}: message {j} has role {m['role']!r}; allowed: {list(ROLES)}")
    out.append({"role": m["role"], "content": m["content"]})
  if out[-1]["role"] != "user":
    raise ValueError(f"{where}: the last message must be the user's (the model answers it), got "
                     f"{out[-1]['role']!r}")
  return out


def rows_to_examples(rows: Sequence[dict[str, Any]], source: str, *, prompt_key: str = "prompt",
                     answer_key: str = "answer", messages_key: str = "",
                     extra_keys: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> list[Example]:
  """Examples from row dicts by the column mapping; errors name `source`, the row and the column."""
  columns = list(columns if columns is not None else (rows[0].keys() if rows else []))
  text_key = messages_key or prompt_key
  needed = {text_key: "messages_key" if messages_key else "prompt_key", answer_key: "answer_key"}
  needed.update({key: "extra_keys" for key in extra_keys or [] if key not in needed})
  for key, field in needed.items():
    if key not in columns:
      raise ValueError(f"{source}: no column {key!r} (columns: {columns}); set TaskConfig.{field}")
  extras = [c for c in columns if c not in (text_key, answer_key)] if extra_keys is None else list(extra_keys)
  examples = []
  for i, row in enumerate(rows):
    where = f"{source}[row {i}]"
    answer = row[answer_key]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
      raise ValueError(f"{where}: column {answer_key!r} must be a string or a number, got {answer!r:.60}")
    meta = {k: row[k] for k in extras}
    if messages_key:
      messages = _check_messages(row[messages_key], f"{where} column {messages_key!r}")
      prompt = messages[-1]["content"]
      meta["messages"] = messages
    else:
      prompt = row[prompt_key]
      if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: column {prompt_key!r} must be a non-empty string, got {prompt!r:.60}")
    examples.append(Example(prompt, str(answer), meta, origin=where))
  if not examples:
    raise ValueError(f"{source}: no examples (the dataset is empty)")
  return examples


def load_examples(spec: str, *, prompt_key: str = "prompt", answer_key: str = "answer", messages_key: str = "",
                  extra_keys: Sequence[str] | None = None) -> list[Example]:
  """Every row of the local dataset `spec` ("path" or "path::split") as an Example."""
  table = load_table(spec)
  return rows_to_examples(table.to_list(), spec, prompt_key=prompt_key, answer_key=answer_key,
                          messages_key=messages_key, extra_keys=extra_keys, columns=table.column_names)
