"""The RL loop: prompts -> rollout -> rewards -> advantages -> old log-probs -> updates.

Read top to bottom: set-up (mesh, model, sharded state, data, checkpoints), one iteration
(`_rollout`, `_update`), eval, and `run` (the config, RLConfig and its sections: trainer/config.py).
Everything on the device is jitted once per prompt bucket; the host only tokenises, scores and logs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from cispo_jax.rl import advantages as adv_lib
from cispo_jax import data as data_lib
from cispo_jax import sharding
from cispo_jax.rl import losses
from cispo_jax.rollout import sampling
from cispo_jax.runtime.checkpoint import Checkpointer, abstract_like
from cispo_jax.runtime.compile_cache import CompileClock
from cispo_jax.evals.evaluator import Evaluator
from cispo_jax.runtime.metrics import MetricWriter, plot_curves
from cispo_jax.model import hf_io, logical_axes, param_shapes
from cispo_jax.config.operative import bindings, record_operative_config
from cispo_jax.rl.optim import OptimConfig, make_optimizer
from cispo_jax.rollout.pipeline import Pipeline
from cispo_jax.rollout.config import sampling_config
from cispo_jax.trainer.config import RLConfig
from cispo_jax.rollout.engine import NativeEngine, Rollout, batched_completion_logps, local_rows
from cispo_jax.runtime.profiler import IterationProfiler
from cispo_jax.task import HELDOUT, Scorer, TaskConfig, make_sources
from cispo_jax.rl.update_plan import group_quantum, plan_update
from cispo_jax.rl.train_step import RolloutBatch, StepConfig, TrainState, epoch_permutations, update_on_rollout

log = logging.getLogger(__name__)


def run_loss_config(loss: losses.LossConfig, rl: RLConfig) -> losses.LossConfig:
  """The loss as this run uses it: Dr.GRPO's constant normaliser defaults to max_new_tokens."""
  if loss.max_completion_length is None:
    loss = dataclasses.replace(loss, max_completion_length=rl.rollout.max_new_tokens)
  return loss.resolved()


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; rerun the same command to resume


