"""gin files, --gin_param bindings and the seed's shorthand flags reach the configs; bad keys fail early."""

import dataclasses
import logging
from pathlib import Path

import pytest

from cispo_jax import cli
from cispo_jax.config import operative as operative_config
from cispo_jax.config.operative import ADDED, ADDED_NOT_DEFAULT, RENAMED
from cispo_jax.trainer import SECTIONS, RLConfig, RolloutConfig, UpdateConfig


def test_seed_flags_reach_the_loss_config():
  built = cli.parse_args(["--loss_type", "cispo", "--epsilon_high", "5.0", "--num_generations", "4",
                             "--learning_rate", "3e-4", "--num_iterations", "3"])
  assert built["LossConfig"].loss_type == "cispo" and built["LossConfig"].epsilon_high == 5.0
  assert built["RLConfig"].rollout.num_generations == 4 and built["RLConfig"].update.num_iterations == 3
  assert built["OptimConfig"].learning_rate == 3e-4
  assert "LossConfig.epsilon_high = 5.0" in built["operative"]


def test_gin_file_then_cli_overrides(tmp_path):
  gin_file = tmp_path / "exp.gin"
  gin_file.write_text("LossConfig.loss_type = 'dapo'\nLossConfig.epsilon_high = 0.28\n"
                      "RLConfig.total_steps = 7\nTaskConfig.task_args = {'max_operand': 19}\n"
                      "MeshConfig.data = 1\n")
  built = cli.parse_args(["--gin_file", str(gin_file), "--gin_param", "RLConfig.total_steps = 9",
                             "--loss_type", "grpo"])
  assert built["LossConfig"].loss_type == "grpo"  # the CLI wins over the file
  assert built["LossConfig"].epsilon_high == 0.28  # the file's value stays
  assert built["RLConfig"].total_steps == 9
  assert built["TaskConfig"].task_args == {"max_operand": 19}
  assert built["MeshConfig"].data == 1


def test_unknown_key_fails_with_its_name(tmp_path):
  with pytest.raises(ValueError, match="epsilon_hihg"):
    cli.parse_args(["--gin_param", "LossConfig.epsilon_hihg = 5.0"])
  bad = tmp_path / "bad.gin"
  bad.write_text("RLConfig.total_steps = 3\nRLConfig.num_generatoins = 4\n")
  with pytest.raises(ValueError, match=r"num_generatoins[\s\S]*bad.gin:2|bad.gin[\s\S]*line 2"):
    cli.parse_args(["--gin_file", str(bad)])
  with pytest.raises((ValueError, KeyError), match="NoSuchConfig"):
    cli.parse_args(["--gin_param", "NoSuchConfig.x = 1"])


def test_bad_values_fail_before_compilation():
  with pytest.raises(ValueError, match="epsilon_high"):  # a CISPO cap below 1 clamps every on-policy token
    cli.parse_args(["--loss_type", "cispo", "--epsilon_high", "0.2"])
  with pytest.raises(ValueError, match="loss_type"):
    cli.parse_args(["--loss_type", "ppo2"])
  with pytest.raises(ValueError, match="RolloutConfig.num_generations"):
    cli.parse_args(["--num_generations", "0"])
  with pytest.raises(SystemExit):  # argparse: an unknown flag
    cli.parse_args(["--epsilon_hi", "5"])


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "experiments").glob("*.gin")))
def test_experiment_files_parse(name):
  """Every ablation arm in experiments/ builds valid configs (on top of default.gin)."""
  files = [str(Path(__file__).parents[1] / "experiments" / name)]
  if name == "off_policy_depth.gin":  # a modifier, combined with a loss file
    files.insert(0, str(Path(__file__).parents[1] / "experiments" / "grpo.gin"))
  built = cli.parse(files)
  assert built["TaskConfig"].task == "arithmetic"
  if name.startswith("cispo"):
    assert built["LossConfig"].loss_type == "cispo"


def test_default_experiment_is_cispo_with_the_seed_cap():
  built = cli.parse()
  assert built["LossConfig"].loss_type == "cispo" and built["LossConfig"].epsilon_high == 5.0
  assert built["LossConfig"].cispo_mode == "absolute"


