"""Prompt sources: synthetic tasks, the safe expression parser, JSONL, PromptStream."""

import json
import re

import pytest

from cispo_jax.data import (ALPHABET, ArithmeticTask, CountdownTask, Example, ExprError,
                            PromptStream, check_countdown, evaluate, holdout_split, load_jsonl,
                            make_task, parse_expression, reference_completion)


def _two_operand(prompt):
  a, op, b = re.fullmatch(r"(\d+)([-+*/])(\d+)=", prompt).groups()
  a, b = int(a), int(b)
  if op == "/":
    assert a % b == 0
    return a // b
  return {"+": a + b, "-": a - b, "*": a * b}[op]


def test_arithmetic_deterministic_and_correct():
  task = ArithmeticTask(300, seed=3, ops="+-*/", max_operand=50)
  again = ArithmeticTask(300, seed=3, ops="+-*/", max_operand=50)
  assert list(task) == list(again)
  assert [ex.prompt for ex in ArithmeticTask(300, seed=4, ops="+-*/", max_operand=50)] != [ex.prompt for ex in task]
  assert len({ex.prompt for ex in task}) == 300  # distinct problems
  for ex in task:
    assert int(ex.answer) == _two_operand(ex.prompt)
    assert ex.meta["task"] == "arithmetic" and reference_completion(ex) == ex.answer
  assert {op for ex in task for op in "+-*/" if op in ex.prompt[1:]} == set("+-*/")


def test_arithmetic_precedence_with_three_operands():
  task = ArithmeticTask(50, seed=0, ops="+*", num_operands=3, max_operand=9)
  for ex in task:
    a, op1, b, op2, c = re.fullmatch(r"(\d)([+*])(\d)([+*])(\d)=", ex.prompt).groups()
    a, b, c = int(a), int(b), int(c)
    expected = {("+", "+"): a + b + c, ("+", "*"): a + b * c,
                ("*", "+"): a * b + c, ("*", "*"): a * b * c}[op1, op2]
    assert int(ex.answer) == expected


def test_countdown_solutions_verify_and_wrong_answers_do_not():
  task = CountdownTask(200, seed=1)
  assert list(task) == list(CountdownTask(200, seed=1))
  for ex in task:
    numbers, target, solution = ex.meta["numbers"], ex.meta["target"], ex.meta["solution"]
    assert ex.prompt == f"{target}:{','.join(map(str, numbers))}=" and ex.answer == str(target)
    assert reference_completion(ex) == solution
    assert sorted(parse_expression(solution)[1]) == sorted(numbers)
    assert check_countdown(solution, numbers, target)
    assert not check_countdown(solution, numbers, target + 1)
    assert not check_countdown(f"{solution}+{numbers[0]}", numbers, target + numbers[0])  # reuse
    assert 1 <= target <= 100 and target not in numbers


def test_alphabet_covers_every_builtin_string():
  chars = set()
  for task in (ArithmeticTask(500, ops="+-*/"), ArithmeticTask(100, ops="+-*", num_operands=3),
               CountdownTask(500), CountdownTask(100, split="eval", num_numbers=4)):
    for ex in task:
      chars |= set(ex.prompt + ex.answer + reference_completion(ex))
  assert chars <= set(ALPHABET)
  assert len(ALPHABET) == len(set(ALPHABET))


@pytest.mark.parametrize("make", [
    lambda split, seed: ArithmeticTask(2000 if split == "train" else 200, seed=seed, split=split,
                                       max_operand=40),
    lambda split, seed: CountdownTask(1000 if split == "train" else 100, seed=seed, split=split),
])
def test_eval_split_is_disjoint_from_train(make):
  train = {ex.prompt for ex in make("train", 0)}
  held = {ex.prompt for ex in make("eval", 0)} | {ex.prompt for ex in make("eval", 123)}
  assert held and not train & held


def test_countdown_split_uses_the_problem_not_the_number_order():
  train = CountdownTask(400, seed=0)
  held = CountdownTask(100, seed=5, split="eval")
  key = lambda ex: (tuple(sorted(ex.meta["numbers"])), ex.meta["target"])
  assert not {key(ex) for ex in train} & {key(ex) for ex in held}


def test_task_argument_errors():
  with pytest.raises(ValueError, match="too large"):
    ArithmeticTask(200, max_operand=9, ops="+", split="eval")  # ~10 of 100 problems are eval
  with pytest.raises(ValueError, match="unknown task 'sudoku'.*arithmetic"):
    make_task("sudoku", 10)
  with pytest.raises(ValueError, match="no argument 'max_operands'.*max_operand"):
    make_task("arithmetic", 10, max_operands=9)
  with pytest.raises(ValueError, match="split"):
    make_task("countdown", 10, split="test")
  with pytest.raises(ValueError, match="ops"):
    ArithmeticTask(10, ops="+^")
  assert len(make_task("countdown", 7, seed=2, num_numbers=4)) == 7


def test_expression_parser_values():
  assert evaluate("2+3*4") == 14
  assert evaluate("(2+3)*4") == 20
  assert evaluate("7/2*2") == 7  # exact fractions, no float rounding
  assert evaluate(" 10 - 4 - 3 ") == 3  # left associative
  assert evaluate("100/10/5") == 2
  assert parse_expression("(3+3)*7")[1] == [3, 3, 7]


@pytest.mark.parametrize("text", [
    "__import__('os')", "__import__('os').system('true')", "1+", "()", "2**10", "1e3", "-3+5",
    "3 + x", "9" * 13, "(" * 40 + "1" + ")" * 40, "1/(2-2)", "", "1 2", "open('f')", "1+1" * 100,
])
def test_expression_parser_rejects(text):
  with pytest.raises(ExprError):
    parse_expression(text)
  assert not check_countdown(text, [1, 2, 3, 10], 2)


