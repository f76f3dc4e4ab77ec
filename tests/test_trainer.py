"""The RL loop end to end on a tiny model: every loss trains, checkpoints restore, resume is exact."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from cispo_jax import data
from cispo_jax.rl import losses
from cispo_jax.runtime.checkpoint import Checkpointer, abstract_like
from cispo_jax.runtime.metrics import read_metrics
from cispo_jax.rl.optim import OptimConfig
from cispo_jax.sharding import MeshConfig
from cispo_jax.task import TaskConfig
from cispo_jax.trainer import RLConfig, Trainer, UpdateConfig

ONE_DEVICE = MeshConfig(data=1, fsdp=1, tensor=1)
TASK = TaskConfig(task="arithmetic", task_args={"max_operand": 9}, train_size=64, eval_size=8)
# A length bonus (tests/user_reward_fns.py) beside the answer check: every group then has reward
# variance, so each loss gets a gradient even when a tiny random policy never answers right.
TASK_WITH_SIGNAL = dataclasses.replace(TASK, rewards=(("final_numeric", 1.0), ("user_reward_fns:length_bonus", 0.1)))


def _rl(model_dir, run_dir, **kw):
  base = dict(run_dir=str(run_dir), model_dir=model_dir, total_steps=2, prompts_per_step=4,
              num_generations=4, num_iterations=2, num_minibatches=2, max_new_tokens=4, eval_every=1,
              eval_size=8, save_every=1, export_final=False)
  base.update(kw)
  return RLConfig().replace(**base)  # flat names: each goes to its section


def _trainer(rl, loss=None, optim=None, task=TASK):
  return Trainer(rl, loss or losses.LossConfig(), optim or OptimConfig(learning_rate=1e-2), ONE_DEVICE, task,
                 devices=jax.devices()[:1])


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.parametrize("loss_type", sorted(losses.LOSS_TYPES))
def test_every_loss_trains_end_to_end(model_dir, tmp_path, loss_type):
  extra = {"max_completion_length": 4} if loss_type == "dr_grpo" else {}
  loss = losses.LossConfig(loss_type=loss_type, kl_coef=0.01 if loss_type == "cispo" else 0.0, **extra)
  trainer = _trainer(_rl(model_dir, tmp_path), loss, task=TASK_WITH_SIGNAL)
  before = _host(trainer.state.params)
  updates, apply_update = [], trainer._apply_update  # each update's batch, and the params before and after it

  def record(batch, *args):
    params = _host(trainer.state.params)
    apply_update(batch, *args)
    updates.append((batch, params, _host(trainer.state.params)))

  trainer._apply_update = record
  summary = trainer.run()
  trainer.close()
  after = _host(trainer.state.params)
  assert len(updates) == 2, f"{loss_type}: {len(updates)} updates in 2 iterations"
  for batch, params_before, params_after in updates:  # the batch the update got moved toward its advantages
    with jax.set_mesh(trainer.mesh):
      delta = np.asarray(trainer.fns.logps(params_after, batch.tokens_BxL, batch.kv_valid_BxL,
                                           n_completion=batch.mask_BxN.shape[1])
                         - trainer.fns.logps(params_before, batch.tokens_BxL, batch.kv_valid_BxL,
                                             n_completion=batch.mask_BxN.shape[1]))
    weight = np.asarray(batch.mask_BxN) * np.asarray(batch.adv_BxN)
    aligned, scale = (weight * delta).sum(), (np.abs(weight) * np.abs(delta)).sum()
    # as in test_every_loss_raises_the_logps_of_positive_advantages: most of the change is along A (> 0.75 here)
    assert aligned > 0.5 * scale > 0, (loss_type, aligned, scale)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert any(changed), f"{loss_type}: no parameter changed"
  rows = read_metrics(str(tmp_path))
  train_rows = [r for r in rows if "train/loss" in r]
  assert train_rows, f"{loss_type}: no update was logged: {rows}"
  for row in train_rows:
    for key, value in row.items():
      assert value is not None and np.isfinite(value), f"{loss_type}: metric {key}={value}"
  assert 0.0 <= summary["eval_end"] <= 1.0
  # the newest checkpoint exists and restores to the trained values
  ckpt = Checkpointer(os.path.join(tmp_path, "checkpoints"), save_every=1)
  assert ckpt.latest() == 2
  restored, host = ckpt.restore(2, abstract_like(trainer.state))
  assert host["iteration"] == 2
  for a, b in zip(jax.tree.leaves(_host(restored.params)), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- the direction of learning

# Every registered loss, KL to a reference on; dual clip beside the plain PPO form (the only loss code it changes).
DIRECTION_CASES = [(t, None) for t in sorted(losses.LOSS_TYPES)] + [("grpo", 3.0)]
DG, DN, DP, DT, DV = 2, 4, 3, 6, 32  # prompt groups, completions per prompt, prompt / completion length, vocab
ADV_B = np.array([1, -1, 1, -1, -1, 1, 1, -1], np.float32)  # hand-chosen, zero-mean in each group
STALE_B = np.array([0, 1, 0, 0, 1, 0, 0, 0], bool)  # two A < 0 rows sampled by an older policy: ratio e^1.5


@pytest.fixture(scope="module")
def direction_updates():
  """{(loss_type, dual_clip): [(advantages [B], metrics, log-prob change [B, T]) for the advantages ADV_B and
  -ADV_B]}: two SGD epochs of update_on_rollout (2 micro-batches, the second epoch off-policy) on a tiny random
  policy's fixed tokens, old log-probs on-policy but for the STALE_B rows, KL to a reference that differs.

  Every case runs in one jitted program (one compile for all: a third of the time of one program each)."""
  import functools

  import jax.numpy as jnp
  import optax

  from cispo_jax.model.logprobs import completion_logps
  from cispo_jax.model.tiny import random_params, tiny_config
  from cispo_jax.rl.train_step import RolloutBatch, StepConfig, TrainState, update_on_rollout

  cfg = tiny_config(vocab_size=DV, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
  params = jax.tree.map(jnp.asarray, random_params(cfg, 0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, DV, (DG * DN, DP + DT)), jnp.int32)
  kv_valid = jnp.ones(tokens.shape, bool)
  logps = jax.jit(lambda p: completion_logps(p, cfg, tokens, kv_valid, DT, 1.0)[0])
  before = logps(params)
  old = before - 1.5 * jnp.asarray(STALE_B[:, None], jnp.float32)
  ref = before + jnp.asarray(rng.uniform(-0.3, 0.3, before.shape), jnp.float32)  # KL's gradient is not 0
  tx = optax.sgd(0.3)
  updates = []
  for loss_type, dual_clip in DIRECTION_CASES:
    loss = losses.LossConfig(loss_type=loss_type, kl_coef=0.05, dual_clip=dual_clip,
                             max_completion_length=DT if loss_type == "dr_grpo" else None).resolved()
    step_cfg = StepConfig(model=cfg, loss=loss, temperature=1.0, micro_batches=2, num_generations=DN, use_ref=True)
    updates.append(functools.partial(update_on_rollout, cfg=step_cfg, tx=tx, schedule=lambda _: jnp.float32(0.3),
                                     num_iterations=2, num_minibatches=1))
  run_all = jax.jit(lambda state, batch: [update(state, batch) for update in updates])
  state = TrainState.create(params, tx, seed=0)
  results = {case: [] for case in DIRECTION_CASES}
  for adv_B in (ADV_B, -ADV_B):  # the same program: the advantages are data
    batch = RolloutBatch(tokens, kv_valid, jnp.ones((DG * DN, DT), jnp.float32), old, ref,
                         jnp.asarray(np.repeat(adv_B[:, None], DT, 1)), jnp.repeat(jnp.arange(DG, dtype=jnp.int32), DN))
    for case, (new, metrics) in zip(DIRECTION_CASES, run_all(state, batch)):
      results[case].append((adv_B, _host(metrics), np.asarray(logps(new.params) - before)))
  return results


@pytest.mark.parametrize("loss_type,dual_clip", DIRECTION_CASES)
def test_every_loss_raises_the_logps_of_positive_advantages(direction_updates, loss_type, dual_clip):
  """After the update the log-probs of the A > 0 completions have risen and those of A < 0 fallen, on average,
  and that move is most of the change: the advantage-weighted change is over half the mean |change| (a policy
  whose tokens all moved alike scores 0, one that learned backwards -1; every case here scores > 0.88). The same
  batch with the advantages negated must move the other way: a loss with a flipped sign fails both, one blind to
  the sign fails one."""
  for adv_B, metrics, delta in direction_updates[(loss_type, dual_clip)]:
    assert metrics["skipped_nonfinite"].sum() == 0
    for key, value in metrics.items():
      assert np.isfinite(value).all(), f"{loss_type}: metric {key}={value}"
    if dual_clip is not None and adv_B[1] < 0:  # the stale A < 0 rows (ratio e^1.5 > 3) meet the dual clip
      assert metrics["clip_frac_dual"][0] > 0
    up, down = delta[adv_B > 0].mean(), delta[adv_B < 0].mean()
    aligned = (adv_B[:, None] * delta).mean()  # |A| = 1: the advantage-weighted change per token
    scale = np.abs(delta).mean()
    assert up > 0 > down and aligned > 0.5 * scale > 1e-3, (loss_type, dual_clip, adv_B, up, down, aligned, scale)


def _comparable(rows):
  return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens/per_s", "compile/"))} for r in rows]


def test_interrupted_run_resumes_exactly(model_dir, tmp_path):
  rl = dict(total_steps=4, eval_every=2, save_every=2)
  full = _trainer(_rl(model_dir, tmp_path / "full", **rl))
  full.run()

  part = _trainer(_rl(model_dir, tmp_path / "part", **rl))
  part.run(stop_after=2)  # "interrupted" after iteration 2 (its checkpoint is written)
  part.close()
  resumed = _trainer(_rl(model_dir, tmp_path / "part", **rl))
  assert resumed.iteration == 2
  resumed.run()
  full.close()
  resumed.close()

  for a, b in zip(jax.tree.leaves(_host(full.state)), jax.tree.leaves(_host(resumed.state))):
    np.testing.assert_array_equal(a, b)  # bitwise on CPU
  assert _comparable(read_metrics(str(tmp_path / "full"))) == _comparable(read_metrics(str(tmp_path / "part")))
  s_full = json.load(open(tmp_path / "full" / "summary.json"))
  s_part = json.load(open(tmp_path / "part" / "summary.json"))
  assert (s_full["eval_start"], s_full["eval_end"]) == (s_part["eval_start"], s_part["eval_end"])
  assert s_part["iterations"] == 4


def test_zero_variance_groups_are_masked_not_dropped(model_dir, tmp_path):
  """A batch whose groups all score alike yields no update (and says so) instead of a NaN step."""
  trainer = _trainer(_rl(model_dir, tmp_path, total_steps=1))
  real_scorer = trainer.scorer
  trainer.scorer = lambda texts, examples: (np.ones(len(texts), np.float32), {})  # every group alike
  before = _host(trainer.state.params)
  metrics = trainer.step()
  assert metrics["groups/kept_frac"] == 0.0 and metrics["train/skipped_no_signal"] == 1.0
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(_host(trainer.state.params))):
    np.testing.assert_array_equal(a, b)
  trainer.scorer = real_scorer
  trainer.close()


def test_rl_config_validation():
  with pytest.raises(ValueError, match=r"RLConfig.prompts_per_step=6 must be divisible by UpdateConfig.num_minibatches"
                                       r" \* UpdateConfig.micro_batches=4 \* 1"):
    RLConfig(prompts_per_step=6, update=UpdateConfig(num_minibatches=4))
  with pytest.raises(ValueError, match="UpdateConfig.advantage"):
    UpdateConfig(advantage="nope")
  with pytest.raises(ValueError, match="RolloutConfig.num_generations"):
    RLConfig().replace(num_generations=0)
  with pytest.raises(TypeError, match="'temprature' is a field of neither RLConfig nor RolloutConfig"):
    RLConfig().replace(temprature=0.5)
  with pytest.raises(TypeError):  # the constructor takes the sections, not their fields
    RLConfig(temperature=0.5)
  with pytest.raises(TypeError, match="RLConfig.rollout must be a RolloutConfig"):
    RLConfig(rollout={"temperature": 0.5})


def test_bootstrap_builds_a_loadable_model_once(tmp_path):
  from cispo_jax.bootstrap import BootstrapConfig, bootstrap_model
  from cispo_jax.model import hf_io

  cfg = BootstrapConfig(cache_dir=str(tmp_path), hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                        num_kv_heads=1, sft_steps=3, sft_batch_size=8, sft_examples=32, sft_scratchpad_fraction=0.5)
  task = TaskConfig(task="arithmetic", task_args={"max_operand": 9, "ops": "+"}, train_size=64, eval_size=8)
  path = bootstrap_model(task, cfg)
  model_cfg, params = hf_io.load_model(path)
  assert model_cfg.hidden_size == 16 and hf_io.load_tokenizer(path).decode([5, 6]) == data.ALPHABET[2:4]
  marker = os.path.join(path, "bootstrap.json")
  stamp = os.path.getmtime(marker)
  assert bootstrap_model(task, cfg) == path and os.path.getmtime(marker) == stamp  # cached, not retrained
  assert bootstrap_model(dataclasses.replace(task, rewards=(("exact_numeric", 1.0),)), cfg) == path  # rewards don't shape it
  assert bootstrap_model(dataclasses.replace(task, on_reward_error="zero", reward_workers=3,
                                             reward_batch_timeout_s=9.0), cfg) == path  # nor how they are run
  assert bootstrap_model(task, dataclasses.replace(cfg, sft_steps=4)) != path  # another config, another model


def test_truncated_is_correction_and_reference_only_with_kl(model_dir, tmp_path, monkeypatch):
  """TIS (UpdateConfig.tis_cap): the sampler's log-probs are shifted by a known offset per token, uniform in [-1, 1]
  (a sampler whose numerics differ from the trainer's), so pi_old / pi_sampler spans [0.37, 2.7] around the cap
  1.5. The advantages the update receives are, by hand, adv * min(exp(old - sampler), cap)."""
  from cispo_jax.trainer import batch as batch_lib

  plain = _trainer(_rl(model_dir, tmp_path / "plain", total_steps=1), task=TASK_WITH_SIGNAL)
  assert plain.ref_params is None  # no KL term: no reference model is kept
  plain.close()
  cap = 1.5
  tis = _trainer(_rl(model_dir, tmp_path / "tis", total_steps=1, tis_cap=cap),
                 losses.LossConfig(kl_coef=0.1), task=TASK_WITH_SIGNAL)
  assert tis.ref_params is not None
  seen, rollout, advantages, apply_update, plan = {}, tis._rollout, tis._advantages, tis._apply_update, batch_lib.plan

  def shifted_rollout():
    r, seconds = rollout()
    seen["sampler"] = sampler = np.asarray(r.out.logps_BxN)
    seen["shifted"] = sampler + np.random.default_rng(0).uniform(-1, 1, sampler.shape).astype(np.float32)
    return dataclasses.replace(r, out=r.out._replace(logps_BxN=seen["shifted"])), seconds

  def record_advantages(*args):
    out = advantages(*args)
    seen["adv_B"] = np.asarray(out[0])
    return out

  def record_batch(batch, *args):
    seen["batch"] = batch
    return apply_update(batch, *args)

  tis._rollout, tis._advantages, tis._apply_update = shifted_rollout, record_advantages, record_batch
  monkeypatch.setattr(batch_lib, "plan", lambda *a, **kw: seen.setdefault("plan", plan(*a, **kw)))
  metrics = tis.step()
  tis.close()
  assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["train/kl_ref"])
  assert metrics["reward/final_numeric"] >= 0.0 and metrics["reward/user_reward_fns:length_bonus"] > 0.0
  batch, rows, width = seen["batch"], seen["plan"].rows, seen["plan"].width
  mask = np.asarray(batch.mask_BxN) > 0
  old = np.asarray(batch.old_logps_BxN)
  # pi_old is the trainer's forward of the sampling policy: the unshifted sampler log-probs, to f32 rounding
  np.testing.assert_allclose(old[mask], seen["sampler"][rows, :width][mask], atol=1e-4)
  ratio = np.exp(old - seen["shifted"][rows, :width])[mask]
  assert mask.sum() >= 20 and (ratio > cap).mean() > 0.1 and (ratio < cap).mean() > 0.1, ratio  # both sides
  want = (seen["adv_B"][rows][:, None] * np.ones(mask.shape, np.float32))[mask] * np.minimum(ratio, cap)
  assert np.abs(want).max() > 0.1  # the rows carry advantages
  np.testing.assert_allclose(np.asarray(batch.adv_BxN)[mask], want, rtol=1e-5, atol=1e-6)
