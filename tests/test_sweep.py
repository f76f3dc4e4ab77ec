"""The sweep runner on a tiny sweep: 2 arms x 2 seeds x 2 iterations, the table, and resume."""

import json
import os
import sys

import pytest

from cispo_jax.rl import diagnostics

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import sweep  # noqa: E402
from tiny_bootstrap import tiny_bootstrap_gin  # noqa: E402  (tests/ is on sys.path)


def _tiny_gin(tmp_path):
  """An overlay that shrinks the default experiment to seconds (after a loss file)."""
  path = tmp_path / "tiny.gin"
  path.write_text(tiny_bootstrap_gin(tmp_path / "bootstrap", sft_steps=20, sft_examples=64) + """
TaskConfig.task_args = {'max_operand': 9, 'ops': '+'}
TaskConfig.train_size = 64
TaskConfig.eval_size = 8
# a length bonus beside the answer check (tests/user_reward_fns.py): every group has reward variance,
# so every iteration updates even where the tiny policy never answers right
TaskConfig.rewards = (('final_numeric', 1.0), ('user_reward_fns:length_bonus', 0.1))
RLConfig.total_steps = 2
RLConfig.prompts_per_step = 8  # the tests see 8 CPU devices: batches split 8 ways
RolloutConfig.num_generations = 2
RolloutConfig.max_new_tokens = 6
EvalConfig.eval_every = 1
EvalConfig.eval_size = 8
CheckpointConfig.save_every = 1
CheckpointConfig.export_final = False
""")
  return str(path)


def test_tiny_sweep_table_and_resume(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  tiny = _tiny_gin(tmp_path)
  root, out = str(tmp_path / "runs"), str(tmp_path / "results")
  argv = [f"cispo=cispo.gin+{tiny}", f"grpo=grpo.gin+{tiny}", "--seeds", "0", "1", "--root", root, "--out", out,
          "--in_process", "--threshold", "0.3"]
  from cispo_jax import train
  calls = []
  real_main = train.main
  monkeypatch.setattr(train, "main", lambda a: calls.append(a) or real_main(a))

  summary = sweep.main(argv)
  assert len(calls) == 4
  for arm in ("cispo", "grpo"):
    for seed in (0, 1):
      d = os.path.join(root, f"{arm}-s{seed}")
      assert os.path.exists(os.path.join(d, "summary.json"))
      assert f"RLConfig.seed = {seed}" in open(os.path.join(d, "operative_config.gin")).read()
    assert summary["arms"][arm]["seeds"] == [0, 1]
  # one shared start: every run of both arms loaded the same bootstrap model
  starts = {tuple(v) for v in summary["starts"].values()}
  assert len(starts) == 1 and len(next(iter(starts))) == 1
  text = open(os.path.join(out, "results.md")).read()
  assert "| cispo | 2 |" in text and "| grpo | 2 |" in text and "WARNING" not in text
  assert json.load(open(os.path.join(out, "results.json")))["reference"] == "cispo"
  assert os.path.exists(os.path.join(out, "curves_step.png"))
  # Every update logged the fork-token diagnostic, whatever the loss.
  rows = [json.loads(line) for arm in ("cispo", "grpo") for seed in (0, 1)
          for line in open(os.path.join(root, f"{arm}-s{seed}", "metrics.jsonl"))]
  updates = [r for r in rows if "train/loss" in r]
  n_diag = 2 + 3 * len(diagnostics.SIGNS) * len(diagnostics.BUCKETS)  # the totals, and 3 per cell
  assert updates and all(sum(k.startswith("train/diag/") for k in r) == n_diag for r in updates)
  assert "Command: `python experiments/sweep.py cispo=" in text

  # Resume: finished runs are skipped; a run without summary.json is run again (and resumes from
  # its checkpoint, which is at the last iteration: nothing is retrained).
  os.remove(os.path.join(root, "grpo-s1", "summary.json"))
  calls.clear()
  sweep.main(argv)
  assert len(calls) == 1 and calls[0][-1] == os.path.join(root, "grpo-s1")
  assert os.path.exists(os.path.join(root, "grpo-s1", "summary.json"))


def test_arm_specs(tmp_path):
  arm = sweep.parse_arm("cap2=cispo.gin+depth_u16.gin@LossConfig.epsilon_high=2.0")
  assert arm.name == "cap2" and arm.bindings == ("LossConfig.epsilon_high=2.0",)
  assert [os.path.basename(f) for f in arm.gin_files] == ["cispo.gin", "depth_u16.gin"]
  assert sweep.parse_arm("dapo.gin+depth_u8.gin").name == "dapo+depth_u8"
  argv = sweep.train_argv(arm, 3, "r", ["RLConfig.total_steps=5"])
  assert argv[-4:] == ["--seed", "3", "--run_dir", os.path.join("r", "cap2-s3")]
  assert argv.index("--gin_param=LossConfig.epsilon_high=2.0") < argv.index("--gin_param=RLConfig.total_steps=5")
  with pytest.raises(ValueError, match="no gin file 'nope.gin'"):
    sweep.parse_arm("nope.gin")
  with pytest.raises(ValueError, match="not Config.field=value"):
    sweep.parse_arm("cispo.gin@oops")
  with pytest.raises(ValueError, match="-s<digits>"):
    sweep.parse_arm("x-s1=cispo.gin")


def test_a_bad_arm_fails_before_any_run(tmp_path):
  with pytest.raises(SystemExit, match="arm 'bad'.*epsilon_high"):
    sweep.main(["cispo.gin", "bad=cispo.gin@LossConfig.epsilon_high=0.2", "--root", str(tmp_path / "r")])
  assert not os.path.exists(tmp_path / "r")  # nothing ran


def test_every_suite_arm_parses():
  for suite, specs in sweep.SUITES.items():
    arms = [sweep.parse_arm(s) for s in specs]
    assert len({a.name for a in arms}) == len(arms), suite
    sweep.check_configs(arms, [])  # every arm's configs build


def test_dry_run_prints_the_commands(capsys):
  sweep.main(["--suite", "quick", "--seeds", "0", "1", "--dry_run", "--root", "r"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 * len(sweep.SUITES["quick"])
  assert any("depth_u16.gin" in line and "cispo_u16-s1" in line for line in lines)


def test_seeds_vary_the_training_problems_not_the_held_out_sample():
  from cispo_jax.task import TaskConfig, make_sources
  cfg = TaskConfig(task="arithmetic", task_args={"max_operand": 99, "ops": "+"}, train_size=200, eval_size=32)
  (train0, held0), (train3, held3) = make_sources(cfg, seed=0), make_sources(cfg, seed=3)
  assert held0 == held3
  assert list(train0) != list(train3)
  assert not {e.prompt for e in held0} & {e.prompt for e in train3}  # still disjoint


def test_a_run_that_fails_is_reported(tmp_path, capsys):
  """A run that crashes (here: no model where model_dir points) is counted failed, not fatal."""
  with pytest.raises(SystemExit, match="no run wrote metrics \\(failed: broken-s0\\)"):
    sweep.main([f"broken=cispo.gin@RLConfig.model_dir='{tmp_path / 'no_model'}'", "--seeds", "0",
                "--root", str(tmp_path / "r"), "--in_process"])
  assert "exit 1" in capsys.readouterr().out
