"""The RL loop: prompts -> rollout -> rewards -> advantages -> old log-probs -> updates.

Read top to bottom: set-up (assembled from the parts of parts.py), one iteration (`step`: `_rollout` ->
`_advantages` -> `_update_batch` -> `_apply_update` -> `_advance`), eval, and `run`. Where each piece
lives: the run config (RLConfig and its sections) trainer/config.py; making a rollout rollouts.py; the
update batch's rows and gathers batch.py; stopping signals and the non-finite guard signals.py.
Everything on the device is jitted once per prompt bucket; the host only tokenises, scores and logs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import numpy as np

from cispo_jax import sharding
from cispo_jax.config.operative import bindings, record_operative_config
from cispo_jax.rl import advantages as adv_lib
from cispo_jax.rl import losses
from cispo_jax.rl.optim import OptimConfig
from cispo_jax.rl.train_step import RolloutBatch
from cispo_jax.rollout.config import sampling_config
from cispo_jax.rollout.engine import Rollout
from cispo_jax.rollout.pipeline import Pipeline
from cispo_jax.runtime.checkpoint import Checkpointer
from cispo_jax.runtime.compile_cache import CompileClock
from cispo_jax.runtime.metrics import MetricWriter, plot_curves
from cispo_jax.runtime.profiler import IterationProfiler
from cispo_jax.task import HELDOUT, TaskConfig
from cispo_jax.trainer import adapters
from cispo_jax.trainer import batch as batch_lib
from cispo_jax.trainer import parts
from cispo_jax.trainer.config import RLConfig
from cispo_jax.trainer.rollouts import RolloutMaker
from cispo_jax.trainer.signals import RolloutWatch, StopSignals, count_nonfinite

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
    """Assembled from the parts of parts.py. rollout_thread: rollouts from a producer thread
    (pipeline.py); default: RolloutConfig.pipelined. With max_staleness 0 on the train mesh that thread
    runs in lock-step with the update and gives the synchronous loop's result bit for bit
    (tests/test_pipeline.py)."""
    self.rl, self.loss_cfg, self.task = rl, run_loss_config(loss, rl), task
    self.rollout_thread = rl.rollout.pipelined if rollout_thread is None else rollout_thread
    self.main = sharding.is_main_process()
    self.ckpt = self._open_run_dir(operative_config, allow_config_change)

    train_devices, rollout_devices = parts.split_devices(rl, devices)
    self.mesh = sharding.make_mesh(mesh_cfg, train_devices)
    self.model_cfg, self.tokenizer, self.stops = parts.load_policy(rl)
    self.st = st = parts.build_state(rl, self.loss_cfg, optim, self.mesh, self.model_cfg)
    self.state, self.state_shardings, self.batch_sharding = st.state, st.state_shardings, st.batch_sharding
    self.ref_params, self.frozen = st.ref_params, st.frozen
    self.eval_engine, self.engine = parts.build_engines(rl, self.model_cfg, self.tokenizer, self.mesh,
                                                        rollout_devices)
    data = parts.build_data(rl, task, self.tokenizer, self.model_cfg)
    self.stream, self.eval_sets = data.stream, data.eval_sets
    train_sampling = sampling_config(rl.rollout, self.tokenizer, self.stops, greedy=False,
                                     n=rl.rollout.num_generations)
    self._make_rollout = RolloutMaker(rl, self.engine, self.stream, data.scorer, self.tokenizer, train_sampling)
    self.evaluator = parts.build_evaluator(rl, task, self.eval_engine, self.tokenizer, data.scorer, self.stops)
    self.fns = parts.build_update(rl, self.loss_cfg, self.model_cfg, st, self.mesh, data, self.tokenizer)

    start = parts.resume(self.ckpt, self.state, self.stream, functools.partial(
        adapters.check_base, rl=rl, fingerprint=st.base_fingerprint, directory=self.ckpt.directory))
    self.iteration, self.state, self.eval_start = start.iteration, start.state, start.eval_start
    self.reward_events, self.nonfinite_skips = start.reward_events, start.nonfinite_skips
    self._stream_state = start.stream_state
    self.pipeline = self._start_pipeline(start) if self.rollout_thread else None
    self._open_logs(start.restored, operative_config)
    self.signals = StopSignals(lambda: self.iteration)  # undone by close()
    self.watch = RolloutWatch(rl, self.stops, self.tokenizer)

  def _open_run_dir(self, operative_config: str, allow_config_change: bool) -> Checkpointer:
    """The run directory's checkpointer, after the operative config is recorded: before anything is
    built, so that a refused config change costs nothing."""
    rl = self.rl
    os.makedirs(rl.run_dir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(rl.run_dir, "checkpoints"), rl.checkpoint.save_every,
                        rl.checkpoint.keep_checkpoints)
    if operative_config:
      record_operative_config(rl.run_dir, parts.resolved_operative(operative_config, rl), write=self.main,
                              resuming=ckpt.latest() is not None, allow_change=allow_config_change,
                              iteration=ckpt.latest())
    return ckpt

  def _start_pipeline(self, start: parts.Resumed) -> Pipeline:
    """The rollout thread. Rollouts older than the restored version come from the checkpoint; a run
    resumed without them (a checkpoint of the synchronous loop) samples its first rollouts with the
    restored version. Started by the first step()."""
    ro = self.rl.rollout
    pipeline = Pipeline(self._make_rollout, self.engine, staleness=ro.max_staleness, sync_every=ro.weight_sync_every,
                        first=self.iteration + len(start.pending), total=self.rl.total_steps,
                        base_version=self.iteration if start.restored and not start.pending else 0,
                        pending=start.pending)
    pipeline.publish(self.policy_params, _to_host(self.state.rng), self.iteration)
    return pipeline

  def _open_logs(self, restored: bool, operative_config: str):
    rl = self.rl
    # (start, end) perf_counter seconds of each update and each rollout made (benchmarks/bench_pipeline.py)
    self.update_intervals: list[tuple[float, float]] = []
    self._inline_rollouts: list[tuple[float, float]] = []
    # Rows after the checkpoint (or all, when there is none) came from a dead attempt: dropped.
    self.writer = MetricWriter(rl.run_dir, enabled=self.main, resume_from=self.iteration if restored else None,
                               wandb_project=rl.wandb_project, hparams=bindings(operative_config))
    self.profiler = IterationProfiler(rl.profile_iterations, os.path.join(rl.run_dir, "profile"), self.main)
    self.compile_clock, self.time_totals = CompileClock(), {}

  # The rollout maker's scorer and sampling config (a test may swap in its own).
  scorer = property(lambda self: self._make_rollout.scorer,
                    lambda self, v: setattr(self._make_rollout, "scorer", v))
  train_sampling = property(lambda self: self._make_rollout.train_sampling,
                            lambda self, v: setattr(self._make_rollout, "train_sampling", v))

  @property
  def policy_params(self):
    """The policy's parameter tree: state.params, or with LoRA the frozen base with the trained adapters."""
    return self.st.policy(self.state.params)

  @property
  def rollout_intervals(self) -> list[tuple[float, float]]:
    return self.pipeline.busy if self.pipeline is not None else self._inline_rollouts

  # --- one iteration -----------------------------------------------------------------------
  def _global(self, x: np.ndarray) -> jax.Array:
    """A host array that every process holds in full -> a batch-sharded global array."""
    return jax.make_array_from_callback(x.shape, self.batch_sharding, lambda idx: x[idx])

  def step(self) -> dict:
    """One RL iteration: rollout -> reward -> advantage -> update -> metrics. Returns its metrics."""
    t0 = time.perf_counter()
    rollout, seconds = self._rollout()  # sampled with policy rollout.version, and scored
    t1 = time.perf_counter()
    lengths_B = _to_host(rollout.out.lengths_B)  # [B] ints: the only per-row data besides the rewards on the host
    stopped_B = _to_host(rollout.out.stopped_B)
    adv, keep, keep_B, overlong = self._advantages(rollout, lengths_B, stopped_B)
    metrics = self._rollout_metrics(rollout, lengths_B, stopped_B, keep_B)
    metrics.update(overlong)
    prepared = self._update_batch(rollout, lengths_B, adv, keep, keep_B, metrics) if keep_B.any() else None
    t2 = time.perf_counter()
    metrics.update({"time/rollout_s": seconds["rollout"], "time/reward_s": seconds["reward"],
                    "time/logps_s": seconds["behaviour_logps"] + t2 - t1})
    if self.pipeline is not None:  # the rollout thread's own seconds for this rollout
      metrics.update({f"pipeline/{k}_s": v for k, v in rollout.seconds.items()})
    if prepared is not None:  # else no group carries signal: no update
      self._apply_update(*prepared, metrics)
    metrics["train/skipped_no_signal"] = float(prepared is None)
    metrics["train/nonfinite_skips_total"] = self.nonfinite_skips["total"]
    self._advance(rollout)
    t3 = time.perf_counter()
    metrics.update({"time/update_s": t3 - t2, "time/step_s": t3 - t0})
    metrics["tokens/per_s"] = metrics["tokens/generated"] / max(t3 - t0, 1e-9)
    return metrics

  def _rollout(self) -> tuple[Rollout, dict]:
    """This iteration's rollout and its seconds (sampling, reward, behaviour log-probs)."""
    t0 = time.perf_counter()
    if self.pipeline is None:  # in line: sample with the current params
      self.engine.load_weights(self.policy_params, self.iteration)  # colocated: the same buffers, no copy
      rollout = self._make_rollout(self.iteration, self.iteration, _to_host(self.state.rng))
      self.engine.release_below(self.iteration + 1)
      self._inline_rollouts.append((t0, time.perf_counter()))
      return rollout, rollout.seconds
    # the rollout thread made it (or is making it): the wait is this iteration's rollout time
    if not self.pipeline.started:
      self.pipeline.start()
    rollout = self.pipeline.take(self.iteration)
    return rollout, {"rollout": time.perf_counter() - t0, "reward": 0.0, "behaviour_logps": 0.0}

  def _advantages(self, r: Rollout, lengths_B, stopped_B):
    """(adv, keep, keep_B, metrics): advantages and zero-variance mask, on the devices, of the rewards with
    DAPO's overlong penalty; keep_B (host, per group) plans the update; the overlong filter and failed rewards
    (TaskConfig.on_reward_error='mask': also out of their groups' statistics) zero rows."""
    up, n = self.rl.update, self.rl.rollout.num_generations
    for k in self.reward_events:
      self.reward_events[k] += int(r.stats.get(k, 0))
    rewards_B, valid_B, row_keep, metrics = batch_lib.reward_shaping(self.rl, self.task.on_reward_error, r,
                                                                     lengths_B, stopped_B)
    adv, keep = adv_lib.advantages_and_keep(batch_lib.replicate(self.mesh, rewards_B), up.advantage, n,
                                            up.filter_zero_variance, batch_lib.replicate(self.mesh, valid_B))
    keep, keep_B = batch_lib.keep_rows(keep, row_keep, n, self.mesh)
    return adv, keep, keep_B, metrics

  def _rollout_metrics(self, r: Rollout, lengths_B: np.ndarray, stopped_B: np.ndarray, keep_B: np.ndarray) -> dict:
    rewards_B = r.rewards_B
    metrics = {
        "reward/mean": float(rewards_B.mean()), "reward/std": float(rewards_B.std()),
        "reward/pass_rate": float((rewards_B >= 1.0).mean()), "completion/length": float(lengths_B.mean()),
        "completion/stopped": float(stopped_B.mean()), "groups/kept_frac": float(keep_B.mean()),
        "logp_gap/sampler_vs_trainer": 0.0,  # over the tokens that enter the loss; set below or after the update
        "reward_events/errors": self.reward_events["errors"],
        "reward_events/timeouts": self.reward_events["timeouts"],
        "tokens/generated": float(lengths_B.sum()),
    }
    self.watch.check(self.iteration + 1, rewards_B, stopped_B)  # all truncated, or no signal for a while
    if self.rollout_thread:  # updates since the policy that sampled this rollout
      metrics["pipeline/staleness"] = float(self.iteration - r.version)
    if len(self.task.reward_list()) > 1:  # each reward of a mix, on this process's rows
      metrics.update({f"reward/{name}": float(r.stats[f"{name}/mean"]) for name, _ in self.task.reward_list()})
    return metrics

  def _update_batch(self, r: Rollout, lengths_B, adv, keep, keep_B, metrics):
    """The update's rows and width (the plan, from the host's keep_B), gathered on the devices from the
    rollout's arrays and the advantages / keep flags (adv, keep: replicated [B]), then the old and
    reference log-probs on just those rows. Returns (batch, extra inputs of the update, host data for
    the logp gap when the update's first forward gives the old log-probs)."""
    up, n = self.rl.update, self.rl.rollout.num_generations
    source = parts.old_logps_source(self.rl, stale_rollout=r.version != self.iteration)
    perms = _to_host(self.fns.perms(self.state.rng)[1]) if up.compact_groups else None  # the update's shuffle
    plan = batch_lib.plan(self.rl, keep_B, lengths_B, r.out.tokens_BxN.shape[1], perms, self.fns.group_quantum)
    rows, w = plan.rows, plan.width
    metrics["update/rows"], metrics["update/completion_width"] = float(len(rows)), float(w)
    behaviour = _behaviour_logps(r) if source == parts.BEHAVIOUR else None
    with jax.set_mesh(self.mesh):
      tokens, kv_valid, mask, sampler_logps, adv_BxN, behaviour = self.fns.gather(
          r.out, behaviour, self._global(rows), keep, adv, width=w, batch_sharding=self.batch_sharding)
      old_logps = {parts.BEHAVIOUR: lambda: behaviour, parts.UPDATE_FORWARD: lambda: None,
                   parts.SEPARATE_FORWARD: lambda: self.fns.logps(self.policy_params, tokens, kv_valid,
                                                                  n_completion=w)}[source]()
      ref_logps = (self.fns.logps(self.ref_params, tokens, kv_valid, n_completion=w)
                   if self.ref_params is not None else None)
      jax.block_until_ready((old_logps, ref_logps))  # their time is time/logps_s, not the update's
      gap_data = (sampler_logps, mask)
      if old_logps is not None:
        metrics["logp_gap/sampler_vs_trainer"] = float(batch_lib.logp_gap(old_logps, *gap_data))
        gap_data = None
        if up.tis_cap > 0:  # sampler != trainer numerics: reweight by the truncated ratio pi_old / pi_sampler
          adv_BxN = jax.device_put(batch_lib.tis(adv_BxN, old_logps, sampler_logps, up.tis_cap), self.batch_sharding)
      zeros = self._global(np.zeros(mask.shape, np.float32))  # from the host: an eager jnp.zeros compiles a program
      batch = RolloutBatch(tokens, kv_valid, mask, zeros if old_logps is None else old_logps,
                           zeros if ref_logps is None else ref_logps, adv_BxN,
                           self._global((rows[::n] // n).repeat(n).astype(np.int32)))
    return batch, () if plan.order is None else (plan.order,), gap_data

  def _apply_update(self, batch: RolloutBatch, extra: tuple, gap_data, metrics: dict):
    """The jitted update on the batch; its metrics (reduced over micro-batches and steps) into `metrics`."""
    t_update = time.perf_counter()
    with jax.set_mesh(self.mesh):
      self.state, packed, *old_logps = self.fns.update(self.state, batch, *extra, self.frozen)
    update_metrics, per_step = packed.unpack(_to_host(packed.values))  # reduced on the devices: one transfer
    self.update_intervals.append((t_update, time.perf_counter()))
    if gap_data is not None:  # the old log-probs came from the update's first forward
      metrics["logp_gap/sampler_vs_trainer"] = float(batch_lib.logp_gap(old_logps[0], *gap_data))
    count_nonfinite(self.nonfinite_skips, per_step["skipped_nonfinite"], iteration=self.iteration,
                    limit=self.rl.update.max_nonfinite_skips, latest_checkpoint=self.ckpt.latest())
    metrics.update({f"train/{k}": v for k, v in update_metrics.items()})

  def _advance(self, r: Rollout):
    """The next iteration: the prompt position after this rollout, the new version to the rollout
    engine if a rollout to come needs it."""
    self.iteration += 1
    self._stream_state = r.stream_state
    if self.pipeline is not None:
      self.pipeline.publish(self.policy_params, _to_host(self.state.rng), self.iteration)

  # --- eval --------------------------------------------------------------------------------
  def evaluate(self) -> dict[str, float]:
    """evaluation.Evaluator on the held-out split and TaskConfig.eval_sets (first reward >= 1 is a pass);
    "eval/pass_at_1" is the held-out greedy pass@1. Per-example outputs: <run_dir>/eval/iteration_<i>.jsonl."""
    out = os.path.join(self.rl.run_dir, "eval", f"iteration_{self.iteration:06d}.jsonl")
    metrics = self.evaluator(self.policy_params, self.eval_sets, out)
    return {"eval/pass_at_1": metrics[f"eval/{HELDOUT}/greedy/pass_at_1"], **metrics}

  # --- the run -----------------------------------------------------------------------------
  def _host_state(self) -> dict:
    """What a checkpoint keeps beside the train state. Pipelined: also the rollouts the next iterations
    train on that older versions sampled (waits for them), and the prompt position after them."""
    state = {"iteration": self.iteration, "data": self._stream_state, "reward_events": self.reward_events,
             "eval_start": self.eval_start, "nonfinite_skips": dict(self.nonfinite_skips),
             **adapters.base_record(self.rl, self.st.base_fingerprint)}
    if self.pipeline is not None:
      if not self.pipeline.started:  # a save before the first iteration (a signal came early)
        self.pipeline.start()
      pending = self.pipeline.pending(self.iteration, self.pipeline.first_sampled_by(self.iteration))
      state.update(pending_rollouts=[r.to_json() for r in pending], consumed_data=self._stream_state)
      if pending:
        state["data"] = pending[-1].stream_state
    return state

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
      if self.signals.should_stop():  # checked before each iteration, so a signal during the last one still finishes
        stopped_by = self.signals.received or "a signal to another process"
        break
      self.profiler.before(self.iteration + 1)
      metrics = self.step()
      done += 1
      t_eval = time.perf_counter()
      if self.iteration % rl.eval.eval_every == 0 or self.iteration == rl.total_steps:
        metrics.update(self.evaluate())
        last_eval = metrics["eval/pass_at_1"]
      self._add_times(metrics, t_eval, t_prev, save_s)
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
    return self._finish(time.perf_counter() - t_start, last_eval, stopped_by)

  def _add_times(self, metrics: dict, t_eval: float, t_prev: float, save_s: float):
    """Every second between two rows is in one phase: the previous row's checkpoint save, this step's
    phases, eval, and "other" (host bookkeeping, logging). Compile time overlaps the phases."""
    now = time.perf_counter()
    metrics.update({"time/eval_s": now - t_eval, "time/checkpoint_s": save_s, "time/iteration_s": now - t_prev,
                    "time/compile_s": self.compile_clock.take(), **self.fns.program_counts()})
    metrics["time/other_s"] = metrics["time/iteration_s"] - sum(metrics[f"time/{k}_s"] for k in _PHASES)
    for k in (*_PHASES, "other", "compile"):
      self.time_totals[k] = self.time_totals.get(k, 0.0) + metrics[f"time/{k}_s"]

  def _finish(self, seconds: float, last_eval, stopped_by) -> dict:
    """The last checkpoint, then the summary; a finished run also exports the model and writes
    summary.json and the plot."""
    rl = self.rl
    finished = self.iteration >= rl.total_steps
    self.ckpt.maybe_save(self.iteration, self.state, self._host_state, force=True)  # no-op if saved
    self.ckpt.wait()
    summary = {"eval_start": self.eval_start, "iterations": self.iteration, "seconds": seconds,
               "reward_events": dict(self.reward_events), "nonfinite_skips": self.nonfinite_skips["total"],
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
        adapters.export_final(export, rl, self.st, self.state.params, self.model_cfg, self.tokenizer,
                              to_host=_to_host, write=self.main)
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
    self.signals.close()
    self.ckpt.close()
    self.writer.close()
    self.scorer.close()


_PHASES = ("rollout", "reward", "logps", "update", "eval", "checkpoint")  # time/<phase>_s, summed per iteration


def _behaviour_logps(r: Rollout):
  """A stale rollout's old log-probs: the behaviour policy's training forward (behaviour_logps
  "recompute"), else the sampler's own."""
  return r.behaviour_logps_BxN if r.behaviour_logps_BxN is not None else r.out.logps_BxN


_to_host = sharding.to_host
def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, desc="RL", dynamic_ncols=True)
