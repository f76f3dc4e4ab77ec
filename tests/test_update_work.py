"""The update does no work without gradient and still gives the same results.

* compaction (UpdateConfig.compact_groups): zero-weight groups leave the update batch, each minibatch
  keeping exactly the weighted groups the masked full batch gives it, padded to a bucket;
* trimming (UpdateConfig.trim_completions): the completion axis is cut after the longest kept completion;
* old log-probs from the update's first forward (UpdateConfig.old_logps_in_update).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cispo_jax.rl import losses
from cispo_jax.model.tiny import random_params, tiny_config
from cispo_jax.rl.optim import OptimConfig
from cispo_jax.sharding import MeshConfig
from cispo_jax.task import TaskConfig
from cispo_jax.rl.train_step import RolloutBatch, StepConfig, TrainState, epoch_permutations, update_on_rollout
from cispo_jax.trainer import RLConfig, Trainer
from cispo_jax.rollout.engine import batched_completion_logps
from cispo_jax.rl.update_plan import TRIM_QUANTUM, _ladder, bucket, group_quantum, plan_update

V, P, N = 32, 3, 32  # vocab, prompt width, completion width (max_new_tokens)
G, NG = 16, 2  # groups, completions per group
KEPT = np.zeros(G, bool)
KEPT[[0, 3, 4, 9, 13]] = True  # groups with reward variance


# ----------------------------------------------------------------------------- bucket policy (host only)

def test_ladder_and_bucket():
  assert [_ladder(x) for x in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
  assert bucket(5, 64, 1) == 6 and bucket(5, 64, 4) == 8 and bucket(9, 64, 4) == 12 and bucket(33, 64, 1) == 48
  assert bucket(49, 64, 1) == 64 and bucket(7, 8, 4) == 8 and bucket(3, 4, 8) == 4  # capped at the full size
  assert bucket(9, 24, TRIM_QUANTUM) == 16 and bucket(17, 24, TRIM_QUANTUM) == 24 and bucket(1, 24, 8) == 8
  # sizes over the whole range: two per doubling, padding below half of x (a third of the bucket)
  sizes = {bucket(x, 512, 1) for x in range(1, 513)}
  assert len(sizes) <= 2 * 9 + 1, sorted(sizes)
  assert all(bucket(x, 512, 1) <= max(1.5 * x, 2) for x in range(1, 513))
  with pytest.raises(ValueError):
    bucket(0, 8, 1)


def test_group_quantum_splits_micro_batches_over_the_devices():
  for n in (1, 2, 3, 4, 8):
    for m in (1, 2, 4):
      for d in (1, 2, 4, 8):
        q = group_quantum(n, m, d)
        assert q % m == 0 and (q // m * n) % d == 0, (n, m, d, q)
        assert all((k % m or (k // m * n) % d) for k in range(1, q)), (n, m, d, q)  # the smallest such
  assert group_quantum(2, 2, 4) == 4 and group_quantum(8, 1, 8) == 1


@pytest.mark.parametrize("M", [1, 2, 4])
def test_plan_gives_each_minibatch_the_masked_batch_groups(M):
  rng = np.random.default_rng(M)
  groups, n, iters, quantum = 32, 4, 3, 2
  keep = rng.random(groups) < 0.25
  lengths = rng.integers(1, 40, groups * n)
  lengths[np.repeat(keep, n)] = np.minimum(lengths[np.repeat(keep, n)], 13)  # kept completions stop early
  mask = np.arange(40)[None] < lengths[:, None]
  perms = np.stack([rng.permutation(groups) for _ in range(iters)])
  plan = plan_update(keep, mask, perms, num_generations=n, num_minibatches=M, quantum=quantum, compact=True,
                     trim=True)
  ub_groups = plan.rows.reshape(-1, n)[:, 0] // n  # rollout group of each update-batch group
  np.testing.assert_array_equal(plan.rows, (ub_groups[:, None] * n + np.arange(n)).reshape(-1))  # whole groups
  assert plan.order.shape == (iters, M, plan.groups_per_minibatch)
  assert plan.groups_per_minibatch % quantum == 0 or plan.groups_per_minibatch == groups // M
  assert len(ub_groups) == M * plan.groups_per_minibatch < groups
  assert keep[ub_groups].sum() == keep.sum()  # every kept group is in, the rest is padding
  for i in range(iters):
    np.testing.assert_array_equal(np.sort(plan.order[i].reshape(-1)), np.arange(len(ub_groups)))  # once each
    for j in range(M):
      got = ub_groups[plan.order[i, j]]
      want = [g for g in perms[i][j::M] if keep[g]]
      assert [g for g in got if keep[g]] == want  # same weighted groups, same order
  longest = lengths[np.repeat(keep, n)].max()
  assert longest <= plan.width == bucket(longest, 40, TRIM_QUANTUM) < 40
  # no compaction: all rows, the update shuffles; no trimming: the full width
  plain = plan_update(keep, mask, None, num_generations=n, num_minibatches=M, quantum=quantum, compact=False,
                      trim=False)
  assert plain.order is None and plain.width == 40
  np.testing.assert_array_equal(plain.rows, np.arange(groups * n))


# ----------------------------------------------------------------------------- the update, on a tiny model

@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
  return cfg, jax.tree.map(jnp.asarray, random_params(cfg, 0))


def _rollout(seed=0):
  """A masked full batch as the trainer builds it: dropped groups have mask 0 (and long completions)."""
  rng = np.random.default_rng(seed)
  B = G * NG
  keep_B = np.repeat(KEPT, NG)
  lengths = np.where(keep_B, rng.integers(1, 10, B), rng.integers(20, N + 1, B))
  completion = np.arange(N)[None] < lengths[:, None]
  prompt = np.ones((B, P), bool)
  prompt[::3, 0] = False  # some left padding
  tokens = rng.integers(1, V, (B, P + N))
  tokens[:, P:][~completion] = 0
  tokens[:, :P][~prompt] = 0
  noise = lambda: -np.log(V) + rng.normal(0, 0.3, (B, N))  # noqa: E731
  batch = RolloutBatch(
      tokens_BxL=jnp.asarray(tokens, jnp.int32), kv_valid_BxL=jnp.asarray(np.concatenate([prompt, completion], 1)),
      mask_BxN=jnp.asarray(completion * keep_B[:, None], jnp.float32),
      old_logps_BxN=jnp.asarray(noise(), jnp.float32), ref_logps_BxN=jnp.asarray(noise(), jnp.float32),
      adv_BxN=jnp.asarray(np.repeat(rng.normal(size=(B, 1)), N, 1), jnp.float32),  # nonzero even where masked
      group_ids_B=jnp.asarray(np.repeat(np.arange(G), NG), jnp.int32))
  return batch, completion


def _compact(batch, completion, state, iters, M, quantum):
  perms = np.asarray(epoch_permutations(state.rng, G, iters)[1])
  plan = plan_update(KEPT, completion, perms, num_generations=NG, num_minibatches=M, quantum=quantum,
                     compact=True, trim=True)
  r, w = plan.rows, plan.width
  host = jax.tree.map(np.asarray, batch)
  small = RolloutBatch(host.tokens_BxL[r, :P + w], host.kv_valid_BxL[r, :P + w],
                       *[x[r, :w] for x in host[2:6]], host.group_ids_B[r])
  return jax.tree.map(jnp.asarray, small), plan


def _recording_tx():
  """Leaves the params alone and records sum_s (s + 1) * grad_s: every step's gradient, in order."""
  def init(params):
    return jnp.zeros((), jnp.int32), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

  def update(grads, state, params=None):
    k, acc = state
    acc = jax.tree.map(lambda a, g: a + (k + 1).astype(jnp.float32) * g, acc, grads)
    return jax.tree.map(jnp.zeros_like, grads), (k + 1, acc)
  return optax.GradientTransformation(init, update)


