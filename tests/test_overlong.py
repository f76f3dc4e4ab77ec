"""Truncated completions (DAPO): the soft overlong penalty's math, the overlong filter's row weights, and both
in the trainer's update batch (the truncated rows' loss mask is zero; the penalty reaches the advantages)."""

import dataclasses

import jax
import numpy as np
import pytest

from cispo_jax.rl.overlong import overlong_keep, overlong_penalty


def _dapo(length, l_max, l_cache, factor=1.0):
  """DAPO eq. 13, case by case."""
  if length <= l_max - l_cache:
    return 0.0
  if length <= l_max:
    return factor * ((l_max - l_cache) - length) / l_cache
  return -factor


def test_penalty_is_dapos_piecewise_formula():
  lengths = np.arange(0, 26)
  got = overlong_penalty(lengths, 20, 8, 0.5)
  want = [_dapo(int(x), 20, 8, 0.5) for x in lengths]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
  assert got[12] == 0 and got[13] < 0 and got[20] == -0.5 and got[25] == -0.5  # the ramp's ends
  # a budget per row; no buffer = no penalty
  np.testing.assert_allclose(overlong_penalty([10, 10, 30], [10, 20, 40], 10), [-1.0, 0.0, 0.0], atol=0)
  assert not overlong_penalty(lengths, 20, 0).any()
  with pytest.raises(ValueError, match="buffer 30 is longer than a budget"):
    overlong_penalty(lengths, 20, 30)


def test_filter_keeps_rows_that_stopped():
  np.testing.assert_array_equal(overlong_keep([True, False, True]), [1.0, 0.0, 1.0])


def test_config_refuses_a_buffer_longer_than_the_budget():
  from cispo_jax.trainer import RLConfig

  with pytest.raises(ValueError, match="overlong_buffer=9 is longer than RolloutConfig.max_new_tokens=8"):
    RLConfig().replace(max_new_tokens=8, overlong_buffer=9)
  with pytest.raises(ValueError, match="overlong_penalty=-1"):
    RLConfig().replace(overlong_penalty=-1.0)


def test_trainer_masks_truncated_rows_and_penalises_them(model_dir, tmp_path):
  from cispo_jax.rl import losses
  from cispo_jax.rl.optim import OptimConfig
  from cispo_jax.sharding import MeshConfig
  from cispo_jax.task import TaskConfig
  from cispo_jax.trainer import RLConfig, Trainer

  # 6 new tokens: the tiny policy stops on some rows and runs out on others
  rl = RLConfig().replace(run_dir=str(tmp_path), model_dir=model_dir, total_steps=1, prompts_per_step=4,
                          num_generations=4, max_new_tokens=6, eval_size=4, export_final=False,
                          overlong_filter=True, overlong_buffer=3, overlong_penalty=0.5, filter_zero_variance=False,
                          num_minibatches=1, compact_groups=False)
  trainer = Trainer(rl, losses.LossConfig(), OptimConfig(), MeshConfig(fsdp=1), TaskConfig(), devices=jax.devices()[:1])
  try:
    # a stop id that some rows sample within the budget and others do not (the random policy never stops)
    tokens = np.asarray(trainer._rollout()[0].out.tokens_BxN)
    rows_with = {t: (tokens == t).any(1).mean() for t in np.unique(tokens)}
    stop = min(rows_with, key=lambda t: abs(rows_with[t] - 0.5))
    trainer.train_sampling = dataclasses.replace(trainer.train_sampling, stop_token_ids=(int(stop),))
    rollout, _ = trainer._rollout()
    lengths, stopped = np.asarray(rollout.out.lengths_B), np.asarray(rollout.out.stopped_B)
    assert stopped.any() and not stopped.all(), (lengths, stopped)
    adv, keep, keep_B, metrics = trainer._advantages(rollout, lengths, stopped)
    assert metrics["completion/overlong_masked"] == pytest.approx(1 - stopped.mean())
    penalty = overlong_penalty(lengths, 6, 3, 0.5)
    assert metrics["reward/overlong_penalty"] == pytest.approx(penalty.mean())
    # the advantages are those of the penalised rewards (grpo: centred and scaled per group)
    g = (rollout.rewards_B + penalty).reshape(-1, 4)
    want = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(adv), want.reshape(-1), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(keep), stopped.astype(np.float32))
    batch, _, _ = trainer._update_batch(rollout, lengths, adv, keep, keep_B, {})
    mask = np.asarray(batch.mask_BxN)
    assert mask.shape[0] == len(lengths)  # compact_groups off: every row, in order
    np.testing.assert_array_equal(mask.sum(1) > 0, stopped)  # truncated rows leave the loss
    np.testing.assert_array_equal(mask[stopped].sum(1), lengths[stopped])
  finally:
    trainer.close()


def test_forced_interruption_config_is_checked_naming_the_fields(model_dir):
  from cispo_jax.model.hf_io import load_tokenizer
  from cispo_jax.rollout.config import RolloutConfig, sampling_config
  from cispo_jax.rollout.stops import Stops

  tok = load_tokenizer(model_dir)
  with pytest.raises(ValueError, match="think_budget=3.*needs RolloutConfig.engine='paged'"):
    RolloutConfig(think_budget=3)
  ro = RolloutConfig(engine="paged", think_budget=6, interrupt_text="==", think_end_text="=", max_new_tokens=8)
  with pytest.raises(ValueError, match="think_budget=6 plus the 2 tokens of RolloutConfig.interrupt_text"):
    sampling_config(ro, tok, Stops((), ()), greedy=False, n=2)
  sc = sampling_config(dataclasses.replace(ro, max_new_tokens=9), tok, Stops((), ()), greedy=False, n=2)
  assert sc.think_budget == 6 and sc.interrupt_tokens == tuple(tok.encode("==", add_special_tokens=False))
