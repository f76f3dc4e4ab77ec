"""Bounded compiles (issue 21): coarse update buckets for long budgets, the program count per phase, and
compiling every bucket up front (UpdateConfig.coarse_buckets_from / coarse_bucket_levels / precompile)."""

import logging

import jax
import numpy as np
import pytest

from cispo_jax.rl.losses import LossConfig
from cispo_jax.rl.optim import OptimConfig
from cispo_jax.runtime.metrics import read_metrics
from cispo_jax.rl.update_plan import TRIM_QUANTUM, Buckets, bucket, halving, plan_update, update_shapes
from cispo_jax.sharding import MeshConfig
from cispo_jax.task import TaskConfig
from cispo_jax.trainer import RLConfig, Trainer, UpdateConfig
from cispo_jax.trainer import batch as batch_lib
from cispo_jax.trainer import parts

N_GEN = 8  # RolloutConfig.num_generations (the default)


def _plan(rl, keep_groups: int, longest: int):
  """batch.plan (the trainer's planner) on a rollout whose first `keep_groups` groups are kept and whose
  longest kept completion has `longest` tokens (one device: quantum 1)."""
  G, n, N = rl.prompts_per_step, rl.rollout.num_generations, rl.rollout.max_new_tokens
  keep_B = np.repeat(np.arange(G) < keep_groups, n)
  lengths_B = np.ones(G * n, np.int64)
  lengths_B[0] = longest
  perms = np.stack([np.random.default_rng(i).permutation(G) for i in range(rl.update.num_iterations)]) \
      if rl.update.compact_groups else None
  return batch_lib.plan(rl, keep_B, lengths_B, N, perms, quantum=1)