def _close(a, b, rtol=1e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)),
                          strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.abs(y).max(), 1e-12)
    assert np.abs(x - y).max() <= rtol * scale, (jax.tree_util.keystr(path), np.abs(x - y).max() / scale)


AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "prompt-mean", "seq-mean-token-sum-norm"]


# every aggregation without KL; with the KL and entropy terms (masked like the policy term, whatever the
# aggregation) on the group-wise and the constant-normaliser ones (6 cases: 12 update compiles)
@pytest.mark.parametrize("aggregation,kl", [(a, False) for a in AGGREGATIONS]
                         + [("prompt-mean", True), ("seq-mean-token-sum-norm", True)])
def test_compaction_and_trimming_keep_loss_and_gradient(tiny, aggregation, kl):
  model_cfg, params = tiny
  iters, M, micro = 2, 2, 2
  loss = losses.LossConfig(loss_type="cispo", aggregation=aggregation, max_completion_length=N,
                           kl_coef=0.1 if kl else 0.0, entropy_coef=0.01 if kl else 0.0).resolved()
  step_cfg = StepConfig(model=model_cfg, loss=loss, temperature=1.0, micro_batches=micro, num_generations=NG,
                        use_ref=kl)
  tx = _recording_tx()
  update = jax.jit(functools.partial(update_on_rollout, cfg=step_cfg, tx=tx, schedule=lambda _: jnp.float32(0),
                                     num_iterations=iters, num_minibatches=M))
  state = TrainState.create(params, tx, seed=3)
  full, completion = _rollout()
  small, plan = _compact(full, completion, state, iters, M, quantum=micro)
  assert small.mask_BxN.shape[0] < full.mask_BxN.shape[0] and plan.width < N  # real savings
  want_state, want = update(state, full)
  got_state, got = update(state, small, jnp.asarray(plan.order))
  np.testing.assert_array_equal(got_state.rng, want_state.rng)  # the shuffle's key advances alike
  assert np.all(np.asarray(want["loss"]) != 0)
  # per step, in order; to f32 rounding (atol: a loss can be a small difference of O(1) terms)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
  np.testing.assert_array_equal(got["num_seqs"], want["num_seqs"])  # summed over micro-batches
  for key in ("entropy", "ratio_mean", "ratio_max", "ratio_min"):  # over all tokens: as the full batch
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
  _close(got_state.opt_state[1], want_state.opt_state[1])  # every step's gradient
  # the check can fail: the same minibatches in another order give other per-step losses
  shifted = jnp.asarray(np.roll(plan.order, 1, axis=1))
  if not np.array_equal(shifted, plan.order):
    _, other = update(state, small, shifted)
    assert not np.allclose(other["loss"], want["loss"], rtol=1e-5, atol=1e-6)