def test_countdown_checks_numbers_with_multiplicity():
  assert check_countdown("3*3+7", [3, 3, 7], 16)
  assert not check_countdown("3*3*3", [3, 3, 7], 27)
  assert not check_countdown("7+7", [3, 7], 14)
  assert not check_countdown("8+6", [3, 7], 14)  # numbers not given
  assert check_countdown("(25-7)/3", [3, 7, 25], 6)
  assert check_countdown("25+7", [3, 7, 25], 32)  # unused numbers are fine


def _write(tmp_path, name, lines):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return path


def test_load_jsonl_reads_fields_and_meta(tmp_path):
  path = _write(tmp_path, "ok.jsonl", [
      json.dumps({"prompt": "1+1=", "answer": "2", "level": 1}), "",
      json.dumps({"prompt": "2*3=", "answer": 6})])
  assert load_jsonl(path) == [Example("1+1=", "2", {"level": 1}), Example("2*3=", "6", {})]
  path = _write(tmp_path, "keys.jsonl", [json.dumps({"q": "x?", "a": "y"})])
  assert load_jsonl(path, prompt_key="q", answer_key="a") == [Example("x?", "y", {})]


@pytest.mark.parametrize("bad_line, match", [
    ('{"prompt": "1+1=", "answer": ', r"bad\.jsonl:3: invalid JSON"),
    ('{"prompt": "1+1="}', r"bad\.jsonl:3: missing key 'answer'"),
    ('{"answer": "2"}', r"bad\.jsonl:3: missing key 'prompt'"),
    ('{"prompt": 12, "answer": "2"}', r"bad\.jsonl:3: key 'prompt' must be a non-empty string"),
    ('{"prompt": "1+1=", "answer": null}', r"bad\.jsonl:3: key 'answer'"),
    ('["1+1=", "2"]', r"bad\.jsonl:3: expected a JSON object"),
])
def test_load_jsonl_errors_name_file_and_line(tmp_path, bad_line, match):
  good = json.dumps({"prompt": "1+1=", "answer": "2"})
  path = _write(tmp_path, "bad.jsonl", [good, good, bad_line])
  with pytest.raises(ValueError, match=match):
    load_jsonl(path)


def test_load_jsonl_empty_file(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text("\n\n")
  with pytest.raises(ValueError, match="empty.jsonl: no examples"):
    load_jsonl(path)


def test_holdout_split_partitions_examples():
  examples = [Example(f"{i}+1=", str(i + 1)) for i in range(400)]
  train, held = holdout_split(examples, eval_fraction=0.25)
  assert len(train) + len(held) == 400 and 50 < len(held) < 150
  assert not {ex.prompt for ex in train} & {ex.prompt for ex in held}


def _source(n):
  return [Example(str(i), str(i)) for i in range(n)]


def test_stream_epochs_are_permutations_and_deterministic():
  stream = PromptStream(_source(10), batch_size=4, seed=7)
  drawn = [int(ex.prompt) for _ in range(5) for ex in stream.next_batch()]  # 20 = two epochs
  assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
  assert drawn[:10] != drawn[10:]  # a new order each epoch
  assert stream.state()["epoch"] == 2 and stream.state()["position"] == 0
  again = PromptStream(_source(10), batch_size=4, seed=7)
  assert [int(ex.prompt) for _ in range(5) for ex in again.next_batch()] == drawn
  other = PromptStream(_source(10), batch_size=4, seed=8)
  assert [int(ex.prompt) for _ in range(5) for ex in other.next_batch()] != drawn


def test_stream_resume_reproduces_uninterrupted_run():
  source = _source(13)
  full = PromptStream(source, batch_size=5, seed=1)
  expected = [full.next_batch() for _ in range(8)]
  first = PromptStream(source, batch_size=5, seed=1)
  head = [first.next_batch() for _ in range(3)]
  saved = json.loads(json.dumps(first.state()))  # what a checkpoint stores
  resumed = PromptStream(source, batch_size=5, seed=1)
  resumed.restore(saved)
  assert head + [resumed.next_batch() for _ in range(5)] == expected
  with pytest.raises(ValueError, match="seed"):
    PromptStream(source, batch_size=5, seed=2).restore(saved)
  with pytest.raises(ValueError, match="num_examples"):
    PromptStream(_source(12), batch_size=5, seed=1).restore(saved)


def test_stream_batch_larger_than_source():
  stream = PromptStream(_source(3), batch_size=7, seed=0)
  batch = [int(ex.prompt) for ex in stream.next_batch()]
  assert len(batch) == 7 and sorted(batch[:3]) == [0, 1, 2] and sorted(batch[3:6]) == [0, 1, 2]


def test_stream_shards_partition_the_global_batch():
  source = _source(23)
  whole = PromptStream(source, batch_size=8, seed=3)
  shards = [PromptStream(source, batch_size=8, seed=3).shard(i, 4) for i in range(4)]
  for _ in range(6):
    parts = [shard.next_batch() for shard in shards]
    assert all(len(part) == 2 for part in parts)
    assert [ex for part in parts for ex in part] == whole.next_batch()
  assert {json.dumps(s.state()) for s in shards} == {json.dumps(whole.state())}
  with pytest.raises(ValueError, match="divisible"):
    PromptStream(source, batch_size=6, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="empty"):
    PromptStream([], batch_size=2)