@pytest.mark.parametrize("prompts", [16, 64])
def test_long_budget_compiles_at_most_8_update_programs(prompts):
  """At max_new_tokens = 8192 (default num_generations, minibatches, compact_groups and trim on) every
  (rows, width) the planner can return is one of at most 8 (2 row sizes x 4 widths); the fine ladder gave
  12 x 20 = 240 at 64 prompts. Enumerated over every longest-kept length and kept-group count."""
  up, N = UpdateConfig(), 8192
  buckets = Buckets.for_run(up, N)
  assert buckets == Buckets(2, 4)
  shapes = update_shapes(groups=prompts, num_generations=N_GEN, num_minibatches=up.num_minibatches, quantum=1,
                         width=N, compact=True, trim=True, buckets=buckets)
  widths = {buckets.width(x, N) for x in range(1, N + 1)}  # every longest kept completion
  rows = {N_GEN * buckets.rows(k, prompts, 1) for k in range(1, prompts + 1)}  # every kept-group count
  assert set(shapes) == {(r, w) for r in rows for w in widths} and len(shapes) <= 8
  assert widths == {1024, 2048, 4096, 8192} and rows == {N_GEN * prompts // 2, N_GEN * prompts}
  fine = update_shapes(groups=prompts, num_generations=N_GEN, num_minibatches=1, quantum=1, width=N, compact=True,
                       trim=True)
  assert len(fine) == {16: 8, 64: 12}[prompts] * 20
  # the trainer's planner returns only those: every kept count, and lengths at and around each width
  rl = RLConfig().replace(prompts_per_step=prompts, max_new_tokens=N)
  lengths = sorted({1, N} | {w + d for w in widths for d in (-1, 0, 1) if 0 < w + d <= N})
  got = {(len(p.rows), p.width) for p in
         [_plan(rl, k, N) for k in range(1, prompts + 1)] + [_plan(rl, k, x) for x in lengths for k in (1, prompts)]}
  assert got == set(shapes)


def test_default_budget_buckets_are_unchanged():
  """The default experiment (max_new_tokens 24, 64 prompts x 8) plans exactly the fine ladder's rows and
  widths for every kept count and every length <= 24: its run stays bit for bit what it was."""
  rl = RLConfig().replace(prompts_per_step=64, max_new_tokens=24)
  assert Buckets.for_run(rl.update, 24) == Buckets()
  for k in range(1, 65):
    for longest in range(1, 25):
      p = _plan(rl, k, longest)
      assert p.width == bucket(longest, 24, TRIM_QUANTUM) == {8: 8, 16: 16}.get(-(-longest // 8) * 8, 24)
      assert p.groups_per_minibatch == bucket(k, 64, 1) and len(p.rows) == N_GEN * p.groups_per_minibatch
  assert len(update_shapes(groups=64, num_generations=N_GEN, num_minibatches=1, quantum=1, width=24, compact=True,
                           trim=True, buckets=Buckets.for_run(rl.update, 24))) == 12 * 3


def test_coarse_buckets_keep_quanta_minibatches_and_the_off_switch():
  """Coarse rows stay multiples of the group quantum (or the full minibatch), the plan still gives each
  minibatch its kept groups, and coarse_buckets_from = 0 keeps the fine ladder at any budget."""
  assert [halving(x, 64, 1, 2) for x in (1, 32, 33, 64)] == [32, 32, 64, 64]
  assert [halving(x, 24, 4, 3) for x in (1, 8, 9, 13)] == [8, 8, 12, 24]  # 24 / 4 = 6 -> 8, 24 / 2 = 12
  assert [halving(x, 100, 8, 4) for x in (1, 13, 17, 50, 57)] == [16, 16, 32, 56, 100]
  with pytest.raises(ValueError, match="x=0"):
    halving(0, 8, 1, 2)
  G, n, M, N = 16, 2, 2, 2048
  keep = np.zeros(G, bool)
  keep[[0, 5, 9]] = True
  mask = np.zeros((G * n, N), bool)
  mask[:, :3] = True
  perms = np.stack([np.random.default_rng(s).permutation(G) for s in range(2)])
  plan = plan_update(keep, mask, perms, num_generations=n, num_minibatches=M, quantum=2, compact=True, trim=True,
                     buckets=Buckets(2, 4))
  assert plan.groups_per_minibatch == 4 and plan.width == 256  # 8 / 2 groups; 2048 / 8 positions
  groups = plan.rows[::n] // n
  for i in range(2):
    for j in range(M):
      mine = {int(groups[g]) for g in plan.order[i, j] if keep[groups[g]]}
      assert mine == {int(g) for g in perms[i, j::M] if keep[g]}
  assert Buckets.for_run(UpdateConfig(coarse_buckets_from=0), 8192) == Buckets()
  assert Buckets.for_run(UpdateConfig(coarse_buckets_from=4096, coarse_bucket_levels=(3, 2)), 4096) == Buckets(3, 2)
  for bad in ((0, 4), (2,), [2, 4], (2, 1.5)):
    with pytest.raises(ValueError, match="UpdateConfig.coarse_bucket_levels"):
      UpdateConfig(coarse_bucket_levels=bad)
  with pytest.raises(ValueError, match="coarse_buckets_from"):
    UpdateConfig(coarse_buckets_from=-1)


# ----------------------------------------------------------------------------- the trainer

ONE_DEVICE = MeshConfig(data=1, fsdp=1, tensor=1)
TASK = TaskConfig(task="arithmetic", task_args={"max_operand": 9}, train_size=64, eval_size=8,
                  rewards=(("final_numeric", 1.0), ("user_reward_fns:length_bonus", 0.1)))


def _trainer(model_dir, run_dir, **kw):
  rl = RLConfig().replace(run_dir=str(run_dir), model_dir=model_dir, total_steps=3, prompts_per_step=4,
                          num_generations=4, num_iterations=2, num_minibatches=1, max_new_tokens=16, eval_every=100,
                          eval_size=8, save_every=100, export_final=False, coarse_buckets_from=16,
                          coarse_bucket_levels=(2, 2), **kw)  # coarse at this budget: 4 buckets, fast to build
  return Trainer(rl, LossConfig(kl_coef=0.05), OptimConfig(learning_rate=1e-2), ONE_DEVICE, TASK,
                 devices=jax.devices()[:1])


class _CompileEvents:
  """Names of the functions JAX lowers or compiles while it is open."""

  def __init__(self):
    self.names = []
    self._fn = lambda event, _d, **kw: self.names.append(kw.get("fun_name", "")) if event in (
        "/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration") else None
    jax.monitoring.register_event_duration_secs_listener(self._fn)

  def close(self):
    jax.monitoring.unregister_event_duration_listener(self._fn)


def test_program_counts_are_metrics_and_precompile_builds_them_all(model_dir, tmp_path, caplog):
  """Each iteration's metrics count the programs of each phase (one per distinct bucket, logged with its
  shape when new). With UpdateConfig.precompile every bucket is built before the first iteration: the
  iterations then lower and compile no update, gather or log-prob program, and their numbers are the same."""
  with caplog.at_level(logging.INFO, logger="cispo_jax.runtime.programs"):
    plain = _trainer(model_dir, tmp_path / "plain")
    plain.run()
    plain.close()
  want = [r for r in read_metrics(str(tmp_path / "plain")) if "update/rows" in r]
  assert len(want) == 3
  seen = {(m["update/rows"], m["update/completion_width"]) for m in want}
  assert [m["compile/programs_update"] for m in want][-1] == len(seen) == plain.fns.update.count
  assert want[-1]["compile/programs_gather"] == len(seen) and want[-1]["compile/programs_logps"] == len(seen)
  assert want[-1]["compile/programs_rollout"] >= 1  # the sampler's
  assert "update: new program #1 (rows " in caplog.text and "completion width" in caplog.text

  events = _CompileEvents()
  try:
    pre = _trainer(model_dir, tmp_path / "pre", precompile=True)
    before = dict(pre.fns.program_counts())
    built = list(events.names)
    events.names.clear()
    pre.run()
    pre.close()
  finally:
    events.close()
  got = [r for r in read_metrics(str(tmp_path / "pre")) if "update/rows" in r]
  shapes = update_shapes(groups=4, num_generations=4, num_minibatches=1, quantum=1, width=16, compact=True,
                         trim=True, buckets=Buckets(2, 2))
  assert shapes == [(8, 8), (8, 16), (16, 8), (16, 16)] and seen <= set(shapes)  # 2 or 4 groups x widths 8, 16
  widths = parts.prompt_widths(pre.rl, pre.stream.source, pre.tokenizer)
  assert before["compile/programs_update"] == len(shapes) * len(widths)
  assert any("update_on_rollout" in name for name in built), built
  for phase in ("update", "gather", "logps"):
    assert got[-1][f"compile/programs_{phase}"] == before[f"compile/programs_{phase}"], phase
  assert not [name for name in events.names if "update_on_rollout" in name or "gather_rows" in name
              or "batched_completion_logps" in name], events.names
  keys = [k for k in want[0] if not k.startswith(("time/", "tokens/per_s", "compile/", "pipeline/"))]
  assert [{k: m[k] for k in keys} for m in got] == [{k: m[k] for k in keys} for m in want]