def test_rl_config_is_built_from_its_sections(tmp_path):
  gin_file = tmp_path / "exp.gin"
  gin_file.write_text("RLConfig.total_steps = 7\nRolloutConfig.temperature = 0.7\nUpdateConfig.tis_cap = 2.0\n"
                      "EvalConfig.eval_size = 32\nCheckpointConfig.keep_checkpoints = 3\nModelRunConfig.remat = True\n")
  built = cli.parse([str(gin_file)], ["UpdateConfig.num_minibatches = 4"], {"max_new_tokens": "12"})
  rl = built["RLConfig"]
  for field, cls in SECTIONS.items():
    assert getattr(rl, field) is built[cls.__name__]
  assert (rl.total_steps, rl.rollout.temperature, rl.rollout.max_new_tokens) == (7, 0.7, 12)
  assert (rl.update.tis_cap, rl.update.num_minibatches, rl.eval.eval_size) == (2.0, 4, 32)
  assert rl.checkpoint.keep_checkpoints == 3 and rl.model_run.remat is True
  flat = RLConfig().replace(temperature=0.7, tis_cap=2.0, total_steps=3)  # flat names go to their section
  assert flat == RLConfig(total_steps=3, rollout=RolloutConfig(temperature=0.7), update=UpdateConfig(tis_cap=2.0))


def test_operative_config_names_each_field_once_under_its_section_and_parses_back(tmp_path):
  built = cli.parse()
  keys = list(operative_config.bindings(built["operative"]))
  assert len(keys) == len(set(keys))
  assert "RolloutConfig.temperature" in keys and "ModelRunConfig.logprob_chunk" in keys
  assert not set(keys) & set(RENAMED) and not {f"RLConfig.{s}" for s in SECTIONS} & set(keys)
  again = tmp_path / "operative.gin"
  again.write_text(built["operative"])
  rebuilt = cli.parse([str(again)])
  assert all(rebuilt[name] == built[name] for name in cli.CONFIG_CLASSES)


