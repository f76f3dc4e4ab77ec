"""Non-finite values end to end, damaged checkpoints and metrics files (in-process, tiny model)."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from cispo_jax.rl import losses
from cispo_jax.runtime.checkpoint import CheckpointError, Checkpointer, NonFiniteState, abstract_like
from cispo_jax.runtime.metrics import MetricWriter, read_metrics
from cispo_jax.rl.optim import OptimConfig
from cispo_jax.sharding import MeshConfig
from cispo_jax.task import TaskConfig
from cispo_jax.trainer import NonFiniteTraining, RLConfig, Trainer

TASK = TaskConfig(task="arithmetic", task_args={"max_operand": 9}, train_size=64, eval_size=8,
                  rewards=(("final_numeric", 1.0), ("user_reward_fns:length_bonus", 0.1)))


def _trainer(model_dir, run_dir, task=TASK, lr=1e-2, **kw):
  rl = RLConfig().replace(**{**dict(run_dir=str(run_dir), model_dir=model_dir, total_steps=3, prompts_per_step=4,
                                    num_generations=4, num_iterations=2, num_minibatches=2, max_new_tokens=4,
                                    eval_every=10, eval_size=8, save_every=1, export_final=False), **kw})
  return Trainer(rl, losses.LossConfig(), OptimConfig(learning_rate=lr), MeshConfig(data=1, fsdp=1, tensor=1), task,
                 devices=jax.devices()[:1])


def _finite(tree) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(tree))
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def _all_checkpoints_finite(trainer) -> list[int]:
  steps = trainer.ckpt.all_steps()
  for step in steps:
    state, _ = trainer.ckpt.restore(step, abstract_like(trainer.state))
    assert _finite(state), f"checkpoint {step} holds non-finite values"
  return steps


def test_reward_beyond_float32_is_counted_and_training_stays_finite(model_dir, tmp_path):
  task = dataclasses.replace(TASK, rewards=(("user_reward_fns:huge_on_odd_length", 1.0),))
  trainer = _trainer(model_dir, tmp_path, task=task)
  summary = trainer.run()
  assert summary["reward_events"]["errors"] > 0  # each 1e39 became a counted error with reward 0
  rows = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
  assert rows and all(r["train/loss"] is not None and np.isfinite(r["train/loss"]) for r in rows)
  assert all(r["reward/mean"] < 1e6 for r in rows)
  assert _finite(trainer.state.params)
  assert _all_checkpoints_finite(trainer) == [2, 3]  # keep_checkpoints=2
  trainer.close()


def test_divergent_learning_rate_skips_steps_then_stops_with_finite_checkpoints(model_dir, tmp_path):
  trainer = _trainer(model_dir, tmp_path, lr=1e9, total_steps=8, max_nonfinite_skips=3)
  with pytest.raises(NonFiniteTraining, match=r"optimizer steps in a row had a non-finite loss or gradient"):
    trainer.run()
  rows = read_metrics(str(tmp_path))
  assert sum(r.get("train/skipped_nonfinite") or 0 for r in rows) > 0
  assert _finite(trainer.state.params)  # skipped steps never applied a NaN update
  assert _all_checkpoints_finite(trainer)
  trainer.close()


def test_nonfinite_state_is_never_saved(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=1)
  good = {"w": jax.numpy.ones((4,))}
  assert ckpt.maybe_save(1, good, {"iteration": 1})
  with pytest.raises(NonFiniteState, match="iteration 2 holds non-finite values"):
    ckpt.maybe_save(2, {"w": jax.numpy.array([1.0, np.nan, 1.0, 1.0])}, {"iteration": 2})
  ckpt.wait()
  assert ckpt.all_steps() == [1]  # keep=1: the finite one was not rotated out
  step, state, host = ckpt.restore_latest_good(abstract_like(good))
  assert step == 1 and host["iteration"] == 1
  ckpt.close()


def _three_checkpoints(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=3)
  state = {"w": jax.numpy.arange(4096.0).reshape(64, 64), "b": jax.numpy.ones((3,), jax.numpy.bfloat16)}
  for i in (1, 2, 3):
    ckpt.maybe_save(i, jax.tree.map(lambda x: x * i, state), {"iteration": i})
  ckpt.close()
  return state


def _restore(tmp_path, state, caplog):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=3)
  with caplog.at_level("WARNING", logger="cispo_jax.runtime.checkpoint"):
    step, restored, host = ckpt.restore_latest_good(abstract_like(state))
  ckpt.close()
  assert host["iteration"] == step
  for k in state:  # whatever was restored is exactly what was saved at that step
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]) * step)
  return step


def test_flipped_bytes_never_restore_silently_changed_values(tmp_path, caplog):
  """Every data file of the newest checkpoint, a byte flipped at several places: each restore either gives
  exactly the saved values or falls back to checkpoint 2 with a warning. Never changed values."""
  state = _three_checkpoints(tmp_path / "pristine")
  blobs = sorted(str(p.relative_to(tmp_path / "pristine")) for p in (tmp_path / "pristine" / "checkpoints" / "3")
                 .rglob("*") if p.is_file() and "/d/" in str(p))
  fell_back = 0
  for n, rel in enumerate(blobs):
    for where in (0.25, 0.5, 0.9):
      trial = tmp_path / f"trial{n}_{where}"
      shutil.copytree(tmp_path / "pristine", trial)
      raw = bytearray((trial / rel).read_bytes())
      raw[int(len(raw) * where)] ^= 0x08
      (trial / rel).write_bytes(bytes(raw))
      caplog.clear()
      step = _restore(trial, state, caplog)
      if step == 2:
        fell_back += 1
        assert "checkpoint 3" in caplog.text and "falling back" in caplog.text
        assert (trial / "checkpoints_corrupt" / "3").exists()
  assert fell_back >= len(blobs), (fell_back, blobs)  # the array data itself is covered


@pytest.mark.parametrize("damage", ["truncate", "missing_host_metadata"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
  state = _three_checkpoints(tmp_path)
  newest = tmp_path / "checkpoints" / "3"
  if damage == "missing_host_metadata":
    os.remove(newest / "host" / "metadata")
  else:
    blob = max((p for p in newest.rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
    blob.write_bytes(blob.read_bytes()[:blob.stat().st_size // 2])
  assert _restore(tmp_path, state, caplog) == 2
  assert "checkpoint 3" in caplog.text and "falling back" in caplog.text
  assert (tmp_path / "checkpoints_corrupt" / "3").exists()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_no_good_checkpoint_is_a_clear_error(tmp_path):
  state = _three_checkpoints(tmp_path)
  for i in (1, 2, 3):
    os.remove(tmp_path / "checkpoints" / str(i) / "host" / "metadata")
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=3)
  with pytest.raises(CheckpointError, match=r"no checkpoint in .* could be restored") as e:
    ckpt.restore_latest_good(abstract_like(state))
  assert all(f"  {i}: " in str(e.value) for i in (1, 2, 3))
  ckpt.close()


def test_metrics_rows_of_a_dead_attempt_and_a_torn_row_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"iteration": i, "x": float(i)} for i in range(4)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 4, "x"')  # killed mid-write
  assert [r["iteration"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3]
  MetricWriter(str(tmp_path), tensorboard=False, resume_from=2).close()  # resumed from checkpoint 2
  assert read_metrics(str(tmp_path)) == rows[:3]
  MetricWriter(str(tmp_path), tensorboard=False, resume_from=None).close()  # no checkpoint: all redone
  assert read_metrics(str(tmp_path)) == []


def test_a_damaged_row_inside_metrics_names_file_and_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"iteration": 0}\nnot json\n{"iteration": 1}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON row"):
    read_metrics(str(tmp_path))