class Trainer:
  def __init__(self, rl: RLConfig, loss: losses.LossConfig, optim: OptimConfig,
               mesh_cfg: sharding.MeshConfig, task: TaskConfig, operative_config: str = "",
               devices=None, allow_config_change: bool = False, rollout_thread: bool | None = None):
    """rollout_thread: rollouts from a producer thread (pipeline.py); default: RolloutConfig.pipelined. With
    max_staleness 0 on the train mesh that thread runs in lock-step with the update and gives the
    synchronous loop's result bit for bit (tests/test_pipeline.py)."""
    self.rl, self.loss_cfg, self.task = rl, run_loss_config(loss, rl), task
    ro, up = rl.rollout, rl.update
    self.rollout_thread = ro.pipelined if rollout_thread is None else rollout_thread
    self.main = sharding.is_main_process()
    os.makedirs(rl.run_dir, exist_ok=True)
    self.ckpt = Checkpointer(os.path.join(rl.run_dir, "checkpoints"), rl.checkpoint.save_every,
                             rl.checkpoint.keep_checkpoints)
    resuming = self.ckpt.latest() is not None
    if operative_config:  # before anything is built: a refused config change costs nothing
      record_operative_config(rl.run_dir, operative_config, resuming=resuming, allow_change=allow_config_change,
                              iteration=self.ckpt.latest(), write=self.main)

    # --- meshes and model: the train mesh, and the rollout sub-mesh if the devices are split ----------
    devices = list(jax.devices() if devices is None else devices)
    if ro.pipelined and jax.process_count() > 1:
      raise ValueError("RolloutConfig.max_staleness > 0 and RolloutConfig.rollout_devices > 0 run on one process "
                       f"for now (this run has {jax.process_count()}); use the synchronous loop across hosts")
    rollout_devices = []
    if ro.rollout_devices:
      if ro.rollout_devices >= len(devices):
        raise ValueError(f"RolloutConfig.rollout_devices={ro.rollout_devices} leaves no device to train on "
                         f"({len(devices)} devices)")
      rollout_devices, devices = devices[:ro.rollout_devices], devices[ro.rollout_devices:]
    self.mesh = sharding.make_mesh(mesh_cfg, devices)
    self.model_cfg = hf_io.load_config(rl.model_dir, **dataclasses.asdict(rl.model_run))
    self.tokenizer = hf_io.load_tokenizer(rl.model_dir)
    if self.tokenizer.eos_token_id is None:
      raise ValueError(f"tokenizer in {rl.model_dir} has no eos_token: the sampler needs a stop token")

    # --- sharded state: parameters by the logical-axis rules, the optimizer state alike --------
    updates_per_step = up.num_iterations * up.num_minibatches
    self.tx, self.schedule = make_optimizer(optim, rl.total_steps * updates_per_step)
    params_logical, shapes = logical_axes(self.model_cfg), param_shapes(self.model_cfg)
    self.param_shardings = sharding.param_shardings(params_logical, shapes, self.mesh)
    opt_shardings = sharding.param_shardings(
        sharding.optimizer_logical_axes(self.tx, params_logical, shapes),
        jax.eval_shape(self.tx.init, shapes), self.mesh)
    rep = sharding.replicated(self.mesh)
    self.state_shardings = TrainState(step=rep, params=self.param_shardings, opt_state=opt_shardings, rng=rep)
    # Tensor by tensor from safetensors straight into its shards: never a second full copy.
    params = hf_io.load_params(rl.model_dir, self.model_cfg, shardings=self.param_shardings)
    # Built directly in its layout: the optimizer state is born sharded like the params.
    self.state = jax.jit(functools.partial(TrainState.create, tx=self.tx, seed=rl.seed),
                         out_shardings=self.state_shardings)(params)
    # Only a KL needs the reference; a copy, as each update donates the state's buffers.
    self.ref_params = jax.tree.map(jnp.copy, params) if self.loss_cfg.kl_coef else None
    self.batch_sharding = sharding.batch_sharding(self.mesh, 1)  # dim 0 over the data axes, any rank
    # Eval samples on the train mesh with the current params; rollouts come from `self.engine`.
    self.eval_engine = NativeEngine(self.model_cfg, self.tokenizer, self.mesh, self.param_shardings,
                                    apply_chat_template=ro.apply_chat_template, copy_weights=False)
    if rollout_devices:
      rollout_mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, tensor=1), rollout_devices)
      self.engine = NativeEngine(self.model_cfg, self.tokenizer, rollout_mesh,
                                 sharding.param_shardings(params_logical, shapes, rollout_mesh),
                                 apply_chat_template=ro.apply_chat_template, copy_weights=True)
    else:  # in lock-step (max_staleness 0) the sampler reads the trainer's own buffers, as it always did
      self.engine = NativeEngine(self.model_cfg, self.tokenizer, self.mesh, self.param_shardings,
                                 apply_chat_template=ro.apply_chat_template, copy_weights=ro.stale)

    # --- data, rewards ---------------------------------------------------------------------
    proc, nproc = jax.process_index(), jax.process_count()
    if rl.prompts_per_step % nproc:
      raise ValueError(f"RLConfig.prompts_per_step={rl.prompts_per_step} must be divisible by the "
                       f"process count {nproc}")
    train_src, eval_examples = make_sources(task, seed=rl.seed)
    # Every prompt checked before anything compiles: too long for the buckets or the model, or token ids
    # outside the model's vocabulary (TaskConfig.too_long: drop and count, or refuse naming file:line).
    train_src, eval_examples = task.check_sources(
        train_src, eval_examples, self.tokenizer, self.model_cfg, max_new_tokens=ro.max_new_tokens,
        prompt_buckets=ro.prompt_buckets, apply_chat_template=ro.apply_chat_template)
    # Evaluated every eval_every: the held-out split, then TaskConfig.eval_sets (evaluation.py shards each).
    self.eval_sets = {HELDOUT: eval_examples[:min(rl.eval.eval_size, len(eval_examples))], **task.eval_sources(
        self.tokenizer, self.model_cfg, max_new_tokens=ro.max_new_tokens, prompt_buckets=ro.prompt_buckets,
        apply_chat_template=ro.apply_chat_template)}
    self.stream = data_lib.PromptStream(train_src, rl.prompts_per_step, seed=rl.seed).shard(proc, nproc)
    self.scorer = Scorer(task)
    self.train_sampling = sampling_config(ro, self.tokenizer, greedy=False, n=ro.num_generations)
    self.eval_sampling = sampling_config(ro, self.tokenizer, greedy=True, n=1)
    self.evaluator = Evaluator(
        lambda params, examples, key, cfg: self.eval_engine.generate(examples, key, cfg, params=params, host=True),
        self.eval_engine.local_rows, self.tokenizer, self.scorer, greedy_cfg=self.eval_sampling,
        sampled_cfg=sampling_config(ro, self.tokenizer, greedy=False, n=task.eval_samples) if task.eval_samples
        else None, ks=task.pass_k(), batch_size=task.eval_batch_size, seed=rl.seed)

    # --- jitted functions ------------------------------------------------------------------
    self.step_cfg = StepConfig(model=self.model_cfg, loss=self.loss_cfg, temperature=ro.temperature,
                               micro_batches=up.micro_batches, num_generations=ro.num_generations,
                               use_ref=self.ref_params is not None)
    self._logps = functools.partial(batched_completion_logps, model_cfg=self.model_cfg,
                                    temperature=ro.temperature, micro_batches=up.micro_batches)
    # The old log-probs come out of the update's first forward when nothing needs them before it.
    # Not with stale rollouts: their old log-probs are the behaviour policy's, not the current params'.
    self.old_logps_in_update = (up.old_logps_in_update and up.num_minibatches == 1 and up.tis_cap == 0
                                and not ro.stale)
    update = functools.partial(update_on_rollout, cfg=self.step_cfg, tx=self.tx, schedule=self.schedule,
                               num_iterations=up.num_iterations, num_minibatches=up.num_minibatches,
                               old_from_first_step=self.old_logps_in_update)
    rep = sharding.replicated(self.mesh)
    outs = (self.state_shardings, rep) + ((self.batch_sharding,) if self.old_logps_in_update else ())
    if up.compact_groups:  # the host passes each epoch's minibatch order (plan_update)
      self._update = jax.jit(update, in_shardings=(self.state_shardings, self.batch_sharding, rep),
                             out_shardings=outs, donate_argnums=0)
    else:
      self._update = jax.jit(lambda state, batch: update(state, batch), in_shardings=(
          self.state_shardings, self.batch_sharding), out_shardings=outs, donate_argnums=0)
    self._perms = jax.jit(functools.partial(epoch_permutations, n_groups=rl.prompts_per_step,
                                            num_iterations=up.num_iterations), out_shardings=rep)
    sizes = dict(self.mesh.shape)
    self.group_quantum = group_quantum(ro.num_generations, up.micro_batches, sizes["data"] * sizes["fsdp"])

    # --- resume, logs -------------------------------------------------------------------------
    self.iteration, self.eval_start = 0, None
    self.reward_events = {"errors": 0, "timeouts": 0}
    self.nonfinite_skips = {"total": 0, "consecutive": 0}
    pending: list[Rollout] = []
    restored = self.ckpt.restore_latest_good(abstract_like(self.state))  # verified; bad ones moved aside
    if restored is not None:
      _, self.state, host = restored
      self.iteration = host["iteration"]
      self.stream.restore(host["data"])
      self.reward_events, self.eval_start = host["reward_events"], host["eval_start"]
      self.nonfinite_skips = host.get("nonfinite_skips", self.nonfinite_skips)
      pending = [Rollout.from_json(r) for r in host.get("pending_rollouts", [])]
      log.info("resumed from %s at iteration %d (%d rollouts in flight restored)", self.ckpt.directory,
               self.iteration, len(pending))
    self._stream_state = host["consumed_data"] if restored is not None and "consumed_data" in host else \
        self.stream.state()  # after the prompts of the last rollout trained on
    self.pipeline = None
    if self.rollout_thread:
      # Rollouts older than the restored version come from the checkpoint; a run resumed without them (a
      # checkpoint of the synchronous loop) samples its first rollouts with the restored version.
      self.pipeline = Pipeline(self._make_rollout, self.engine, staleness=ro.max_staleness,
                               sync_every=ro.weight_sync_every,
                               first=self.iteration + len(pending), total=rl.total_steps,
                               base_version=self.iteration if restored is not None and not pending else 0,
                               pending=pending)
      self.pipeline.publish(self.state.params, _to_host(self.state.rng), self.iteration)  # started by step()
    # (start, end) perf_counter seconds of each update and each rollout made (benchmarks/bench_pipeline.py)
    self.update_intervals: list[tuple[float, float]] = []
    self._inline_rollouts: list[tuple[float, float]] = []
    # Rows after the checkpoint (or all, when there is none) came from a dead attempt: dropped.
    self.writer = MetricWriter(rl.run_dir, enabled=self.main,
                               resume_from=self.iteration if restored is not None else None,
                               wandb_project=rl.wandb_project, hparams=bindings(operative_config))
    self.profiler = IterationProfiler(rl.profile_iterations, os.path.join(rl.run_dir, "profile"), self.main)
    self._stop_signal: str | None = None
    self._handlers: dict = {}
    self.compile_clock, self.time_totals = CompileClock(), {}
    if threading.current_thread() is threading.main_thread():
      # A preemptible VM's SIGTERM, or Ctrl-C: finish the iteration, save, exit (handlers undone by close()).
      self._handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

  @property
  def rollout_intervals(self) -> list[tuple[float, float]]:
    return self.pipeline.busy if self.pipeline is not None else self._inline_rollouts

  # --- one iteration -----------------------------------------------------------------------
  def _global(self, x: np.ndarray) -> jax.Array:
    """A host array that every process holds in full -> a batch-sharded global array."""
    return jax.make_array_from_callback(x.shape, self.batch_sharding, lambda idx: x[idx])

  def _score(self, out, examples, n: int):
    """Decode and score this process's rows only; every process gets all rewards (advantages are global)."""
    local = sampling.SampleOutput(*(local_rows(x) if name in ("tokens_BxN", "lengths_B", "stopped_B") else None
                                    for name, x in out._asdict().items()))
    texts = sampling.decode_completions(self.tokenizer, local)
    local_examples = [e for e in examples for _ in range(n)]
    rewards, stats = self.scorer(texts, local_examples)
    return _allgather_host(rewards.astype(np.float32)), stats

  def _make_rollout(self, iteration: int, version: int, rng_data) -> Rollout:
    """Draw the next prompts, sample them with policy `version`, score them; for a stale rollout
    (version < iteration) also the behaviour policy's log-probs. In line, or on the rollout thread."""
    ro = self.rl.rollout
    examples = self.stream.next_batch()
    stream_state = self.stream.state()
    key = jax.random.fold_in(jax.random.wrap_key_data(np.asarray(rng_data)), iteration)
    t0 = time.perf_counter()
    out = jax.block_until_ready(self.engine.generate(examples, key, self.train_sampling, version=version))
    t1 = time.perf_counter()
    rewards_B, stats = self._score(out, examples, ro.num_generations)
    t2 = time.perf_counter()
    behaviour = None
    if version != iteration and ro.behaviour_logps == "recompute":
      behaviour = jax.block_until_ready(self.engine.completion_logps(
          out, version=version, temperature=ro.temperature, micro_batches=self.rl.update.micro_batches))
    t3 = time.perf_counter()
    return Rollout(iteration, version, out, rewards_B, dict(stats), behaviour, stream_state,
                   {"rollout": t1 - t0, "reward": t2 - t1, "behaviour_logps": t3 - t2})

  def _prepare(self, r: Rollout):
    """Advantages and the update batch of a rollout. Returns (batch or None when no group carries
    signal, metrics, extra inputs of the update, host data for the logp gap when the update computes
    the old log-probs)."""
    up, n = self.rl.update, self.rl.rollout.num_generations
    out, rewards_B, stats = r.out, r.rewards_B, r.stats
    for k in self.reward_events:
      self.reward_events[k] += int(stats.get(k, 0))
    # Advantages and the zero-variance mask in one jitted program: they stay on the devices (the update
    # batch gathers its rows of them there); only the [B] keep flags come back, for the update plan.
    rewards = jax.make_array_from_callback(rewards_B.shape, sharding.replicated(self.mesh),
                                           lambda idx: rewards_B[idx])
    adv, keep = adv_lib.advantages_and_keep(rewards, up.advantage, n, up.filter_zero_variance)
    keep_B = np.asarray(keep.addressable_data(0))  # replicated: every process holds the whole vector

    lengths_B = _to_host(out.lengths_B)  # [B] ints: the only per-row data besides the rewards on the host
    metrics = {
        "reward/mean": float(rewards_B.mean()), "reward/std": float(rewards_B.std()),
        "reward/pass_rate": float((rewards_B >= 1.0).mean()),
        "completion/length": float(lengths_B.mean()),
        "completion/stopped": float(_to_host(out.stopped_B).mean()),
        "groups/kept_frac": float(keep_B.mean()),
        "logp_gap/sampler_vs_trainer": 0.0,  # over the tokens that enter the loss; set below or after the update
        "reward_events/errors": self.reward_events["errors"],
        "reward_events/timeouts": self.reward_events["timeouts"],
        "tokens/generated": float(lengths_B.sum()),
    }
    if self.rollout_thread:  # updates since the policy that sampled this rollout
      metrics["pipeline/staleness"] = float(self.iteration - r.version)
    if len(self.task.reward_list()) > 1:  # each reward of a mix, on this process's rows
      metrics.update({f"reward/{name}": float(stats[f"{name}/mean"]) for name, _ in self.task.reward_list()})
    batch, extra, gap_data = None, (), None
    if keep_B.any():  # else no update, and nothing needs the log-probs
      behaviour = None
      if r.version != self.iteration:  # stale: the old log-probs are the behaviour policy's
        behaviour = r.behaviour_logps_BxN if r.behaviour_logps_BxN is not None else out.logps_BxN
      batch, extra, gap_data = self._update_batch(out, lengths_B, adv, keep, keep_B, metrics, behaviour)
    return batch, metrics, extra, gap_data

  def _update_batch(self, out, lengths_B, adv, keep, keep_B, metrics, behaviour_BxN=None):
    """The update's rows and width (plan_update, from the host's keep_B), gathered on the devices from the
    rollout's arrays and the advantages / keep flags (adv, keep: replicated [B]), then the old / reference
    log-probs on just those rows. behaviour_BxN: a stale rollout's old log-probs (full width); else they
    come from the current params."""
    up, n = self.rl.update, self.rl.rollout.num_generations
    N = out.tokens_BxN.shape[1]
    perms = _to_host(self._perms(self.state.rng)[1]) if up.compact_groups else None  # the update's shuffle
    plan = plan_update(keep_B[::n], np.arange(N)[None, :] < lengths_B[:, None], perms, num_generations=n,
                       num_minibatches=up.num_minibatches, quantum=self.group_quantum, compact=up.compact_groups,
                       trim=up.trim_completions)
    if jax.process_count() > 1:  # a pure function of global data: every process must have the same plan
      crc = lambda x: zlib.crc32(np.ascontiguousarray(x, np.int32).tobytes()) & 0x7FFFFFFF  # noqa: E731 (int32)
      mine = np.array([plan.width, plan.groups_per_minibatch, crc(plan.rows),
                       0 if plan.order is None else crc(plan.order)], np.int32)
      if (_allgather_host(mine).reshape(-1, len(mine)) != mine).any():
        raise RuntimeError(f"processes disagree on the update batch (width, groups, rows, order): {mine}")
    r, w = plan.rows, plan.width
    metrics["update/rows"], metrics["update/completion_width"] = float(len(r)), float(w)
    # Rows r of the rollout, cut to width w, onto the train mesh (a transfer when the rollout came from
    # other devices); per-row host inputs are [R] vectors.
    put = lambda x: jax.device_put(x, self.batch_sharding)  # noqa: E731
    with jax.set_mesh(self.mesh):
      gathered = _gather_rows(
          *(put(x) for x in (out.prompt_tokens_BxP, out.tokens_BxN, out.prompt_mask_BxP, out.mask_BxN,
                             out.logps_BxN)), put(behaviour_BxN) if behaviour_BxN is not None else None,
          self._global(r), keep, adv, width=w)
      tokens, kv_valid, mask, sampler_logps, adv_BxN, behaviour = (None if x is None else put(x) for x in gathered)
      if behaviour is not None:
        old_logps = behaviour
      else:
        old_logps = (None if self.old_logps_in_update
                     else self._logps(self.state.params, tokens, kv_valid, n_completion=w))
      ref_logps = (self._logps(self.ref_params, tokens, kv_valid, n_completion=w)
                   if self.ref_params is not None else None)
      jax.block_until_ready((old_logps, ref_logps))  # their time is time/logps_s, not the update's
      gap_data = (sampler_logps, mask)
      if old_logps is not None:
        metrics["logp_gap/sampler_vs_trainer"] = float(_logp_gap(old_logps, *gap_data))
        gap_data = None
        if up.tis_cap > 0:  # sampler != trainer numerics: reweight by the truncated ratio pi_old / pi_sampler
          adv_BxN = put(_tis(adv_BxN, old_logps, sampler_logps, up.tis_cap))
      zeros = self._global(np.zeros(mask.shape, np.float32))  # from the host: an eager jnp.zeros compiles a program
      batch = RolloutBatch(tokens, kv_valid, mask, zeros if old_logps is None else old_logps,
                           zeros if ref_logps is None else ref_logps, adv_BxN,
                           self._global((r[::n] // n).repeat(n).astype(np.int32)))
    extra = () if plan.order is None else (plan.order,)
    return batch, extra, gap_data

  def step(self) -> dict:
    """One RL iteration. Returns its metrics."""
    t0 = time.perf_counter()
    if self.pipeline is None:  # in line: sample with the current params, then update
      self.engine.load_weights(self.state.params, self.iteration)  # colocated: the same buffers, no copy
      rollout = self._make_rollout(self.iteration, self.iteration, _to_host(self.state.rng))
      self.engine.release_below(self.iteration + 1)
      self._inline_rollouts.append((t0, time.perf_counter()))
      seconds = rollout.seconds
    else:  # the rollout thread made it (or is making it): the wait is this iteration's rollout time
      if not self.pipeline.started:
        self.pipeline.start()
      rollout = self.pipeline.take(self.iteration)
      seconds = {"rollout": time.perf_counter() - t0, "reward": 0.0, "behaviour_logps": 0.0}
    t1 = time.perf_counter()
    batch, metrics, extra, gap_data = self._prepare(rollout)
    t2 = time.perf_counter()
    metrics.update({"time/rollout_s": seconds["rollout"], "time/reward_s": seconds["reward"],
                    "time/logps_s": seconds["behaviour_logps"] + t2 - t1})
    if self.pipeline is not None:  # the rollout thread's own seconds for this rollout
      metrics.update({f"pipeline/{k}_s": v for k, v in rollout.seconds.items()})
    if batch is not None:
      t_update = time.perf_counter()
      with jax.set_mesh(self.mesh):
        self.state, step_metrics, *old_logps = self._update(self.state, batch, *extra)
      step_metrics = {k: _to_host(v) for k, v in step_metrics.items()}  # one entry per optimizer step
      self.update_intervals.append((t_update, time.perf_counter()))
      if gap_data is not None:  # the old log-probs came from the update's first forward
        metrics["logp_gap/sampler_vs_trainer"] = float(_logp_gap(old_logps[0], *gap_data))
      self._count_nonfinite(step_metrics.get("skipped_nonfinite"))
      reduce = {"ratio_max": np.max, "ratio_min": np.min, "skipped_nonfinite": np.sum}
      metrics.update({f"train/{k}": float(reduce.get(k, np.mean)(v)) for k, v in step_metrics.items()})
    metrics["train/skipped_no_signal"] = float(batch is None)
    metrics["train/nonfinite_skips_total"] = self.nonfinite_skips["total"]
    self.iteration += 1
    self._stream_state = rollout.stream_state
    if self.pipeline is not None:  # the new version, to the rollout engine if a rollout to come needs it
      self.pipeline.publish(self.state.params, _to_host(self.state.rng), self.iteration)
    t3 = time.perf_counter()
    metrics["time/update_s"] = t3 - t2
    metrics["time/step_s"] = t3 - t0
    metrics["tokens/per_s"] = metrics["tokens/generated"] / max(t3 - t0, 1e-9)
    return metrics

  def _count_nonfinite(self, skipped_S):
    """Optimizer steps skipped for a non-finite loss or gradient; too many in a row stop the run."""
    if skipped_S is None:
      return
    skipped_S = np.asarray(skipped_S, bool).reshape(-1)
    self.nonfinite_skips["total"] += int(skipped_S.sum())
    if skipped_S.all():
      self.nonfinite_skips["consecutive"] += len(skipped_S)
    else:  # the skips at the end of this update (after its last good step)
      self.nonfinite_skips["consecutive"] = len(skipped_S) - 1 - int(np.flatnonzero(~skipped_S)[-1])
    if skipped_S.any():
      log.warning("iteration %d: %d of %d optimizer steps skipped (non-finite loss or gradient)",
                  self.iteration, int(skipped_S.sum()), len(skipped_S))
    limit = self.rl.update.max_nonfinite_skips
    if self.nonfinite_skips["consecutive"] > limit:
      raise NonFiniteTraining(
          f"{self.nonfinite_skips['consecutive']} optimizer steps in a row had a non-finite loss or gradient "
          f"(UpdateConfig.max_nonfinite_skips={limit}); stopping at iteration {self.iteration}. "
          f"The newest checkpoint ({self.ckpt.latest()}) holds the last finite state; lower the learning "
          f"rate or check the rewards (metrics.jsonl: train/skipped_nonfinite).")

  # --- eval --------------------------------------------------------------------------------
  def evaluate(self) -> dict[str, float]:
    """evaluation.Evaluator on the held-out split and TaskConfig.eval_sets (first reward >= 1 is a pass);
    "eval/pass_at_1" is the held-out greedy pass@1. Per-example outputs: <run_dir>/eval/iteration_<i>.jsonl."""
    out = os.path.join(self.rl.run_dir, "eval", f"iteration_{self.iteration:06d}.jsonl")
    metrics = self.evaluator(self.state.params, self.eval_sets, out)
    return {"eval/pass_at_1": metrics[f"eval/{HELDOUT}/greedy/pass_at_1"], **metrics}

  # --- the run -----------------------------------------------------------------------------
  def _host_state(self) -> dict:
    """What a checkpoint keeps beside the train state. Pipelined: also the rollouts the next iterations
    train on that older versions sampled (waits for them), and the prompt position after them."""
    state = {"iteration": self.iteration, "data": self._stream_state, "reward_events": self.reward_events,
             "eval_start": self.eval_start, "nonfinite_skips": dict(self.nonfinite_skips)}
    if self.pipeline is not None:
      if not self.pipeline.started:  # a save before the first iteration (a signal came early)
        self.pipeline.start()
      pending = self.pipeline.pending(self.iteration, self.pipeline.first_sampled_by(self.iteration))
      state.update(pending_rollouts=[r.to_json() for r in pending], consumed_data=self._stream_state)
      if pending:
        state["data"] = pending[-1].stream_state
    return state

  def _on_signal(self, signum, frame):
    name = signal.Signals(signum).name
    if self._stop_signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    self._stop_signal = name
    log.warning("%s received: finishing iteration %d, then saving a checkpoint and exiting", name,
                self.iteration + 1)

  def _should_stop(self) -> bool:
    """Whether any process got SIGTERM/SIGINT. A signal reaches one host first; all must stop at the same
    iteration, so the flag is shared (one tiny collective per iteration, only with several processes)."""
    mine = self._stop_signal is not None
    if jax.process_count() == 1:
      return mine
    return bool(_allgather_host(np.array([mine])).any())

  def run(self, stop_after: int | None = None) -> dict:
    """Run to total_steps (or stop after `stop_after` more iterations, as tests interrupt). Returns a summary."""
    rl = self.rl
    if self.eval_start is None:
      first = self.evaluate()
      self.eval_start = first["eval/pass_at_1"]
      self.writer.write(self.iteration, first)
    bar = _progress(rl.total_steps, self.iteration, enabled=self.main)
    t_start, done, last_eval, stopped_by = time.perf_counter(), 0, None, None
    t_prev, save_s = t_start, 0.0
    while self.iteration < rl.total_steps and (stop_after is None or done < stop_after):
      if self._should_stop():  # checked before each iteration, so a signal during the last one still finishes
        stopped_by = self._stop_signal or "a signal to another process"
        break
      self.profiler.before(self.iteration + 1)
      metrics = self.step()
      done += 1
      t_eval = time.perf_counter()
      if self.iteration % rl.eval.eval_every == 0 or self.iteration == rl.total_steps:
        metrics.update(self.evaluate())
        last_eval = metrics["eval/pass_at_1"]
      now = time.perf_counter()
      # Every second between two rows is in one phase: the previous row's checkpoint save, this step's
      # phases, eval, and "other" (host bookkeeping, logging). Compile time overlaps the phases.
      metrics.update({"time/eval_s": now - t_eval, "time/checkpoint_s": save_s, "time/iteration_s": now - t_prev,
                      "time/compile_s": self.compile_clock.take()})
      metrics["time/other_s"] = metrics["time/iteration_s"] - sum(metrics[f"time/{k}_s"] for k in _PHASES)
      for k in (*_PHASES, "other", "compile"):
        self.time_totals[k] = self.time_totals.get(k, 0.0) + metrics[f"time/{k}_s"]
      self.writer.write(self.iteration, metrics)
      t_prev = time.perf_counter()
      self.ckpt.maybe_save(self.iteration, self.state, self._host_state)
      save_s = time.perf_counter() - t_prev
      bar.update(1)
      bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", loss=f"{metrics.get('train/loss', 0):.3g}",
                      eval_pass1=f"{self.eval_start if last_eval is None else last_eval:.3f}")
      self.profiler.after(self.iteration)
    bar.close()
    self.profiler.close()
    finished = self.iteration >= rl.total_steps
    self.ckpt.maybe_save(self.iteration, self.state, self._host_state, force=True)  # no-op if saved
    self.ckpt.wait()
    summary = {"eval_start": self.eval_start, "iterations": self.iteration,
               "seconds": time.perf_counter() - t_start, "reward_events": dict(self.reward_events),
               "nonfinite_skips": self.nonfinite_skips["total"],
               "time_s": {k: round(v, 2) for k, v in self.time_totals.items()},
               "compile_cache_hits": self.compile_clock.cache_hits}
    if stopped_by is not None and not finished:
      summary["preempted"] = stopped_by
      log.warning("stopped by %s after iteration %d; checkpoint %d saved in %s. Rerun the same command to "
                  "resume.", summary["preempted"], self.iteration, self.iteration, self.ckpt.directory)
      return summary
    if finished:
      summary["eval_end"] = last_eval if last_eval is not None else self.evaluate()["eval/pass_at_1"]
      if rl.checkpoint.export_final:  # every process takes part (each tensor is gathered); process 0 writes
        export = os.path.join(rl.run_dir, "final_model")
        hf_io.save_model(export, self.model_cfg, self.state.params, self.tokenizer, to_host=_to_host,
                         write=self.main)
        summary["final_model"] = export
    if self.main and finished:
      summary["plot"] = plot_curves(rl.run_dir)
      with open(os.path.join(rl.run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary

  def close(self):
    if self.pipeline is not None:
      self.pipeline.close()
    self.profiler.close()
    self.compile_clock.close()
    for sig, old in self._handlers.items():
      signal.signal(sig, old)
    self._handlers = {}
    self.ckpt.close()
    self.writer.close()
    self.scorer.close()


_PHASES = ("rollout", "reward", "logps", "update", "eval", "checkpoint")  # time/<phase>_s, summed per iteration


class NonFiniteTraining(RuntimeError):
  """Too many optimizer steps in a row had a non-finite loss or gradient."""


@functools.partial(jax.jit, static_argnames=("width",))
def _gather_rows(prompt_BxP, tokens_BxN, prompt_mask_BxP, mask_BxN, sampler_logps_BxN, behaviour_BxN, rows_R, keep_B,
                 adv_B, *, width: int):
  """The update batch's rows of a rollout, on the devices: sequences cut to `width` completion positions,
  the loss mask (completion mask x kept group), the sampler's and behaviour log-probs, the advantages."""
  keep_R, adv_R = (jnp.take(x, rows_R, axis=0) for x in (keep_B.astype(jnp.float32), adv_B))
  take = lambda x: None if x is None else jnp.take(x, rows_R, axis=0)[:, :width]  # noqa: E731
  tokens = jnp.concatenate([jnp.take(prompt_BxP, rows_R, axis=0), take(tokens_BxN)], 1).astype(jnp.int32)
  kv_valid = jnp.concatenate([jnp.take(prompt_mask_BxP, rows_R, axis=0), take(mask_BxN)], 1).astype(bool)
  mask = take(mask_BxN).astype(jnp.float32) * keep_R[:, None]
  adv = jnp.broadcast_to(adv_R[:, None], mask.shape)
  behaviour = None if behaviour_BxN is None else take(behaviour_BxN).astype(jnp.float32)
  return tokens, kv_valid, mask, take(sampler_logps_BxN).astype(jnp.float32), adv, behaviour


@jax.jit
def _logp_gap(old_BxN, sampler_BxN, loss_mask_BxN):
  """Mean |trainer - sampler| log-prob over the tokens that enter the loss (0 when there are none)."""
  m = loss_mask_BxN > 0
  return jnp.where(m, jnp.abs(old_BxN - sampler_BxN), 0.0).sum() / jnp.maximum(m.sum(), 1)


@functools.partial(jax.jit, static_argnames=("cap",))
def _tis(adv_BxN, old_BxN, sampler_BxN, cap: float):
  """Truncated importance weight min(pi_old / pi_sampler, cap) on the advantages."""
  return adv_BxN * jnp.minimum(jnp.exp(jnp.clip(old_BxN - sampler_BxN, -20, 20)), cap)


_to_host, _allgather_host = sharding.to_host, sharding.allgather_host


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, desc="RL", dynamic_ncols=True)
