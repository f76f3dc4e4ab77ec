"""Synthetic word problems in GSM8K's format, made here (nothing is downloaded).

Each row has GSM8K's two columns: `question`, and `answer`, a worked solution whose calculator
annotations look like GSM8K's (`12 + 7 = <<12+7=19>>19`) and which ends in `#### 19`. One- and
two-step problems over a few templates; the split is by row, deterministic in --seed.

  python experiments/gsm8k_synth/make_data.py   # -> experiments/gsm8k_synth/data/{train,test}.parquet
"""

from __future__ import annotations

import argparse
import os
import random

NAMES = ["Tom", "Ana", "Lee", "Mia", "Sam", "Ivy", "Ben", "Zoe"]
ITEMS = ["apples", "pens", "books", "cards", "shells", "stamps"]


def _calc(a: int, op: str, b: int) -> tuple[str, int]:
  r = {"+": a + b, "-": a - b, "*": a * b}[op]
  return f"{a} {op} {b} = <<{a}{op}{b}={r}>>{r}", r


def problem(rng: random.Random) -> dict[str, str]:
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  kind = rng.choice(["add", "sub", "mul", "add_sub"])
  if kind == "add":
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    step, r = _calc(a, "+", b)
    q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    sol = f"{name} has {step} {item} now."
  elif kind == "sub":
    a = rng.randint(10, 40)
    b = rng.randint(1, a - 1)
    step, r = _calc(a, "-", b)
    q = f"{name} had {a} {item} and gave {b} away. How many {item} are left?"
    sol = f"{name} has {step} {item} left."
  elif kind == "mul":
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    step, r = _calc(a, "*", b)
    q = f"A box holds {a} {item}. How many {item} are in {b} boxes?"
    sol = f"There are {step} {item}."
  else:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    step1, s = _calc(a, "+", b)
    step2, r = _calc(s, "-", c)
    q = f"{name} has {a} {item}, gets {b} more, then gives {c} away. How many {item} does {name} have?"
    sol = f"{name} has {step1}, then {step2} {item}."
  return {"question": q, "answer": f"{sol}\n#### {r}"}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out_dir", default=os.path.join(os.path.dirname(__file__), "data"))
  p.add_argument("--train", type=int, default=400)
  p.add_argument("--test", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  import datasets

  rng, seen, rows = random.Random(args.seed), set(), []
  while len(rows) < args.train + args.test:
    row = problem(rng)
    if row["question"] not in seen:  # train and test share no question
      seen.add(row["question"])
      rows.append(row)
  os.makedirs(args.out_dir, exist_ok=True)
  for split, part in (("train", rows[:args.train]), ("test", rows[args.train:])):
    path = os.path.join(args.out_dir, f"{split}.parquet")
    datasets.Dataset.from_list(part).to_parquet(path)
    print(f"{path}: {len(part)} rows")


if __name__ == "__main__":
  main()
