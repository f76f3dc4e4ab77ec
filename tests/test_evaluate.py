"""`python -m cispo_jax.evaluate` on a tiny chat model: every number it reports is recomputed from the
per-example outputs it writes, which are rescored here; the shards of a set cover it exactly once."""

import collections
import glob
import json
import os

import datasets
import jax
import numpy as np
import pytest

from cispo_jax import evaluate
from cispo_jax.evals.evaluator import shard_indices
from cispo_jax.model.tiny import build_char_tokenizer, make_tiny_model_dir
from cispo_jax.evals.passk import pass_at_k

import eval_reward_fns  # noqa: E402  (tests/ is on sys.path, as for the reward worker)
from test_chat_template import CHATML

GSM = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many now?",
        "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"} for i in range(5)]
SMALL = [{"question": f"{i}*3?", "answer": str(3 * i)} for i in range(3)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("eval")
  tok = build_char_tokenizer(chat_template=CHATML)
  tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
  model = make_tiny_model_dir(str(d / "model"), "qwen2", tokenizer=tok, hidden_size=32, num_layers=1,
                              num_heads=2, num_kv_heads=1, seed=1)
  datasets.Dataset.from_list(GSM).to_parquet(str(d / "gsm.parquet"))
  datasets.Dataset.from_list(SMALL).to_json(str(d / "small.jsonl"), lines=True)
  return {"model": model, "gsm": str(d / "gsm.parquet"), "small": str(d / "small.jsonl"), "dir": d}


def _run(setup, out_dir, *extra):
  argv = ["--model_dir", setup["model"], "--data", f"gsm={setup['gsm']}", "--data", f"small={setup['small']}",
          "--out_dir", str(out_dir), "--num_samples", "4", "--k", "1,2,4", "--max_new_tokens", "6",
          "--reward", "eval_reward_fns:first_lower", "--gin_param", "TaskConfig.prompt_format = 'chat'",
          "--gin_param", "TaskConfig.system_prompt = 'Answer briefly.'",
          "--gin_param", "TaskConfig.prompt_key = 'question'", *extra]
  return evaluate.main(argv, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def first(setup, tmp_path_factory):
  out = tmp_path_factory.mktemp("out")
  return out, _run(setup, out)


def _rows(out_dir):
  with open(os.path.join(out_dir, "outputs.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_reports_every_set_and_matches_its_outputs(setup, first, capsys):
  out, result = first
  assert result["sets"] == {"gsm": 5, "small": 3} and result["num_samples"] == 4
  rows = _rows(out)
  by = collections.defaultdict(list)
  for r in rows:
    by[r["set"], r["mode"]].append(r)
  assert {k: len(v) for k, v in by.items()} == {("gsm", "greedy"): 5, ("gsm", "sampled"): 20,
                                               ("small", "greedy"): 3, ("small", "sampled"): 12}
  for r in rows:  # each verdict is the reward's (run in the worker), recomputed here
    assert r["passed"] == bool(eval_reward_fns.first_lower(r["completion"], None))
    assert r["format_ok"] == bool(eval_reward_fns.has_digit(r["completion"], None))
    assert r["prompt"].startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    assert r["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n") and 1 <= r["length"] <= 6
  assert by["gsm", "greedy"][2]["answer"] == GSM[2]["answer"] and by["gsm", "greedy"][2]["origin"].endswith("[row 2]")
  m = result["metrics"]
  for name, size in result["sets"].items():
    greedy, sampled = by[name, "greedy"], by[name, "sampled"]
    assert sorted(r["index"] for r in greedy) == list(range(size))
    assert m[f"eval/{name}/greedy/pass_at_1"] == pytest.approx(np.mean([r["passed"] for r in greedy]))
    assert m[f"eval/{name}/greedy/length"] == pytest.approx(np.mean([r["length"] for r in greedy]))
    assert m[f"eval/{name}/greedy/format_error_rate"] == pytest.approx(np.mean([not r["format_ok"] for r in greedy]))
    correct = collections.Counter(r["index"] for r in sampled if r["passed"])
    for k in (1, 2, 4):
      want = np.mean([pass_at_k(4, correct[i], k) for i in range(size)])
      assert m[f"eval/{name}/sampled/pass_at_{k}"] == pytest.approx(want)
    assert m[f"eval/{name}/sampled/format_error_rate"] == pytest.approx(np.mean([not r["format_ok"] for r in sampled]))
  # the random tiny model gives a mix, so the checks above compare non-trivial numbers
  assert 0 < np.mean([r["passed"] for r in rows]) < 1 and 0 < np.mean([r["format_ok"] for r in rows]) < 1
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f)["metrics"] == m
  table = evaluate.format_table(result)
  assert table.splitlines()[0].split("  ")[0] == "set" and "pass@4 (n=4)" in table and "\ngsm " in table


def test_batched_run_pads_and_gives_the_same_numbers(setup, first, tmp_path):
  """--batch_size 2 splits 5 prompts into 3 calls (the last padded): the padding is neither scored
  nor written, and greedy decoding gives the same completions."""
  out, result = first
  again = _run(setup, tmp_path, "--batch_size", "2", "--seed", "0")
  rows, base = _rows(tmp_path), _rows(out)
  greedy = lambda rs: [(r["set"], r["index"], r["completion"]) for r in rs if r["mode"] == "greedy"]  # noqa: E731
  assert greedy(rows) == greedy(base)
  assert len(rows) == len(base)
  for key, value in result["metrics"].items():
    if "/greedy/" in key:
      assert again["metrics"][key] == pytest.approx(value), key


def test_two_processes_report_what_one_does(setup, first, tmp_path):
  """The eval command as two real jax.distributed processes (gloo, one CPU device each): each samples and
  scores its shard of every set and writes its own outputs; the reported numbers are the one-process run's."""
  import socket
  import subprocess
  import sys

  out, result = first
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join([os.path.dirname(tests_dir), tests_dir, os.environ.get("PYTHONPATH", "")]))
  argv = ["--model_dir", setup["model"], "--data", f"gsm={setup['gsm']}", "--data", f"small={setup['small']}",
          "--out_dir", str(tmp_path), "--num_samples", "4", "--k", "1,2,4", "--max_new_tokens", "6",
          "--reward", "eval_reward_fns:first_lower", "--gin_param", "TaskConfig.prompt_format = 'chat'",
          "--gin_param", "TaskConfig.system_prompt = 'Answer briefly.'",
          "--gin_param", "TaskConfig.prompt_key = 'question'"]
  procs = [subprocess.Popen([sys.executable, "-m", "cispo_jax.evaluate", "--coordinator_address", f"127.0.0.1:{port}",
                             "--num_processes", "2", "--process_id", str(pid), *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for pid in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  assert "greedy pass@1" in logs[0] and "greedy pass@1" not in logs[1]  # process 0 prints the table
  with open(tmp_path / "metrics.json") as f:
    got = json.load(f)
  assert got["sets"] == result["sets"]
  assert got["metrics"] == pytest.approx(result["metrics"])
  shards = [_rows_of(path) for path in sorted(glob.glob(str(tmp_path / "outputs.jsonl.p*")))]
  assert len(shards) == 2 and all(shards)  # both processes wrote rows of their own
  key = lambda r: (r["set"], r["mode"], r["index"], r["completion"], r["passed"])  # noqa: E731
  assert sorted(key(r) for rows in shards for r in rows) == sorted(key(r) for r in _rows(out))


def _rows_of(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_bad_arguments(setup, tmp_path):
  with pytest.raises(ValueError, match="--data 'gsm': expected NAME=PATH"):
    evaluate.main(["--model_dir", setup["model"], "--data", "gsm"])
  with pytest.raises(ValueError, match=r"TaskConfig.eval_k=\(8,\): each k must be in \[1, TaskConfig.eval_samples=4\]"):
    evaluate.main(["--model_dir", setup["model"], "--data", f"gsm={setup['gsm']}", "--num_samples", "4", "--k", "8"])
  with pytest.raises(FileNotFoundError, match="nope.parquet"):
    _run(setup, tmp_path, "--data", f"x={tmp_path / 'nope.parquet'}")


@pytest.mark.parametrize("n", [1, 5, 8, 9])
@pytest.mark.parametrize("nproc", [1, 2, 3])
@pytest.mark.parametrize("batch", [0, 1, 2, 4])
def test_shards_cover_each_example_once(n, nproc, batch):
  shards = [shard_indices(n, batch, p, nproc) for p in range(nproc)]
  assert len({s.shape for s in shards}) == 1  # every process runs the same calls
  real = np.concatenate([s.ravel() for s in shards])
  assert sorted(real[real >= 0].tolist()) == list(range(n))


def test_in_training_eval_sets_pass_at_k_outputs_and_profile(tmp_path):
  """Inside training, every eval_every: the held-out split and TaskConfig.eval_sets, greedy and sampled,
  logged to metrics.jsonl, outputs per evaluation; profile_iterations traces the chosen iteration."""
  from cispo_jax import data
  from cispo_jax.rl import losses
  from cispo_jax.runtime.metrics import read_metrics
  from cispo_jax.rl.optim import OptimConfig
  from cispo_jax.sharding import MeshConfig
  from cispo_jax.task import TaskConfig
  from cispo_jax.trainer import CheckpointConfig, EvalConfig, RLConfig, RolloutConfig, UpdateConfig
  from cispo_jax.trainer import Trainer

  model = make_tiny_model_dir(str(tmp_path / "m"), "qwen2", tokenizer=build_char_tokenizer(data.ALPHABET),
                              hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=0)
  extra = str(tmp_path / "extra.parquet")
  datasets.Dataset.from_list([{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(3)]).to_parquet(extra)
  task = TaskConfig(task="arithmetic", task_args={"max_operand": 9}, train_size=32, eval_size=4,
                    eval_sets={"extra": extra}, eval_samples=2, eval_k=(1, 2))
  rl = RLConfig(run_dir=str(tmp_path / "run"), model_dir=model, total_steps=2, prompts_per_step=2,
                profile_iterations=(2, 2), rollout=RolloutConfig(num_generations=2, max_new_tokens=3),
                update=UpdateConfig(num_iterations=1, num_minibatches=1), eval=EvalConfig(eval_every=2, eval_size=4),
                checkpoint=CheckpointConfig(save_every=2, export_final=False))
  trainer = Trainer(rl, losses.LossConfig(), OptimConfig(), MeshConfig(data=1, fsdp=1, tensor=1), task,
                    devices=jax.devices()[:1])
  try:
    summary = trainer.run()
  finally:
    trainer.close()
  rows = {r["iteration"]: r for r in read_metrics(rl.run_dir) if "eval/pass_at_1" in r}
  assert sorted(rows) == [0, 2]
  for it, row in rows.items():
    assert row["eval/pass_at_1"] == row["eval/heldout/greedy/pass_at_1"]
    for name in ("heldout", "extra"):
      for key in ("greedy/pass_at_1", "greedy/length", "sampled/pass_at_1", "sampled/pass_at_2", "sampled/length"):
        assert 0 <= row[f"eval/{name}/{key}"] <= 3, (it, name, key)
      assert row[f"eval/{name}/sampled/pass_at_1"] <= row[f"eval/{name}/sampled/pass_at_2"]
    with open(os.path.join(rl.run_dir, "eval", f"iteration_{it:06d}.jsonl")) as f:
      outputs = [json.loads(line) for line in f]
    assert collections.Counter((r["set"], r["mode"]) for r in outputs) == {
        ("heldout", "greedy"): 4, ("heldout", "sampled"): 8, ("extra", "greedy"): 3, ("extra", "sampled"): 6}
  assert summary["eval_start"] == rows[0]["eval/pass_at_1"] and summary["eval_end"] == rows[2]["eval/pass_at_1"]
  assert glob.glob(os.path.join(rl.run_dir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
