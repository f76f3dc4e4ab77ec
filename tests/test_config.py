"""gin files, --gin_param bindings and the seed's shorthand flags reach the configs; bad keys fail early."""

from pathlib import Path

import pytest

from cispo_jax import config


def test_seed_flags_reach_the_loss_config():
  built = config.parse_args(["--loss_type", "cispo", "--epsilon_high", "5.0", "--num_generations", "4",
                             "--learning_rate", "3e-4", "--num_iterations", "3"])
  assert built["LossConfig"].loss_type == "cispo" and built["LossConfig"].epsilon_high == 5.0
  assert built["RLConfig"].num_generations == 4 and built["RLConfig"].num_iterations == 3
  assert built["OptimConfig"].learning_rate == 3e-4
  assert "LossConfig.epsilon_high = 5.0" in built["operative"]


def test_gin_file_then_cli_overrides(tmp_path):
  gin_file = tmp_path / "exp.gin"
  gin_file.write_text("LossConfig.loss_type = 'dapo'\nLossConfig.epsilon_high = 0.28\n"
                      "RLConfig.total_steps = 7\nTaskConfig.task_args = {'max_operand': 19}\n"
                      "MeshConfig.data = 1\n")
  built = config.parse_args(["--gin_file", str(gin_file), "--gin_param", "RLConfig.total_steps = 9",
                             "--loss_type", "grpo"])
  assert built["LossConfig"].loss_type == "grpo"  # the CLI wins over the file
  assert built["LossConfig"].epsilon_high == 0.28  # the file's value stays
  assert built["RLConfig"].total_steps == 9
  assert built["TaskConfig"].task_args == {"max_operand": 19}
  assert built["MeshConfig"].data == 1


def test_unknown_key_fails_with_its_name(tmp_path):
  with pytest.raises(ValueError, match="epsilon_hihg"):
    config.parse_args(["--gin_param", "LossConfig.epsilon_hihg = 5.0"])
  bad = tmp_path / "bad.gin"
  bad.write_text("RLConfig.total_steps = 3\nRLConfig.num_generatoins = 4\n")
  with pytest.raises(ValueError, match=r"num_generatoins[\s\S]*bad.gin:2|bad.gin[\s\S]*line 2"):
    config.parse_args(["--gin_file", str(bad)])
  with pytest.raises((ValueError, KeyError), match="NoSuchConfig"):
    config.parse_args(["--gin_param", "NoSuchConfig.x = 1"])


def test_bad_values_fail_before_compilation():
  with pytest.raises(ValueError, match="epsilon_high"):  # a CISPO cap below 1 clamps every on-policy token
    config.parse_args(["--loss_type", "cispo", "--epsilon_high", "0.2"])
  with pytest.raises(ValueError, match="loss_type"):
    config.parse_args(["--loss_type", "ppo2"])
  with pytest.raises(ValueError, match="RLConfig.num_generations"):
    config.parse_args(["--num_generations", "0"])
  with pytest.raises(SystemExit):  # argparse: an unknown flag
    config.parse_args(["--epsilon_hi", "5"])


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "experiments").glob("*.gin")))
def test_experiment_files_parse(name):
  """Every ablation arm in experiments/ builds valid configs (on top of default.gin)."""
  files = [str(Path(__file__).parents[1] / "experiments" / name)]
  if name == "off_policy_depth.gin":  # a modifier, combined with a loss file
    files.insert(0, str(Path(__file__).parents[1] / "experiments" / "grpo.gin"))
  built = config.parse(files)
  assert built["TaskConfig"].task == "arithmetic"
  if name.startswith("cispo"):
    assert built["LossConfig"].loss_type == "cispo"


def test_default_experiment_is_cispo_with_the_seed_cap():
  built = config.parse()
  assert built["LossConfig"].loss_type == "cispo" and built["LossConfig"].epsilon_high == 5.0
  assert built["LossConfig"].cispo_mode == "absolute"
