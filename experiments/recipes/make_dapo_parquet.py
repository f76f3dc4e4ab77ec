"""DAPO-Math-17k as the recipe reads it: a parquet of `prompt` (the bare problem) and `answer`, offline.

DAPO's prompt wraps each problem in an instruction to end with an "Answer: ..." line, which the boxed-answer
reward (math_answer) does not read; the recipe asks for \\boxed{} instead, so the instruction is stripped here.
Reads either layout from a local file (parquet, json/jsonl, csv, arrow or a save_to_disk directory):
  BytedTsinghua-SIA/DAPO-Math-17k:   prompt = [{"role": "user", "content": ...}], reward_model.ground_truth
  open-r1/DAPO-Math-17k-Processed:   prompt = the user message as a string, solution
Rows with the same problem are kept once (the original repeats each problem many times).

  python experiments/recipes/make_dapo_parquet.py dapo-math-17k.parquet data/dapo_math.parquet
"""

from __future__ import annotations

import argparse
import os
import re

_PREFIX = re.compile(r"^\s*Solve the following math problem step by step\..*?where \$Answer is the answer to the "
                     r"problem\.\s*", re.DOTALL)
_SUFFIX = re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")


def problem_text(prompt) -> str:
  """The problem of one row's prompt (a chat or a string), DAPO's answer-format instruction removed."""
  if isinstance(prompt, (list, tuple)):
    users = [m["content"] for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
      raise ValueError(f"prompt {prompt!r:.80} has no user message")
    prompt = users[-1]
  if not isinstance(prompt, str):
    raise ValueError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
  return _SUFFIX.sub("", _PREFIX.sub("", prompt)).strip()


def answer_of(row: dict) -> str:
  if row.get("solution") not in (None, ""):
    return str(row["solution"])
  reward = row.get("reward_model")
  if isinstance(reward, dict) and reward.get("ground_truth") not in (None, ""):
    return str(reward["ground_truth"])
  raise ValueError("no answer: neither a `solution` column nor reward_model.ground_truth")


def convert(src: str, dst: str) -> int:
  """Write dst from src; returns the number of rows written. Errors name the row."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  from cispo_jax.data.hf_data import load_table

  out, seen = [], set()
  for i, row in enumerate(load_table(src).to_list()):
    try:
      problem, answer = problem_text(row["prompt"]), answer_of(row)
    except (KeyError, ValueError) as e:
      raise ValueError(f"{src}[row {i}]: {e}") from None
    if problem and problem not in seen:
      seen.add(problem)
      out.append({"prompt": problem, "answer": answer, "data_source": str(row.get("data_source", ""))})
  if not out:
    raise ValueError(f"{src}: no rows with a problem")
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(out), dst)
  return len(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("src", help="a local DAPO-Math-17k file or save_to_disk directory")
  p.add_argument("dst", help="the parquet to write (columns prompt, answer, data_source)")
  args = p.parse_args(argv)
  print(f"{args.dst}: {convert(args.src, args.dst)} problems")


if __name__ == "__main__":
  main()
