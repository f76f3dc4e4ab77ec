"""Platform defaults a new user meets on an accelerator (issue 21): ModelRunConfig.dtype='auto', the one line of
resolved choices, the KL reference held in the compute dtype, and the rollout warnings that name their fields."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cispo_jax.config import operative
from cispo_jax.model import tiny
from cispo_jax.model.config import ModelRunConfig, resolve_dtype
from cispo_jax.trainer import RLConfig, parts
from cispo_jax.trainer.signals import ZERO_VARIANCE_PATIENCE, RolloutWatch


@pytest.mark.parametrize("platform,want", [("cpu", "float32"), ("gpu", "bfloat16"), ("tpu", "bfloat16")])
def test_auto_dtype_is_bf16_on_accelerators_and_f32_on_cpu(platform, want):
  run = ModelRunConfig()
  assert run.dtype == "auto" and run.param_dtype == "float32"  # master weights stay f32 everywhere
  assert resolve_dtype("auto", platform) == want
  assert run.overrides(platform)["dtype"] == want and run.overrides(platform)["param_dtype"] == "float32"
  assert ModelRunConfig(dtype="float16").overrides(platform)["dtype"] == "float16"  # explicit: as given
  with pytest.raises(ValueError, match="ModelRunConfig.dtype='fp8'"):
    ModelRunConfig(dtype="fp8")


def test_run_choices_line_names_dtype_kernel_remat_and_chunk():
  rl = RLConfig().replace(max_new_tokens=1024)
  cfg = tiny.tiny_config(head_dim=64).replace(**ModelRunConfig().overrides("gpu"))
  line = parts.run_choices(rl, cfg, "gpu")
  assert "run choices on gpu: dtype bfloat16 (ModelRunConfig.dtype='auto')" in line
  assert "master weights float32" in line and "LM head float32" in line
  assert "training attention cudnn" in line and f"{max(rl.rollout.prompt_buckets) + 1024} positions" in line
  assert "remat off" in line and "logprob_chunk 1024" in line
  assert "training attention splash" in parts.run_choices(rl, cfg, "tpu")
  cpu = parts.run_choices(rl, tiny.tiny_config().replace(**ModelRunConfig().overrides("cpu")), "cpu")
  assert "dtype float32" in cpu and "training attention blockwise" in cpu


def test_reference_params_in_compute_dtype_with_the_f32_head():
  cfg = tiny.tiny_config(tie_word_embeddings=False).replace(dtype="bfloat16")
  params = jax.tree.map(jnp.asarray, tiny.random_params(cfg))
  ref = parts.reference_params(params, cfg)
  flat = jax.tree_util.tree_flatten_with_path(ref)[0]
  for path, x in flat:
    name = path[-1].key
    assert x.dtype == (jnp.float32 if name == "lm_head" else jnp.bfloat16), (name, x.dtype)  # embed: a lookup
  tied = cfg.replace(tie_word_embeddings=True)
  tied_params = {k: v for k, v in params.items() if k != "lm_head"}
  assert parts.reference_params(tied_params, tied)["embed"].dtype == jnp.float32  # the head, when tied
  assert sum(x.nbytes for x in jax.tree.leaves(ref)) < sum(x.nbytes for x in jax.tree.leaves(params))
  f32 = parts.reference_params(params, cfg.replace(dtype="float32"))  # a CPU run: the exact copy, as before
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(f32), jax.tree.leaves(params)))


def test_auto_is_recorded_as_what_it_resolved_to(tmp_path):
  """A run dir recorded before 'auto' existed ('float32') resumes under the new default on CPU unchanged; the
  recorded file says what ran."""
  rl = RLConfig()
  old = "ModelRunConfig.dtype = 'float32'\nRLConfig.seed = 0\n"
  operative.record_operative_config(str(tmp_path), old, resuming=False, allow_change=False, iteration=None)
  new = parts.resolved_operative("ModelRunConfig.dtype = 'auto'\nRLConfig.seed = 0\n", rl)
  assert f"ModelRunConfig.dtype = '{resolve_dtype('auto')}'" in new and "resolved on" in new
  if jax.default_backend() == "cpu":
    operative.record_operative_config(str(tmp_path), new, resuming=True, allow_change=False, iteration=3)
    assert not (tmp_path / "config_changes.jsonl").exists()
  gpu_started = "ModelRunConfig.dtype = 'bfloat16'\nRLConfig.seed = 0\n"
  (tmp_path / "operative_config.gin").write_text(gpu_started)
  if jax.default_backend() == "cpu":  # a GPU run resumed on CPU under 'auto' would change the dtype: refused
    with pytest.raises(ValueError, match="ModelRunConfig.dtype: 'bfloat16' -> 'float32'"):
      operative.record_operative_config(str(tmp_path), new, resuming=True, allow_change=False, iteration=3)


class _Stops:
  def describe(self, tokenizer):
    return "eos 2"


def test_warnings_name_the_fields_for_truncated_and_signal_free_rollouts(caplog):
  watch = RolloutWatch(RLConfig().replace(num_generations=4, max_new_tokens=16), _Stops(), None)
  flat = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32)
  some_signal = np.array([1, 0, 1, 1, 0, 0, 0, 0], np.float32)
  stopped = np.ones(8, bool)
  with caplog.at_level(logging.WARNING, logger="cispo_jax.trainer.signals"):
    watch.check(1, flat, np.zeros(8, bool))
    assert "none of the 8 completions stopped on its own" in caplog.text
    assert "RolloutConfig.stop_token_ids" in caplog.text and "RolloutConfig.max_new_tokens" in caplog.text
    caplog.clear()
    for i in range(2, ZERO_VARIANCE_PATIENCE):
      watch.check(i, flat, stopped)
    watch.check(ZERO_VARIANCE_PATIENCE, some_signal, stopped)  # one group with signal: the streak restarts
    for i in range(ZERO_VARIANCE_PATIENCE - 1):
      watch.check(100 + i, flat, stopped)
    assert caplog.text == ""
    watch.check(200, flat, stopped)
  assert f"equal for {ZERO_VARIANCE_PATIENCE} iterations in a row" in caplog.text
  assert "TaskConfig.rewards" in caplog.text and "RolloutConfig.temperature" in caplog.text


def test_bf16_run_holds_its_kl_reference_in_bf16_and_trains(model_dir, tmp_path, caplog):
  """The path 'auto' takes on an accelerator, on CPU: bf16 compute over f32 master weights, the reference in bf16."""
  from cispo_jax.rl import losses
  from cispo_jax.rl.optim import OptimConfig
  from cispo_jax.sharding import MeshConfig
  from cispo_jax.task import TaskConfig
  from cispo_jax.trainer import Trainer

  rl = RLConfig().replace(run_dir=str(tmp_path), model_dir=model_dir, total_steps=1, prompts_per_step=4,
                          num_generations=4, max_new_tokens=4, eval_size=4, export_final=False, dtype="bfloat16",
                          num_iterations=1)  # one optimizer step: the policy is still the reference
  task = TaskConfig(task="arithmetic", task_args={"max_operand": 9}, train_size=16, eval_size=4,
                    rewards=(("final_numeric", 1.0), ("user_reward_fns:length_bonus", 0.1)))
  with caplog.at_level(logging.INFO, logger="cispo_jax.trainer.parts"):
    trainer = Trainer(rl, losses.LossConfig(kl_coef=0.1), OptimConfig(learning_rate=1e-2),
                      MeshConfig(data=1, fsdp=1, tensor=1), task, devices=jax.devices()[:1])
  try:
    assert "dtype bfloat16 (ModelRunConfig.dtype='bfloat16'), master weights float32" in caplog.text
    dtypes = {x.dtype for x in jax.tree.leaves(trainer.ref_params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}  # bf16 layers, the f32 head
    assert {x.dtype for x in jax.tree.leaves(trainer.state.params)} == {jnp.dtype(jnp.float32)}
    metrics = trainer.step()
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["train/kl_ref"] < 1e-2, metrics["train/kl_ref"]
  finally:
    trainer.close()