def test_old_logps_from_the_first_step(tiny):
  """One minibatch: the update's first forward gives the old log-probs the separate forward gives,
  and the same updated params; the first step's ratio is exactly 1."""
  model_cfg, params = tiny
  iters, micro = 2, 2
  loss = losses.LossConfig(kl_coef=0.05).resolved()
  step_cfg = StepConfig(model=model_cfg, loss=loss, temperature=0.7, micro_batches=micro, num_generations=NG,
                        use_ref=True)
  tx = optax.sgd(0.5)
  kw = dict(cfg=step_cfg, tx=tx, schedule=lambda _: jnp.float32(0.5), num_iterations=iters, num_minibatches=1)
  separate = jax.jit(functools.partial(update_on_rollout, **kw))
  fused = jax.jit(functools.partial(update_on_rollout, old_from_first_step=True, **kw))
  batch, _ = _rollout(seed=1)
  state = TrainState.create(params, tx, seed=0)
  old = batched_completion_logps(params, batch.tokens_BxL, batch.kv_valid_BxL, model_cfg=model_cfg,
                                 n_completion=N, temperature=0.7, micro_batches=micro)
  want_state, want = separate(state, batch._replace(old_logps_BxN=old))
  # the batch's old log-probs are ignored (NaN here would make every step non-finite)
  got_state, got, got_old = fused(state, batch._replace(old_logps_BxN=jnp.full_like(old, jnp.nan)))
  np.testing.assert_allclose(got_old, old, atol=1e-5, rtol=1e-5)
  assert np.asarray(got["skipped_nonfinite"]).sum() == 0
  assert float(got["ratio_min"][0]) == float(got["ratio_max"][0]) == 1.0  # exactly on-policy
  assert float(got["ratio_max"][1]) > 1.0  # the second epoch sees the first step's change
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
  _close(got_state.params, want_state.params)
  assert not np.allclose(jax.tree.leaves(got_state.params)[0], jax.tree.leaves(params)[0])  # it did learn
  with pytest.raises(ValueError, match="num_minibatches == 1"):
    jax.eval_shape(functools.partial(update_on_rollout, old_from_first_step=True, **{**kw, "num_minibatches": 2}),
                   state, batch)


