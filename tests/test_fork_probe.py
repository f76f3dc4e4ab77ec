"""The controlled fork task (a marker opens worked solutions) and experiments/fork_probe.py on a tiny model."""

import json
import os
import sys

import pytest

from cispo_jax import data

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import fork_probe  # noqa: E402
from tiny_bootstrap import tiny_bootstrap_gin  # noqa: E402  (tests/ is on sys.path)


def test_marker_opens_every_worked_solution_and_nothing_else():
  plain = data.make_task("arithmetic", 50, seed=0, ops="+", max_operand=99)
  marked = data.make_task("arithmetic", 50, seed=0, ops="+", max_operand=99, scratchpad_marker="(")
  for a, b in zip(plain, marked):
    assert (a.prompt, a.answer) == (b.prompt, b.answer)  # the problems and answers are unchanged
    assert b.meta["scratchpad"] == "(" + a.meta["scratchpad"]
    assert not data.reference_completion(b).startswith("(")  # a bare answer never opens with it
  for bad in ("1", "-", "x"):
    with pytest.raises(ValueError, match="scratchpad_marker"):
      data.make_task("arithmetic", 5, seed=0, ops="+", scratchpad_marker=bad)


def test_probe_on_a_tiny_model(tmp_path):
  tiny = tmp_path / "tiny.gin"
  tiny.write_text(tiny_bootstrap_gin(tmp_path / "bootstrap", sft_steps=40, sft_examples=256) + """
BootstrapConfig.sft_scratchpad_fraction = 0.5
TaskConfig.task_args = {'max_operand': 19, 'ops': '+', 'scratchpad_marker': '('}
TaskConfig.train_size = 64
TaskConfig.eval_size = 16
# a length bonus (tests/user_reward_fns.py): the longer worked solutions get A > 0 in a tiny model
TaskConfig.rewards = (('final_numeric', 1.0), ('user_reward_fns:length_bonus', 0.1))
RLConfig.prompts_per_step = 16
RolloutConfig.num_generations = 4
RolloutConfig.max_new_tokens = 12
EvalConfig.eval_size = 16
""")
  out = tmp_path / "out"
  fork_probe.main(["--gin_file", "cispo.gin", "--gin_file", str(tiny), "--losses", "cispo", "grpo",
                   "--updates", "3", "--learning_rate", "1e-2", "--out", str(out)])
  rec = json.loads((out / "fork_probe.json").read_text())
  assert 0 < rec["fork_tokens"] <= rec["marker_first"] <= rec["completions"] == 64
  cispo, grpo = rec["results"]["cispo"]["steps"], rec["results"]["grpo"]["steps"]
  assert len(cispo) == len(grpo) == 4
  # Before any update the policy is the sampler: r = 1, nothing removed, one P(fork) for both.
  for s in (cispo[0], grpo[0]):
    assert s["fork_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert s["diag/removed"] == pytest.approx(0.0, abs=1e-6) and s["fork_kept"] == pytest.approx(1.0)
  assert cispo[0]["p_fork"] == grpo[0]["p_fork"] and 0 < cispo[0]["p_fork"] < 1
  # CISPO never zeroes a token; GRPO's kept share is what its clip leaves (within [0, 1]).
  assert all(s["fork_zeroed_frac"] == 0 and s["diag/zeroed"] == 0 for s in cispo)
  assert all(0 <= s["fork_kept"] <= 1 for s in grpo)
  assert cispo[1]["p_fork"] != cispo[0]["p_fork"]  # the updates moved the fork token
  text = (out / "fork_probe.md").read_text()
  assert "| cispo |" in text and "| grpo |" in text and (out / "fork_probe.png").stat().st_size > 0


def test_probe_refuses_bad_input(tmp_path):
  from cispo_jax.rl.losses import LossConfig
  with pytest.raises(ValueError, match="unknown loss 'ppo2'"):
    fork_probe.loss_config(LossConfig(), "ppo2")
  with pytest.raises(SystemExit, match="no fork marker"):
    fork_probe.main(["--gin_file", "cispo.gin", "--out", str(tmp_path)])
