"""Update metrics reduced inside the step (rl/reductions.py): over micro-batches and optimizer steps, each
metric by its own rule (ratio_max the max over every token, counts summed, token means over all tokens),
and an iteration's update metrics come to the host in one transfer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cispo_jax.model.logprobs import completion_logps
from cispo_jax.model.tiny import random_params, tiny_config
from cispo_jax.rl import diagnostics, losses, reductions
from cispo_jax.rl.optim import OptimConfig, make_optimizer
from cispo_jax.rl.train_step import (RolloutBatch, StepConfig, TrainState, epoch_permutations, train_step,
                                     update_on_rollout)

NG, G, P, T, V = 2, 4, 3, 6, 32  # completions per prompt, prompt groups, prompt / completion length, vocab
# Loss tokens per row: the groups hold 7, 6, 8 and 0 tokens, so micro-batches and minibatches differ in size
# (a plain mean of their means is not the token mean) and one micro-batch of four has no token at all.
LENGTHS = [6, 1, 4, 2, 5, 3, 0, 0]


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
  params = jax.tree.map(jnp.asarray, random_params(cfg, 0))
  rng = np.random.default_rng(0)
  B = G * NG
  tokens = jnp.asarray(rng.integers(1, V, (B, P + T)), jnp.int32)
  kv_valid = jnp.ones((B, P + T), bool)
  mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)
  logps = np.asarray(completion_logps(params, cfg, tokens, kv_valid, T, 1.0)[0])
  batch = RolloutBatch(  # old log-probs off the current ones: ratios spread around 1, some beyond the clips
      tokens_BxL=tokens, kv_valid_BxL=kv_valid, mask_BxN=jnp.asarray(mask),
      old_logps_BxN=jnp.asarray(logps + rng.normal(0, 0.4, (B, T)), jnp.float32),
      ref_logps_BxN=jnp.asarray(logps + rng.normal(0, 0.1, (B, T)), jnp.float32),
      adv_BxN=jnp.asarray(np.repeat(rng.normal(size=(B, 1)), T, 1), jnp.float32),
      group_ids_B=jnp.repeat(jnp.arange(G, dtype=jnp.int32), NG))
  return cfg, params, batch


def _step_cfg(model_cfg, loss_type, micro):
  loss = losses.LossConfig(loss_type=loss_type, kl_coef=0.05, entropy_coef=0.01).resolved()
  return StepConfig(model=model_cfg, loss=loss, temperature=1.0, micro_batches=micro, num_generations=NG,
                    use_ref=True)


@functools.partial(jax.jit, static_argnums=1)
def _logps(params, model_cfg, tokens, kv_valid):
  return completion_logps(params, model_cfg, tokens, kv_valid, T, 1.0)[0]


def _ratios(params, model_cfg, mb: RolloutBatch):
  """The importance ratios of mb's loss tokens under params, by hand from the log-probs."""
  logps = np.asarray(_logps(params, model_cfg, mb.tokens_BxL, mb.kv_valid_BxL))
  clamp = losses.LossConfig().log_ratio_clamp
  ratio = np.exp(np.clip(logps - np.asarray(mb.old_logps_BxN), -clamp, clamp))
  return ratio[np.asarray(mb.mask_BxN) > 0]


@functools.lru_cache(maxsize=None)
def _step_fn(model_cfg, loss_type, micro):
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2), 100)
  fn = jax.jit(functools.partial(train_step, cfg=_step_cfg(model_cfg, loss_type, micro), tx=tx, schedule=schedule))
  return fn, tx


