"""Failed rewards (timeout, exception, crashed worker, non-finite value) under TaskConfig.on_reward_error: the
masked group statistics (rl/advantages.py), the scorer's valid-row mask over a pool of workers
(rewards/scoring.py, TaskConfig.reward_workers / reward_batch_timeout_s), and the trainer's update batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cispo_jax.data import Example
from cispo_jax.rewards import RewardConfig, RewardScorer, scoring
from cispo_jax.rl import advantages as A

import user_reward_fns  # noqa: F401  (registers "test_flaky")

# 3 prompts x 4 completions; the rows marked False failed (their reward came back as 0).
REWARDS = np.array([1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1], np.float32)
VALID = np.array([1, 1, 0, 1, 1, 1, 1, 0, 1, 0, 0, 0], bool)
N = 4


def test_masked_group_advantages_by_hand():
  """Group 0's valid rewards are (1, 0, 0): mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3).
  Group 1's are (1, 1, 1): no spread. Group 2 has one valid row: no signal. Failed rows get 0."""
  s = np.sqrt(1 / 3)
  want = [(2 / 3) / s, (-1 / 3) / s, 0, (-1 / 3) / s] + [0] * 8
  for name in ("grpo", "group_std"):
    np.testing.assert_allclose(A.compute_advantages(name, REWARDS, N, VALID), want, rtol=1e-5, atol=1e-6)
  # centred only; RLOO: minus the mean of the OTHER valid rows of the group
  np.testing.assert_allclose(A.compute_advantages("dr_grpo", REWARDS, N, VALID),
                             [2 / 3, -1 / 3, 0, -1 / 3] + [0] * 8, atol=1e-6)
  np.testing.assert_allclose(A.compute_advantages("rloo", REWARDS, N, VALID),
                             [1, -1 / 2, 0, -1 / 2] + [0] * 8, atol=1e-6)
  # batch std over the 7 valid rewards (1, 0, 0, 1, 1, 1, 0): mean 4/7, var (4 (3/7)^2 + 3 (4/7)^2) / 6 = 2/7
  batch_std = np.sqrt(2 / 7)
  np.testing.assert_allclose(A.compute_advantages("scalerl", REWARDS, N, VALID),
                             np.array([2 / 3, -1 / 3, 0, -1 / 3] + [0] * 8) / batch_std, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(A.zero_variance_mask(REWARDS, N, VALID), [True] * 4 + [False] * 8)
  # the trainer's program: the same, jitted; without valid_N it is the unmasked estimator
  adv, keep = A.advantages_and_keep(jnp.asarray(REWARDS), "grpo", N, True, valid_N=jnp.asarray(VALID))
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(keep, [True] * 4 + [False] * 8)
  adv0, keep0 = A.advantages_and_keep(jnp.asarray(REWARDS), "grpo", N, True)
  np.testing.assert_array_equal(adv0, A.group_advantages(REWARDS, N))
  np.testing.assert_array_equal(keep0, [True] * 12)
  with pytest.raises(ValueError, match=r"valid_N has shape \(11,\)"):
    A.compute_advantages("grpo", REWARDS, N, VALID[:11])


NUM = Example("23+58=", "81", {"task": "arithmetic"})
# test_flaky fails on these; exact_numeric scores every item ("81" is right)
BATCH = ["81", "boom", "81", "80", "nan", "81", "81", "hang", "exit", "81", "80", "81"]
FAILED = [1, 4, 7, 8]


def _score(workers, monkeypatch):
  monkeypatch.setattr(scoring, "SPLIT_MIN_ITEM_S", 0.0)  # always split: the pool is what is under test
  scorer = RewardScorer(RewardConfig((("exact_numeric", 1.0), ("test_flaky", 2.0)), timeout_s=1.0, workers=workers))
  try:
    rewards, stats = scorer.score(BATCH, [NUM] * len(BATCH))
    return rewards, stats, [r.restarts for r in scorer.runners]
  finally:
    scorer.close()


def test_scorer_marks_failed_items_invalid_and_a_pool_scores_as_one_worker(monkeypatch, caplog):
  one = _score(1, monkeypatch)
  with caplog.at_level("WARNING"):
    two = _score(2, monkeypatch)
  for rewards, stats, _ in (one, two):
    np.testing.assert_array_equal(np.flatnonzero(~stats["valid"]), FAILED)
    assert stats["failed_rows"] == 4
    assert stats["test_flaky/errors"] == 3 and stats["test_flaky/timeouts"] == 1  # boom, nan, exit; hang
    assert stats["exact_numeric/errors"] == stats["exact_numeric/timeouts"] == 0
  np.testing.assert_array_equal(one[0], two[0])
  assert {k: v for k, v in one[1].items() if k != "valid"} == {k: v for k, v in two[1].items() if k != "valid"}
  # items 0-5 on the first worker, 6-11 on the second: the hang and the crash restarted only the second
  assert one[2] == [2] and two[2] == [0, 2]
  assert "items [7]" in caplog.text and "items [1, 4, 8]" in caplog.text  # each failure logged with its index


def test_fast_rewards_stay_on_one_worker_and_slow_ones_are_split():
  """The first batch is split; after one whose rewards took < SPLIT_MIN_ITEM_S an item (timed in the worker) the
  next runs on the first worker alone (a crash in its second half restarts worker 0); a hang makes it slow."""
  scorer = RewardScorer(RewardConfig((("test_flaky", 1.0),), timeout_s=0.5, workers=2))
  try:
    scorer.score(["81"] * 8, [NUM] * 8)
    assert scorer.item_s < scoring.SPLIT_MIN_ITEM_S
    scorer.score(["81"] * 6 + ["exit", "81"], [NUM] * 8)
    assert [r.restarts for r in scorer.runners] == [1, 0]
    scorer.score(["81", "hang"], [NUM] * 2)  # a hang counts its timeout: 0.25 s an item
    assert scorer.item_s == pytest.approx(0.25, rel=0.1)
    scorer.score(["81", "exit"], [NUM] * 2)  # split again: the second item's worker is worker 1
    assert [r.restarts for r in scorer.runners] == [2, 1]
  finally:
    scorer.close()


def test_task_config_wires_timeouts_and_workers_into_the_scorer():
  from cispo_jax.task import Scorer, TaskConfig

  scorer = Scorer(TaskConfig(rewards=(("test_flaky", 1.0),), reward_timeout_s=0.5, reward_batch_timeout_s=0.7,
                             reward_workers=1))
  try:
    rewards, stats = scorer(["81", "hang", "hang", "81", "81"], [NUM] * 5)
  finally:
    scorer.close()
  np.testing.assert_allclose(rewards, [0.5, 0.0, 0.0, 0.0, 0.0])  # the batch ran out after the second hang
  assert stats["timeouts"] == 4 and stats["valid"].tolist() == [True, False, False, False, False]
  default = Scorer(TaskConfig(reward_workers=0))
  try:
    assert len(default._train.runners) == scoring.resolve_workers(0) >= 1
    assert default._train.config.batch_timeout_s == 120.0 and default._train.config.timeout_s == 5.0
  finally:
    default.close()
  for bad, field in ((dict(on_reward_error="skip"), "on_reward_error='skip'"),
                     (dict(reward_workers=-1), "reward_workers=-1"),
                     (dict(reward_batch_timeout_s=0.0), "reward_batch_timeout_s=0.0")):
    with pytest.raises(ValueError, match=f"TaskConfig.{field}"):
      TaskConfig(**bad)


def test_rollout_json_keeps_the_valid_mask_and_reads_old_checkpoints():
  from cispo_jax.rollout.engine import Rollout
  from cispo_jax.rollout.sampling import SampleOutput

  out = SampleOutput(*(np.zeros((2, 3), np.int32) if f.endswith("BxN") or f.endswith("BxP") else np.zeros(2, np.int32)
                       for f in SampleOutput._fields))
  r = Rollout(1, 0, out, np.ones(2, np.float32), {"errors": 1}, None, {}, {}, np.array([True, False]))
  d = r.to_json()
  np.testing.assert_array_equal(Rollout.from_json(d).valid_B, [True, False])
  d.pop("valid_B")  # a pending rollout saved before valid_B existed
  assert Rollout.from_json(d).valid_B is None


class _FailingScorer:
  """Rewards and failures chosen per row (the same whatever the completions), as RewardScorer reports them."""

  def __init__(self, rewards, valid):
    self.rewards, self.valid = np.asarray(rewards, np.float32), np.asarray(valid, bool)

  def __call__(self, texts, examples):
    assert len(texts) == len(self.rewards)
    stats = {"errors": 3, "timeouts": 1, "fake/errors": 3, "fake/timeouts": 1, "fake/mean": 0.5,
             "valid": self.valid.copy()}
    return np.where(self.valid, self.rewards, 0).astype(np.float32), stats

  def close(self):
    pass


def test_trainer_masks_failed_rows_out_of_the_update_and_their_groups(model_dir, tmp_path):
  from cispo_jax.rl import losses
  from cispo_jax.rl.optim import OptimConfig
  from cispo_jax.sharding import MeshConfig
  from cispo_jax.task import TaskConfig
  from cispo_jax.trainer import RLConfig, Trainer

  rl = RLConfig().replace(run_dir=str(tmp_path), model_dir=model_dir, total_steps=1, prompts_per_step=3,
                          num_generations=4, max_new_tokens=6, eval_size=4, export_final=False, num_minibatches=1,
                          compact_groups=False, trim_completions=False)
  trainer = Trainer(rl, losses.LossConfig(), OptimConfig(), MeshConfig(fsdp=1), TaskConfig(), devices=jax.devices()[:1])
  try:
    trainer.scorer.close()
    trainer.scorer = _FailingScorer(REWARDS, VALID)
    rollout, _ = trainer._rollout()
    np.testing.assert_array_equal(rollout.valid_B, VALID)
    assert "valid" not in rollout.stats  # the rollout's stats stay JSON (pending rollouts in checkpoints)
    lengths, stopped = np.asarray(rollout.out.lengths_B), np.asarray(rollout.out.stopped_B)
    adv, keep, keep_B, metrics = trainer._advantages(rollout, lengths, stopped)
    np.testing.assert_allclose(np.asarray(adv), A.compute_advantages("grpo", REWARDS, N, VALID), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(keep), [1, 1, 0, 1] + [0] * 8)  # group 1 no spread, group 2 one row
    np.testing.assert_array_equal(keep_B, [True] * 4 + [False] * 8)
    assert metrics["reward/failed_rows"] == metrics["reward/masked_rows"] == 5
    assert metrics["reward/fake/failures"] == 4
    batch, _, _ = trainer._update_batch(rollout, lengths, adv, keep, keep_B, {})
    mask = np.asarray(batch.mask_BxN)
    assert mask.shape[0] == 12  # compact_groups off: every row, in order
    assert not mask[2].any() and not mask[4:].any()  # the failed row and the groups without signal
    np.testing.assert_array_equal(mask[[0, 1, 3]].sum(1), lengths[[0, 1, 3]])
    # 'zero': the old advantages, bit for bit (the failed rows are real zeros in their groups), every row kept
    trainer.task = dataclasses.replace(trainer.task, on_reward_error="zero")
    adv, keep, keep_B, metrics = trainer._advantages(rollout, lengths, stopped)
    old_adv, old_keep = A.advantages_and_keep(jnp.asarray(np.where(VALID, REWARDS, 0)), "grpo", N, True)
    np.testing.assert_array_equal(np.asarray(adv), np.asarray(old_adv))
    np.testing.assert_array_equal(np.asarray(keep), np.asarray(old_keep))
    assert metrics["reward/failed_rows"] == 5 and metrics["reward/masked_rows"] == 0
  finally:
    trainer.close()
