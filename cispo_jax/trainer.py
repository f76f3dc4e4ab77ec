"""The RL loop: prompts -> rollout -> rewards -> advantages -> old log-probs -> updates.

Read top to bottom: config, set-up (mesh, model, sharded state, data, checkpoints), one
iteration (`_rollout`, `_update`), eval, and `run`. Everything on the device is jitted once
per prompt bucket; the host only tokenises, scores and logs.
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
from jax.experimental import multihost_utils

from cispo_jax import advantages as adv_lib
from cispo_jax import data as data_lib
from cispo_jax import losses, sampling, sharding
from cispo_jax.checkpoint import Checkpointer, abstract_like
from cispo_jax.compile_cache import CompileClock
from cispo_jax.evaluation import Evaluator
from cispo_jax.metrics import MetricWriter, plot_curves
from cispo_jax.model import hf_io, logical_axes, param_shapes
from cispo_jax.optim import OptimConfig, make_optimizer
from cispo_jax.profiler import IterationProfiler, check_iterations
from cispo_jax.task import HELDOUT, Scorer, TaskConfig, make_sources
from cispo_jax.update_plan import group_quantum, plan_update
from cispo_jax.train_step import (RolloutBatch, StepConfig, TrainState, completion_logps, epoch_permutations,
                                  update_on_rollout)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The RL loop. Names follow TRL where they exist (num_generations, num_iterations)."""
  run_dir: str = "runs/default"
  model_dir: str = ""  # local HF directory; "" = bootstrap the small offline model (bootstrap.py)
  total_steps: int = 40  # RL iterations (rollout + updates)
  prompts_per_step: int = 16
  num_generations: int = 8  # completions per prompt (the group)
  num_iterations: int = 2  # passes over each rollout; > 1 makes the policy ratio depart from 1
  num_minibatches: int = 2  # optimizer steps per pass
  micro_batches: int = 1  # gradient accumulation inside each optimizer step
  max_new_tokens: int = 8
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  advantage: str = "grpo"  # see advantages.ADVANTAGES
  filter_zero_variance: bool = True  # groups whose rewards are all equal carry no signal
  tis_cap: float = 0.0  # > 0: truncated IS correction min(pi_old / pi_sampler, cap) on the advantages
  eval_every: int = 10
  eval_size: int = 128
  save_every: int = 10
  keep_checkpoints: int = 2
  seed: int = 0
  export_final: bool = True
  apply_chat_template: bool = False
  prompt_buckets: tuple = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # padded prompt lengths (one program each)
  # How to run the model (overrides of the checkpoint's config).
  dtype: str = "float32"
  param_dtype: str = "float32"
  lm_head_f32: bool = True
  remat: bool = False  # rematerialise each layer in the backward pass
  remat_policy: str = "nothing_saveable"  # nothing_saveable | save_dots | save_dots_no_batch | offload_dots
  scan_unroll: int = 0  # layers per iteration of the layer scan; 0 = auto (ModelConfig.scan_unroll)
  attention_impl: str = "auto"  # auto | dense | blockwise | cudnn | splash (model/attention.py)
  attention_block: int = 512
  logprob_chunk: int = 1024  # completion positions per LM-head chunk of the training log-probs
  max_nonfinite_skips: int = 10  # consecutive optimizer steps skipped for a NaN/inf loss or gradient before the run stops
  # Update work that carries no gradient (each switch leaves the loss and gradient unchanged up to f32 rounding;
  # tests/test_update_work.py):
  # compact_groups: groups with mask 0 everywhere (filter_zero_variance's all-equal groups) leave the update batch
  #   (and the old/reference log-prob forwards). Each minibatch keeps exactly the weighted groups the masked full
  #   batch would give it (the update's shuffle is drawn on the host from the same key) and is padded with
  #   zero-weight groups to a bucket: quantum * {1, 2, 3, 4, 6, 8, 12, ...}, the quantum being the smallest group
  #   count that splits into micro_batches and over the data x fsdp devices; the full size when that is reached.
  #   Every aggregation's sums and denominators (Dr.GRPO's constant included), the KL and the entropy terms see
  #   masked tokens only, so dropping them changes nothing. A few update programs get compiled (one per bucket).
  #   With micro_batches > 1 the train/ token-mean metrics (ratio_mean, kl_ref, entropy, pg_loss, ...), which are
  #   averaged per micro-batch, can shift because other groups share a micro-batch; train/loss and the gradient
  #   do not. logp_gap/sampler_vs_trainer is measured on the tokens that enter the loss (either way).
  compact_groups: bool = True
  # trim_completions: the update's completion axis (and the token / kv arrays) cut to 8 * {1, 2, 3, 4, 6, ...}
  #   positions >= the longest completion that enters the loss (capped at max_new_tokens). The positions cut are
  #   padding after every kept completion stopped; attention is causal, so the others do not change.
  trim_completions: bool = True
  # old_logps_in_update: with num_minibatches == 1 and tis_cap == 0 the first optimizer step's forward runs the
  #   params the rollout was sampled with on every row: it gives the old log-probs (stop_gradient, ratio exactly 1)
  #   and the separate old-log-prob forward is skipped (the reference forward for a KL stays). The old log-probs
  #   then come from the training forward itself rather than from a second program: equal to f32 rounding in
  #   float32 (at bf16, within the compute dtype's rounding, and the first step's ratio is exactly 1). TIS needs
  #   them on the host before the update, and a later minibatch needs the pre-update params: then the separate
  #   forward runs as before. logp_gap/sampler_vs_trainer is computed after the update then.
  old_logps_in_update: bool = True
  profile_iterations: tuple[int, ...] = ()  # (i, j): jax.profiler trace of iterations i..j into <run_dir>/profile
  wandb_project: str = ""  # also log to Weights & Biases (optional package; WANDB_MODE=offline works offline)

  def __post_init__(self):
    positive = ("total_steps", "prompts_per_step", "num_generations", "num_iterations",
                "num_minibatches", "micro_batches", "max_new_tokens", "eval_every", "save_every",
                "eval_size", "keep_checkpoints", "max_nonfinite_skips")
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f"RLConfig.{name}={getattr(self, name)}; must be >= 1")
    if self.prompts_per_step % (self.num_minibatches * self.micro_batches):
      raise ValueError(
          f"RLConfig.prompts_per_step={self.prompts_per_step} must be divisible by num_minibatches *"
          f" micro_batches={self.num_minibatches * self.micro_batches} (prompt groups are never split)")
    if self.advantage not in adv_lib.ADVANTAGE_ESTIMATORS:
      raise ValueError(f"RLConfig.advantage={self.advantage!r}; allowed: {sorted(adv_lib.ADVANTAGE_ESTIMATORS)}")
    if not self.temperature > 0:
      raise ValueError(f"RLConfig.temperature={self.temperature}; must be > 0")
    check_iterations(self.profile_iterations)