# ----------------------------------------------------------------------------- the trainer, on a 2x2 mesh

TASK = TaskConfig(task="arithmetic", task_args={"max_operand": 9}, train_size=64, eval_size=8)
MESH = MeshConfig(data=2, fsdp=2, tensor=1)


def _scorer(texts, examples):
  """Groups 0, 4, ... score by their text (variance); the others all alike (zero variance: dropped)."""
  groups = np.arange(len(texts)) // 2
  r = [float(sum(map(ord, t)) % 7) if g % 4 == 0 else 1.0 for g, t in zip(groups, texts)]
  return np.asarray(r, np.float32), {}


def _trainer(model_dir, run_dir, **kw):
  rl = RLConfig().replace(run_dir=str(run_dir), model_dir=model_dir, total_steps=3, prompts_per_step=16,
                          num_generations=2, num_iterations=2, num_minibatches=1, micro_batches=2, max_new_tokens=8,
                          eval_size=8, export_final=False, **kw)
  trainer = Trainer(rl, losses.LossConfig(kl_coef=0.05), OptimConfig(learning_rate=1e-3), MESH, TASK,
                    devices=jax.devices()[:4])
  trainer.scorer = _Scorer(trainer.scorer)
  return trainer


class _Scorer:
  def __init__(self, real):
    self.close = real.close  # Trainer.close() closes the real scorer's workers

  __call__ = staticmethod(_scorer)


def test_trainer_compacts_on_a_sharded_mesh_with_the_same_results(model_dir, tmp_path):
  off = _trainer(model_dir, tmp_path / "off", compact_groups=False, trim_completions=False,
                 old_logps_in_update=False)
  want = off.step()
  want_params = jax.device_get(off.state.params)
  off.close()
  on = _trainer(model_dir, tmp_path / "on")
  assert on.fns.old_logps_in_update and on.fns.group_quantum == 4  # 2 micro-batches of 2-row groups over 4 devices
  got = on.step()
  assert got["reward/mean"] == want["reward/mean"] and 0 < got["groups/kept_frac"] < 0.5
  assert want["update/rows"] == 32 and got["update/rows"] == 8  # <= 4 kept groups -> the 4-group bucket
  for key in ("train/loss", "train/grad_norm", "train/kl_ref", "train/ratio_max"):
    assert abs(got[key] - want[key]) <= 1e-5 * max(abs(want[key]), 1e-3), (key, got[key], want[key])
  assert got["logp_gap/sampler_vs_trainer"] == pytest.approx(want["logp_gap/sampler_vs_trainer"], abs=1e-6)
  assert got["logp_gap/sampler_vs_trainer"] < 1e-5
  _close(on.state.params, want_params)
  # a short run: rows always a valid bucket, one compiled update program per (rows, width) bucket
  seen = {(got["update/rows"], got["update/completion_width"])}
  for _ in range(2):
    m = on.step()
    rows, width = int(m["update/rows"]), int(m["update/completion_width"])
    assert rows % (on.fns.group_quantum * 2) == 0 and rows <= 32 and width in (8,), (rows, width)
    seen.add((rows, width))
  assert on.fns.update.jitted._cache_size() == on.fns.update.count == len(seen) <= 2
  on.close()