def _one_step(tiny, loss_type, micro):
  model_cfg, params, batch = tiny
  fn, tx = _step_fn(model_cfg, loss_type, micro)
  _, metrics = fn(TrainState.create(params, tx, seed=0), batch)
  return {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("loss_type,micro", [("cispo", 2), ("cispo", 4), ("grpo", 2)])
def test_micro_batches_give_the_metrics_of_one_batch(tiny, loss_type, micro):
  """Split in micro-batches, a step reports what the whole minibatch in one piece reports: the extremes over
  all tokens, the total counts, the token means over all tokens."""
  model_cfg, params, batch = tiny
  one, split = _one_step(tiny, loss_type, 1), _one_step(tiny, loss_type, micro)
  ratio = _ratios(params, model_cfg, batch)
  assert split["ratio_max"] == pytest.approx(ratio.max(), rel=1e-5)
  assert split["ratio_min"] == pytest.approx(ratio.min(), rel=1e-5)
  assert split["ratio_mean"] == pytest.approx(ratio.mean(), rel=1e-5)
  assert split["num_tokens"] == sum(LENGTHS) and split["num_seqs"] == sum(n > 0 for n in LENGTHS)
  assert split.keys() == one.keys()
  for k in one:  # every metric, the diagnostic's shares and the aggregated pg_loss included
    assert split[k] == pytest.approx(one[k], rel=2e-5, abs=1e-6), (k, split[k], one[k])


def test_every_metric_has_a_declared_reduction(tiny):
  """Each metric the built-in losses, the diagnostic and train_step make is declared (not left to the token-mean
  default), and every weight is a declared count."""
  made = set(_one_step(tiny, "cispo", 1))
  B = G * NG
  args = [jnp.full((B, T), -1.0), jnp.full((B, T), -1.1), jnp.ones((B,)), jnp.ones((B, T))]
  extra = dict(ref_logps_BxT=args[0], entropy_BxT=args[3], group_ids_B=jnp.arange(B) // NG)
  for loss_type, spec in losses.LOSS_TYPES.items():
    opts = [dict(max_completion_length=T, kl_coef=0.1, entropy_coef=0.01)]
    opts += [dict(opts[0], dual_clip=3.0)] if spec.dual_clip else []
    opts += [dict(opts[0], cispo_token_mask=True)] if loss_type == "cispo" else []
    for o in opts:
      cfg = losses.LossConfig(loss_type=loss_type, **o)
      made |= set(losses.policy_loss(*args, cfg, **extra).metrics)
      made |= set(diagnostics.accounting_metrics(*args, cfg, group_ids_B=extra["group_ids_B"]))
  assert made - reductions.REDUCTIONS.keys() == set(), "declare these in reductions.REDUCTIONS"
  assert reductions.REDUCTIONS.keys() - made == set(), "declared, but no metric of that name is made"
  for name, r in reductions.REDUCTIONS.items():
    assert r.kind in ("max", "min", "mean", "count", "sum", "weight"), name
    assert r.weight is None or reductions.REDUCTIONS[r.weight].kind in ("count", "weight"), name


def test_update_reduces_over_steps_like_one_pass_over_all_tokens(tiny):
  """4 optimizer steps (2 epochs x 2 minibatches of different sizes, 2 micro-batches each): the packed update
  gives the max / min / mean of the ratio over every token of every step, replayed by hand step by step."""
  model_cfg, params, batch = tiny
  iters, minis = 2, 2
  step_cfg = _step_cfg(model_cfg, "cispo", 2)
  tx, schedule = make_optimizer(OptimConfig(learning_rate=3e-2), 100)
  kw = dict(cfg=step_cfg, tx=tx, schedule=schedule, num_iterations=iters, num_minibatches=minis)
  update = jax.jit(functools.partial(update_on_rollout, packed=True, **kw))
  state = TrainState.create(params, tx, seed=1)
  new_state, packed = update(state, batch)
  leaves = jax.tree.leaves(packed)
  assert len(leaves) == 1 and leaves[0].dtype == jnp.float32  # one array: one transfer
  got, per_step = packed.unpack(jax.device_get(packed.values))

  # the same steps by hand: minibatch j of epoch i holds the groups perm_i[j::M]
  _, perms = epoch_permutations(state.rng, G, iters)
  replay = jax.jit(functools.partial(train_step, cfg=step_cfg._replace(micro_batches=1), tx=tx, schedule=schedule))
  st, ratios, steps = state, [], []
  for i in range(iters):
    for j in range(minis):
      rows = (np.asarray(perms[i])[j::minis, None] * NG + np.arange(NG)).reshape(-1)
      mb = jax.tree.map(lambda x: x[rows], batch)
      ratios.append(_ratios(st.params, model_cfg, mb))
      st, m = replay(st, mb)
      steps.append({k: float(v) for k, v in m.items()})
  np.testing.assert_allclose(jax.tree.leaves(new_state.params)[0], jax.tree.leaves(st.params)[0], rtol=1e-4,
                             atol=1e-6)  # the replay took the update's steps
  every = np.concatenate(ratios)
  assert got["ratio_max"] == pytest.approx(every.max(), rel=1e-5)
  assert got["ratio_min"] == pytest.approx(every.min(), rel=1e-5)
  assert got["ratio_mean"] == pytest.approx(every.mean(), rel=1e-5)  # each step's tokens once
  plain = np.mean([r.mean() for r in ratios])
  assert abs(plain - every.mean()) > 1e-4 * every.mean()  # the minibatches differ: a mean of means is not it
  assert got["num_tokens"] == pytest.approx(len(every) / len(ratios))  # per optimizer step
  grad_norms = [s["grad_norm"] for s in steps]
  assert got["grad_norm"] == pytest.approx(np.mean(grad_norms), rel=1e-4)
  assert got["grad_norm_max"] == pytest.approx(np.max(grad_norms), rel=1e-4)
  assert got["skipped_nonfinite"] == 0 and per_step["skipped_nonfinite"].tolist() == [0] * iters * minis
  assert "loss_denominator" not in got and "diag/weight" not in got  # weights only

  # a NaN in group 0: the step of its minibatch in each epoch is skipped, per step and in the count
  x = np.array(batch.adv_BxN)
  x[0, 0] = np.nan
  _, packed = update(state, batch._replace(adv_BxN=jnp.asarray(x)))
  got, per_step = packed.unpack(jax.device_get(packed.values))
  order = np.asarray(perms).reshape(iters, -1, minis).swapaxes(1, 2)  # [epoch, minibatch, groups]
  want = [float((order[i, j] == 0).any()) for i in range(iters) for j in range(minis)]
  assert per_step["skipped_nonfinite"].tolist() == want and got["skipped_nonfinite"] == iters


def test_one_iteration_pulls_its_update_metrics_in_one_transfer(model_dir, tmp_path, monkeypatch):
  """A trainer iteration with 2 micro-batches: the update's metrics come to the host in one to_host call, and
  they are the whole minibatch's (the token count of the update's batch, pg_loss the pooled loss)."""
  from cispo_jax.task import TaskConfig
  from cispo_jax.trainer import RLConfig, Trainer, loop
  from cispo_jax.sharding import MeshConfig

  rl = RLConfig().replace(run_dir=str(tmp_path), model_dir=model_dir, total_steps=1, prompts_per_step=4,
                          num_generations=4, num_iterations=2, num_minibatches=1, micro_batches=2,
                          max_new_tokens=4, eval_every=1, eval_size=8, save_every=1, export_final=False)
  task = TaskConfig(task="arithmetic", task_args={"max_operand": 9}, train_size=64, eval_size=8,
                    rewards=(("final_numeric", 1.0), ("user_reward_fns:length_bonus", 0.1)))
  trainer = Trainer(rl, losses.LossConfig(loss_type="cispo"), OptimConfig(learning_rate=1e-2),
                    MeshConfig(data=1, fsdp=1, tensor=1), task, devices=jax.devices()[:1])
  calls, inside, seen = [], [False], {}
  real_to_host, real_apply = loop._to_host, trainer._apply_update

  def counting_to_host(x):
    if inside[0]:
      calls.append(getattr(x, "shape", None))
    return real_to_host(x)

  def apply_update(batch, *args):
    seen["tokens"] = float(np.asarray(jax.device_get(batch.mask_BxN)).sum())
    inside[0] = True
    try:
      return real_apply(batch, *args)
    finally:
      inside[0] = False

  monkeypatch.setattr(loop, "_to_host", counting_to_host)
  trainer._apply_update = apply_update
  try:
    metrics = trainer.step()
  finally:
    trainer.close()
  assert "tokens" in seen, "no update ran"
  assert len(calls) == 1, calls  # before: one per metric, ~45
  assert metrics["train/num_tokens"] == seen["tokens"]  # the step's total, not a per-micro-batch mean
  assert metrics["train/pg_loss"] == pytest.approx(metrics["train/loss"], rel=1e-5)  # no KL or entropy term
  assert metrics["train/grad_norm_max"] >= metrics["train/grad_norm"] > 0
  assert not {"train/loss_denominator", "train/diag/weight"} & metrics.keys()