def run_loss_config(loss: losses.LossConfig, rl: RLConfig) -> losses.LossConfig:
  """The loss as this run uses it: Dr.GRPO's constant normaliser defaults to max_new_tokens."""
  if loss.max_completion_length is None:
    loss = dataclasses.replace(loss, max_completion_length=rl.max_new_tokens)
  return loss.resolved()


def _sampling_config(rl: RLConfig, tokenizer, *, greedy: bool, n: int) -> sampling.SamplingConfig:
  return sampling.SamplingConfig(
      max_new_tokens=rl.max_new_tokens, temperature=1.0 if greedy else rl.temperature, greedy=greedy,
      top_k=0 if greedy else rl.top_k, top_p=1.0 if greedy else rl.top_p,
      min_p=0.0 if greedy else rl.min_p, stop_token_ids=(tokenizer.eos_token_id,), num_samples=n,
      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
      prompt_buckets=tuple(rl.prompt_buckets))


@functools.partial(jax.jit, static_argnames=("model_cfg", "n_completion", "temperature", "micro_batches"))
def batched_completion_logps(params, tokens_BxL, kv_valid_BxL, *, model_cfg, n_completion: int,
                             temperature: float, micro_batches: int):
  """Training-forward log-probs of the completions, micro-batched like the update.

  Module-level and keyed only on what shapes the program, so every Trainer in a process
  (and the reference model) shares one compilation.
  """
  B, m = tokens_BxL.shape[0], micro_batches
  def one(args):
    return completion_logps(params, model_cfg, *args, n_completion, temperature)[0]
  # Chunk j takes rows j, j+m, ...: the sharded batch axis stays leading (no communication).
  chunks = tuple(x.reshape(B // m, m, -1).swapaxes(0, 1) for x in (tokens_BxL, kv_valid_BxL))
  return jax.lax.map(one, chunks).swapaxes(0, 1).reshape(B, n_completion)


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; rerun the same command to resume


class Trainer:
  def __init__(self, rl: RLConfig, loss: losses.LossConfig, optim: OptimConfig,
               mesh_cfg: sharding.MeshConfig, task: TaskConfig, operative_config: str = "",
               devices=None, allow_config_change: bool = False):
    self.rl, self.loss_cfg, self.task = rl, run_loss_config(loss, rl), task
    self.main = sharding.is_main_process()
    os.makedirs(rl.run_dir, exist_ok=True)
    self.ckpt = Checkpointer(os.path.join(rl.run_dir, "checkpoints"), rl.save_every, rl.keep_checkpoints)
    resuming = self.ckpt.latest() is not None
    if operative_config:  # before anything is built: a refused config change costs nothing
      record_operative_config(rl.run_dir, operative_config, resuming=resuming, allow_change=allow_config_change,
                              iteration=self.ckpt.latest(), write=self.main)

    # --- mesh and model -------------------------------------------------------------------
    self.mesh = sharding.make_mesh(mesh_cfg, devices)
    self.model_cfg = hf_io.load_config(rl.model_dir, **{k: getattr(rl, k) for k in hf_io.RUN_OVERRIDES})
    self.tokenizer = hf_io.load_tokenizer(rl.model_dir)
    if self.tokenizer.eos_token_id is None:
      raise ValueError(f"tokenizer in {rl.model_dir} has no eos_token: the sampler needs a stop token")

    # --- sharded state: parameters by the logical-axis rules, the optimizer state alike --------
    updates_per_step = rl.num_iterations * rl.num_minibatches
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

    # --- data, rewards ---------------------------------------------------------------------
    proc, nproc = jax.process_index(), jax.process_count()
    if rl.prompts_per_step % nproc:
      raise ValueError(f"RLConfig.prompts_per_step={rl.prompts_per_step} must be divisible by the "
                       f"process count {nproc}")
    train_src, eval_examples = make_sources(task, seed=rl.seed)
    # Every prompt checked before anything compiles: too long for the buckets or the model, or token ids
    # outside the model's vocabulary (TaskConfig.too_long: drop and count, or refuse naming file:line).
    train_src, eval_examples = task.check_sources(
        train_src, eval_examples, self.tokenizer, self.model_cfg, max_new_tokens=rl.max_new_tokens,
        prompt_buckets=rl.prompt_buckets, apply_chat_template=rl.apply_chat_template)
    # Evaluated every eval_every: the held-out split, then TaskConfig.eval_sets (evaluation.py shards each).
    self.eval_sets = {HELDOUT: eval_examples[:min(rl.eval_size, len(eval_examples))], **task.eval_sources(
        self.tokenizer, self.model_cfg, max_new_tokens=rl.max_new_tokens, prompt_buckets=rl.prompt_buckets,
        apply_chat_template=rl.apply_chat_template)}
    self.stream = data_lib.PromptStream(train_src, rl.prompts_per_step, seed=rl.seed).shard(proc, nproc)
    self.scorer = Scorer(task)
    self.train_sampling = _sampling_config(rl, self.tokenizer, greedy=False, n=rl.num_generations)
    self.eval_sampling = _sampling_config(rl, self.tokenizer, greedy=True, n=1)
    self.evaluator = Evaluator(
        self._generate, self._local_rows, self.tokenizer, self.scorer, greedy_cfg=self.eval_sampling,
        sampled_cfg=_sampling_config(rl, self.tokenizer, greedy=False, n=task.eval_samples) if task.eval_samples
        else None, ks=task.pass_k(), batch_size=task.eval_batch_size, seed=rl.seed)

    # --- jitted functions ------------------------------------------------------------------
    self.step_cfg = StepConfig(model=self.model_cfg, loss=self.loss_cfg, temperature=rl.temperature,
                               micro_batches=rl.micro_batches, num_generations=rl.num_generations,
                               use_ref=self.ref_params is not None)
    self._logps = functools.partial(batched_completion_logps, model_cfg=self.model_cfg,
                                    temperature=rl.temperature, micro_batches=rl.micro_batches)
    # The old log-probs come out of the update's first forward when nothing needs them before it.
    self.old_logps_in_update = rl.old_logps_in_update and rl.num_minibatches == 1 and rl.tis_cap == 0
    update = functools.partial(update_on_rollout, cfg=self.step_cfg, tx=self.tx, schedule=self.schedule,
                               num_iterations=rl.num_iterations, num_minibatches=rl.num_minibatches,
                               old_from_first_step=self.old_logps_in_update)
    rep = sharding.replicated(self.mesh)
    outs = (self.state_shardings, rep) + ((self.batch_sharding,) if self.old_logps_in_update else ())
    if rl.compact_groups:  # the host passes each epoch's minibatch order (plan_update)
      self._update = jax.jit(update, in_shardings=(self.state_shardings, self.batch_sharding, rep),
                             out_shardings=outs, donate_argnums=0)
    else:
      self._update = jax.jit(lambda state, batch: update(state, batch), in_shardings=(
          self.state_shardings, self.batch_sharding), out_shardings=outs, donate_argnums=0)
    self._perms = jax.jit(functools.partial(epoch_permutations, n_groups=rl.prompts_per_step,
                                            num_iterations=rl.num_iterations), out_shardings=rep)
    sizes = dict(self.mesh.shape)
    self.group_quantum = group_quantum(rl.num_generations, rl.micro_batches, sizes["data"] * sizes["fsdp"])

    # --- resume, logs -------------------------------------------------------------------------
    self.iteration, self.eval_start = 0, None
    self.reward_events = {"errors": 0, "timeouts": 0}
    self.nonfinite_skips = {"total": 0, "consecutive": 0}
    restored = self.ckpt.restore_latest_good(abstract_like(self.state))  # verified; bad ones moved aside
    if restored is not None:
      _, self.state, host = restored
      self.iteration = host["iteration"]
      self.stream.restore(host["data"])
      self.reward_events, self.eval_start = host["reward_events"], host["eval_start"]
      self.nonfinite_skips = host.get("nonfinite_skips", self.nonfinite_skips)
      log.info("resumed from %s at iteration %d", self.ckpt.directory, self.iteration)
    # Rows after the checkpoint (or all, when there is none) came from a dead attempt: dropped.
    self.writer = MetricWriter(rl.run_dir, enabled=self.main,
                               resume_from=self.iteration if restored is not None else None,
                               wandb_project=rl.wandb_project, hparams=_bindings(operative_config))
    self.profiler = IterationProfiler(rl.profile_iterations, os.path.join(rl.run_dir, "profile"), self.main)
    self._stop_signal: str | None = None
    self._handlers: dict = {}
    self.compile_clock, self.time_totals = CompileClock(), {}
    if threading.current_thread() is threading.main_thread():
      # A preemptible VM's SIGTERM, or Ctrl-C: finish the iteration, save, exit (handlers undone by close()).
      self._handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

  # --- one iteration -----------------------------------------------------------------------
  def _global(self, x: np.ndarray) -> jax.Array:
    """A host array that every process holds in full -> a batch-sharded global array."""
    return jax.make_array_from_callback(x.shape, self.batch_sharding, lambda idx: x[idx])

  def _local_rows(self, total: int) -> slice:
    return sharding.process_batch_rows(self.mesh, total, self.batch_sharding)

  def _generate(self, params, examples, key, cfg: sampling.SamplingConfig):
    """Sample on the mesh; returns the outputs as host numpy arrays (the full global batch)."""
    tok, mask = sampling.encode_prompts(self.tokenizer, [e.prompt for e in examples], cfg,
                                        apply_chat_template=self.rl.apply_chat_template)
    if jax.process_count() > 1:  # every process must feed the same bucket: the largest any of them needs
      width = int(_allgather_host(np.array([tok.shape[1]])).max())
      pad = ((0, 0), (width - tok.shape[1], 0))
      tok, mask = np.pad(tok, pad, constant_values=cfg.pad_token_id), np.pad(mask, pad)
    tok = sharding.host_local_batch_to_global(tok, self.mesh, self.batch_sharding)
    mask = sharding.host_local_batch_to_global(mask, self.mesh, self.batch_sharding)
    with jax.set_mesh(self.mesh):  # the model pins its activations' layout on this mesh
      out = sampling.generate(params, self.model_cfg, tok, mask, key, cfg, batch_sharding=self.batch_sharding)
    return jax.tree.map(_to_host, out)

  def _score(self, out, examples, n: int):
    """Score this process's rows; every process gets all rewards (advantages are global)."""
    rows = self._local_rows(out.tokens_BxN.shape[0])
    local = jax.tree.map(lambda x: x[rows], out)
    texts = sampling.decode_completions(self.tokenizer, local)
    local_examples = [e for e in examples for _ in range(n)]
    rewards, stats = self.scorer(texts, local_examples)
    return _allgather_host(rewards.astype(np.float32)), stats

  def _rollout(self, examples, key):
    """Sample, score, and build the update batch. Returns (batch or None when no group carries signal,
    metrics, extra inputs of the update, host data for the logp gap when the update computes the old
    log-probs)."""
    rl, n = self.rl, self.rl.num_generations
    t0 = time.perf_counter()
    out = self._generate(self.state.params, examples, key, self.train_sampling)
    t1 = time.perf_counter()
    rewards_B, stats = self._score(out, examples, n)
    for k in self.reward_events:
      self.reward_events[k] += int(stats.get(k, 0))
    adv_B = np.asarray(adv_lib.compute_advantages(rl.advantage, rewards_B, n), np.float32)
    keep_B = (np.asarray(adv_lib.zero_variance_mask(rewards_B, n)) if rl.filter_zero_variance
              else np.ones(rewards_B.shape, bool))
    t2 = time.perf_counter()

    valid = np.asarray(out.mask_BxN, bool)
    metrics = {
        "reward/mean": float(rewards_B.mean()), "reward/std": float(rewards_B.std()),
        "reward/pass_rate": float((rewards_B >= 1.0).mean()),
        "completion/length": float(np.asarray(out.lengths_B).mean()),
        "completion/stopped": float(np.asarray(out.stopped_B).mean()),
        "groups/kept_frac": float(keep_B.mean()),
        "logp_gap/sampler_vs_trainer": 0.0,  # over the tokens that enter the loss; set below or after the update
        "reward_events/errors": self.reward_events["errors"],
        "reward_events/timeouts": self.reward_events["timeouts"],
        "tokens/generated": float(valid.sum()),
    }
    if len(self.task.reward_list()) > 1:  # each reward of a mix, on this process's rows
      metrics.update({f"reward/{name}": float(stats[f"{name}/mean"]) for name, _ in self.task.reward_list()})
    batch, extra, gap_data = None, (), None
    if keep_B.any():  # else no update, and nothing needs the log-probs
      batch, extra, gap_data = self._update_batch(out, adv_B, keep_B, metrics)
    t3 = time.perf_counter()
    metrics.update({"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/logps_s": t3 - t2})
    return batch, metrics, extra, gap_data

  def _update_batch(self, out, adv_B, keep_B, metrics):
    """The update's rows and width (plan_update), then the old / reference log-probs on just those."""
    rl, n = self.rl, self.rl.num_generations
    perms = _to_host(self._perms(self.state.rng)[1]) if rl.compact_groups else None  # the update's shuffle
    plan = plan_update(keep_B[::n], np.asarray(out.mask_BxN, bool), perms, num_generations=n,
                       num_minibatches=rl.num_minibatches, quantum=self.group_quantum, compact=rl.compact_groups,
                       trim=rl.trim_completions)
    if jax.process_count() > 1:  # a pure function of global data: every process must have the same plan
      crc = lambda x: zlib.crc32(np.ascontiguousarray(x, np.int32).tobytes()) & 0x7FFFFFFF  # noqa: E731 (int32)
      mine = np.array([plan.width, plan.groups_per_minibatch, crc(plan.rows),
                       0 if plan.order is None else crc(plan.order)], np.int32)
      if (_allgather_host(mine).reshape(-1, len(mine)) != mine).any():
        raise RuntimeError(f"processes disagree on the update batch (width, groups, rows, order): {mine}")
    r, w = plan.rows, plan.width
    metrics["update/rows"], metrics["update/completion_width"] = float(len(r)), float(w)
    tokens = self._global(np.concatenate([out.prompt_tokens_BxP[r], out.tokens_BxN[r, :w]], 1).astype(np.int32))
    kv_valid = self._global(np.concatenate([out.prompt_mask_BxP[r], out.mask_BxN[r, :w]], 1).astype(bool))
    mask = np.asarray(out.mask_BxN, np.float32)[r, :w] * np.asarray(keep_B, np.float32)[r, None]
    sampler_logps = np.asarray(out.logps_BxN, np.float32)[r, :w]
    with jax.set_mesh(self.mesh):
      old_logps = (None if self.old_logps_in_update
                   else self._logps(self.state.params, tokens, kv_valid, n_completion=w))
      ref_logps = (self._logps(self.ref_params, tokens, kv_valid, n_completion=w)
                   if self.ref_params is not None else None)
    jax.block_until_ready((old_logps, ref_logps))
    zeros = lambda: self._global(np.zeros(mask.shape, np.float32))  # noqa: E731
    adv_BxN = np.broadcast_to(np.asarray(adv_B, np.float32)[r, None], mask.shape)
    gap_data = (sampler_logps, mask > 0)
    if old_logps is not None:
      old_host = _to_host(old_logps)
      metrics["logp_gap/sampler_vs_trainer"] = _logp_gap(old_host, *gap_data)
      gap_data = None
      if rl.tis_cap > 0:  # sampler != trainer numerics: reweight by the truncated ratio pi_old / pi_sampler
        adv_BxN = adv_BxN * np.minimum(np.exp(np.clip(old_host - sampler_logps, -20, 20)), rl.tis_cap)
    batch = RolloutBatch(tokens, kv_valid, self._global(mask), zeros() if old_logps is None else old_logps,
                         zeros() if ref_logps is None else ref_logps,
                         self._global(np.ascontiguousarray(adv_BxN, np.float32)),
                         self._global((r[::n] // n).repeat(n).astype(np.int32)))
    extra = () if plan.order is None else (plan.order,)
    return batch, extra, gap_data

  def step(self) -> dict:
    """One RL iteration. Returns its metrics."""
    t0 = time.perf_counter()
    examples = self.stream.next_batch()
    rng = jax.random.wrap_key_data(_to_host(self.state.rng))
    sample_key = jax.random.fold_in(rng, self.iteration)
    batch, metrics, extra, gap_data = self._rollout(examples, sample_key)
    t1 = time.perf_counter()
    if batch is not None:
      with jax.set_mesh(self.mesh):
        self.state, step_metrics, *old_logps = self._update(self.state, batch, *extra)
      step_metrics = {k: _to_host(v) for k, v in step_metrics.items()}  # one entry per optimizer step
      if gap_data is not None:  # the old log-probs came from the update's first forward
        metrics["logp_gap/sampler_vs_trainer"] = _logp_gap(_to_host(old_logps[0]), *gap_data)
      self._count_nonfinite(step_metrics.get("skipped_nonfinite"))
      reduce = {"ratio_max": np.max, "ratio_min": np.min, "skipped_nonfinite": np.sum}
      metrics.update({f"train/{k}": float(reduce.get(k, np.mean)(v)) for k, v in step_metrics.items()})
    metrics["train/skipped_no_signal"] = float(batch is None)
    metrics["train/nonfinite_skips_total"] = self.nonfinite_skips["total"]
    t2 = time.perf_counter()
    metrics["time/update_s"] = t2 - t1
    metrics["time/step_s"] = t2 - t0
    metrics["tokens/per_s"] = metrics["tokens/generated"] / max(t2 - t0, 1e-9)
    self.iteration += 1
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
    if self.nonfinite_skips["consecutive"] > self.rl.max_nonfinite_skips:
      raise NonFiniteTraining(
          f"{self.nonfinite_skips['consecutive']} optimizer steps in a row had a non-finite loss or gradient "
          f"(RLConfig.max_nonfinite_skips={self.rl.max_nonfinite_skips}); stopping at iteration {self.iteration}. "
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
    return {"iteration": self.iteration, "data": self.stream.state(), "reward_events": self.reward_events,
            "eval_start": self.eval_start, "nonfinite_skips": dict(self.nonfinite_skips)}

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
      if self.iteration % rl.eval_every == 0 or self.iteration == rl.total_steps:
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
      self.ckpt.maybe_save(self.iteration, self.state, self._host_state())
      save_s = time.perf_counter() - t_prev
      bar.update(1)
      bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", loss=f"{metrics.get('train/loss', 0):.3g}",
                      eval_pass1=f"{self.eval_start if last_eval is None else last_eval:.3f}")
      self.profiler.after(self.iteration)
    bar.close()
    self.profiler.close()
    finished = self.iteration >= rl.total_steps
    self.ckpt.maybe_save(self.iteration, self.state, self._host_state(), force=True)  # no-op if saved
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
      if rl.export_final:  # every process takes part (each tensor is gathered); process 0 writes
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


def record_operative_config(run_dir: str, operative: str, *, resuming: bool, allow_change: bool,
                            iteration: int | None, write: bool = True):
  """Write operative_config.gin; on resume, first compare it with the one the run was started with.

  A changed binding is refused (every differing key named) unless allow_change; then the old file is
  kept as operative_config.before_<iteration>.gin and config_changes.jsonl records what changed when.
  RLConfig.run_dir is not compared (a run directory may be moved).
  """
  path = os.path.join(run_dir, "operative_config.gin")
  if resuming and os.path.exists(path):
    with open(path) as f:
      old_text = f.read()
    old, new = _bindings(old_text), _bindings(operative)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and k != "RLConfig.run_dir"}
    if changed and not allow_change:
      lines = "\n".join(f"  {k}: {a if a is not None else '(absent)'} -> {b if b is not None else '(absent)'}"
                        for k, (a, b) in changed.items())
      raise ValueError(
          f"{run_dir} holds a run started with another config; resuming it with this one would change "
          f"{len(changed)} binding(s):\n{lines}\nUse the original settings, a new run_dir, or pass "
          f"--allow_config_change to continue with the change recorded.")
    if changed and write:
      os.replace(path, os.path.join(run_dir, f"operative_config.before_{iteration}.gin"))
      with open(os.path.join(run_dir, "config_changes.jsonl"), "a") as f:
        f.write(json.dumps({"iteration": iteration, "changed": {k: list(v) for k, v in changed.items()}}) + "\n")
      log.warning("config changed at iteration %s (allowed): %s", iteration, ", ".join(changed))
  if write:
    with open(path, "w") as f:
      f.write(operative)


def _bindings(text: str) -> dict[str, str]:
  """'Config.field = value' lines of an operative config (comments and blank lines ignored)."""
  out = {}
  for line in text.splitlines():
    if line.strip() and not line.lstrip().startswith("#") and " = " in line:
      key, _, value = line.partition(" = ")
      out[key.strip()] = value.strip()
  return out


def _logp_gap(old_BxN, sampler_BxN, loss_mask_BxN) -> float:
  """Mean |trainer - sampler| log-prob over the tokens that enter the loss (0 when there are none)."""
  return float(np.abs(old_BxN - sampler_BxN)[loss_mask_BxN].mean()) if loss_mask_BxN.any() else 0.0


def _to_host(x) -> np.ndarray:
  """The full value of an array on this host (gathered from the other processes if needed)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _allgather_host(local: np.ndarray) -> np.ndarray:
  """Concatenate every process's host array (in process order) on every process."""
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, desc="RL", dynamic_ncols=True)