def test_renamed_keys_are_the_sections_fields():
  """RENAMED is history, written out (config/operative.py): each old RLConfig key maps to the same field name
  in a section that still has it, and none is a field RLConfig still holds itself."""
  import dataclasses
  fields = {f"{cls.__name__}.{f.name}" for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
  assert set(RENAMED.values()) <= fields
  assert all(old == f"RLConfig.{new.split('.')[1]}" for old, new in RENAMED.items())
  own = {f.name for f in dataclasses.fields(RLConfig)}
  assert not {old.split(".")[1] for old in RENAMED} & own


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_every_old_rl_config_key_is_refused_with_its_new_name(old):
  with pytest.raises(ValueError, match=rf"--gin_param '{old} = 1': {old} is now {RENAMED[old]}$"):
    cli.parse_args(["--gin_param", f"{old} = 1"])


def test_old_rl_config_keys_in_gin_files_name_file_and_line(tmp_path):
  base = tmp_path / "base.gin"
  base.write_text("include 'default.gin'\n\nRLConfig.temperature = 0.7\n")
  exp = tmp_path / "exp.gin"
  exp.write_text(f"include '{base}'\nRLConfig.seed = 1\nscoped/RLConfig.num_minibatches = 2\nRLConfig.rollout = 3\n")
  with pytest.raises(ValueError) as info:
    cli.parse_args(["--gin_file", str(exp), "--gin_param", "RLConfig.export_final = False"])
  message = str(info.value)
  for needle in (f"{base}:3 (RLConfig.temperature = 0.7): RLConfig.temperature is now RolloutConfig.temperature",
                 f"{exp}:3 (scoped/RLConfig.num_minibatches = 2): RLConfig.num_minibatches is now "
                 "UpdateConfig.num_minibatches",
                 f"{exp}:4 (RLConfig.rollout = 3): RLConfig.rollout is built from the RolloutConfig bindings",
                 "--gin_param 'RLConfig.export_final = False': RLConfig.export_final is now "
                 "CheckpointConfig.export_final"):
    assert needle in message
  assert "RLConfig.seed" not in message  # still RLConfig's


def test_a_run_dir_recorded_before_the_split_resumes_and_reads_under_the_new_keys(tmp_path):
  """operative_config.gin of a run started before RLConfig had sections: same settings, no config change."""
  # a key added since reads as its default (each ADDED value is the default config's binding), except the
  # keys whose default changed (ADDED_NOT_DEFAULT, each with its reason): there the old value is not the default
  default = operative_config.bindings(cli.parse()["operative"])
  assert {k: default[k] for k in ADDED if k not in ADDED_NOT_DEFAULT} == {
      k: v for k, v in ADDED.items() if k not in ADDED_NOT_DEFAULT}
  assert set(ADDED_NOT_DEFAULT) <= set(ADDED) and all(default[k] != ADDED[k] for k in ADDED_NOT_DEFAULT)
  assert all(len(why) > 20 for why in ADDED_NOT_DEFAULT.values())
  built = cli.parse_args([a for k in ADDED_NOT_DEFAULT for a in ("--gin_param", f"{k} = {ADDED[k]}")])  # old values
  old_key = {new: old for old, new in RENAMED.items()}
  old_text = "".join(f"{old_key.get(key, key)} = {value}\n" for key, _, value in
                     (line.partition(" = ") for line in built["operative"].splitlines()) if key not in ADDED)
  assert "RLConfig.temperature = 1.0" in old_text and "RolloutConfig." not in old_text
  assert {k: operative_config.bindings(built["operative"])[k] for k in ADDED} == ADDED
  assert operative_config.bindings(old_text) == operative_config.bindings(built["operative"])
  # resumed with today's default instead, the old run's behaviour would change: refused, naming each such key
  (tmp_path / "operative_config.gin").write_text(old_text)
  for key in ADDED_NOT_DEFAULT:
    with pytest.raises(ValueError, match=rf"{key}: {ADDED[key]} -> {default[key]}"):
      operative_config.record_operative_config(str(tmp_path), cli.parse()["operative"], resuming=True,
                                               allow_change=False, iteration=3)
  (tmp_path / "operative_config.gin").write_text(old_text)
  operative_config.record_operative_config(str(tmp_path), built["operative"], resuming=True, allow_change=False,
                                           iteration=3)
  assert (tmp_path / "operative_config.gin").read_text() == built["operative"]
  assert not (tmp_path / "config_changes.jsonl").exists()
  # A real change is still caught, under the new key.
  changed = built["operative"].replace("RolloutConfig.temperature = 1.0", "RolloutConfig.temperature = 0.5")
  (tmp_path / "operative_config.gin").write_text(old_text)
  with pytest.raises(ValueError, match=r"RolloutConfig.temperature: 1.0 -> 0.5"):
    operative_config.record_operative_config(str(tmp_path), changed, resuming=True, allow_change=False, iteration=3)


def test_gin_include_probes_are_not_logged_as_errors(tmp_path, caplog):
  """An include found on the search path (cispo_jax/config/) after gin probed the working directory logs no
  'ERROR Path not found'; an include found nowhere still fails, naming the file."""
  exp = tmp_path / "exp.gin"
  exp.write_text("include 'default.gin'\nRLConfig.seed = 3\n")
  with caplog.at_level(logging.INFO):
    assert cli.parse_args(["--gin_file", str(exp)])["RLConfig"].seed == 3
  assert not [r for r in caplog.records if "Path not found" in r.getMessage()]
  exp.write_text("include 'no_such_file.gin'\n")
  with pytest.raises(OSError, match="no_such_file.gin"):
    cli.parse_args(["--gin_file", str(exp)])


def test_a_run_may_grow_on_resume_and_other_changes_are_still_refused(tmp_path):
  """total_steps, eval / save cadence, kept checkpoints, sinks and the profiler may change on resume without
  --allow_config_change (recorded in config_changes.jsonl); any other key is refused, and only it is named."""
  import json

  start = cli.parse_args(["--total_steps", "40"])["operative"]
  operative_config.record_operative_config(str(tmp_path), start, resuming=False, allow_change=False, iteration=None)
  grown = cli.parse_args(["--total_steps", "80", "--gin_param", "EvalConfig.eval_every = 7",
                          "--gin_param", "CheckpointConfig.keep_checkpoints = 5"])["operative"]
  operative_config.record_operative_config(str(tmp_path), grown, resuming=True, allow_change=False, iteration=40)
  change = json.loads((tmp_path / "config_changes.jsonl").read_text().splitlines()[-1])
  assert change["iteration"] == 40 and change["run_length_only"]
  assert change["changed"]["RLConfig.total_steps"] == ["40", "80"]
  assert set(change["changed"]) == {"RLConfig.total_steps", "EvalConfig.eval_every", "CheckpointConfig.keep_checkpoints"}
  assert (tmp_path / "operative_config.gin").read_text() == grown
  both = cli.parse_args(["--total_steps", "120", "--temperature", "0.5"])["operative"]
  with pytest.raises(ValueError, match="would change 1 binding") as err:
    operative_config.record_operative_config(str(tmp_path), both, resuming=True, allow_change=False, iteration=80)
  assert "RolloutConfig.temperature: 1.0 -> 0.5" in str(err.value)
  assert "RLConfig.total_steps: 80 -> 120" not in str(err.value)
  assert (tmp_path / "operative_config.gin").read_text() == grown  # nothing written on a refusal


# Where default.gin (the CPU-sized offline experiment) differs from the dataclass defaults (sized for a real
# model), and why. A gin file that does not `include 'default.gin'` gets the class defaults: every other field
# must be the same in both, so leaving the include out changes only what is named here.
EXPERIMENT_CHOICES = {
    "LossConfig.kl_coef": "the experiment keeps a k3 KL to its SFT warm start; off by default as in DAPO / ScaleRL",
    "TaskConfig.task_args": "2-digit addition only (the class default is the generator's own range and ops)",
    "TaskConfig.train_size": "8,000 training problems are enough for 150 iterations of 64 prompts",
    "TaskConfig.rewards": "named explicitly; () means the task's own reward, which for arithmetic is the same one",
    "BootstrapConfig.sft_steps": "the tiny model needs 400 SFT steps to reach ~0.18 pass@1 before RL",
    "BootstrapConfig.sft_scratchpad_fraction": "30% of the SFT targets show their carry steps",
    "RLConfig.total_steps": "150 iterations: the curve in the README",
    "RLConfig.prompts_per_step": "64 prompts x 8 completions per iteration on 2 CPU cores",
    "EvalConfig.eval_size": "the whole 256-problem held-out split",
    "OptimConfig.learning_rate": "2e-4 for a 27M-parameter model; 1e-5 is a real model's (Qwen-scale) RL rate",
    "OptimConfig.warmup_steps": "10 warm-up steps over a 150-iteration run",
}


def test_class_defaults_equal_default_gin_except_the_named_experiment_choices(tmp_path):
  """Fails when a dataclass default silently differs from default.gin (as RolloutConfig.max_new_tokens 8 vs 24 and
  UpdateConfig.num_minibatches 2 vs 1 did: the latter switched old_logps_in_update off), and when a difference named
  above is gone (then its entry is stale)."""
  empty = tmp_path / "empty.gin"
  empty.write_text("# nothing: every class default\n")
  with_defaults, bare = cli.parse(), cli.parse([str(empty)])
  differ = {f"{name}.{field}" for name in cli.CONFIG_CLASSES for field, value in
            dataclasses.asdict(with_defaults[name]).items()
            if not (name == "RLConfig" and field in SECTIONS) and value != dataclasses.asdict(bare[name])[field]}
  assert differ == set(EXPERIMENT_CHOICES), (sorted(differ - set(EXPERIMENT_CHOICES)),
                                             sorted(set(EXPERIMENT_CHOICES) - differ))
  assert bare["RLConfig"].update.old_logps_in_update == with_defaults["RLConfig"].update.old_logps_in_update
