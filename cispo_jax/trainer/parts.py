"""The parts a Trainer is assembled from, each built by one function: devices and mesh, the policy's
sharded train state, the rollout and eval engines, the data, the evaluator, the jitted update, and
the state a run resumes from. Trainer.__init__ (loop.py) calls them in this order.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp

from cispo_jax import data as data_lib
from cispo_jax import sharding
from cispo_jax.data.prompts import tokenize_prompts
from cispo_jax.evals.evaluator import Evaluator
from cispo_jax.model import hf_io, logical_axes, lora, param_shapes
from cispo_jax.model.attention import choose_impl
from cispo_jax.model.config import AUTO, resolve_dtype
from cispo_jax.rl.optim import make_optimizer
from cispo_jax.rl.train_step import RolloutBatch, StepConfig, TrainState, epoch_permutations, update_on_rollout
from cispo_jax.rl.update_plan import Buckets, group_quantum, update_shapes
from cispo_jax.rollout import sampling
from cispo_jax.rollout.config import paged_config, run_stops, sampling_config
from cispo_jax.rollout.engine import NativeEngine, Rollout, batched_completion_logps
from cispo_jax.runtime import programs
from cispo_jax.runtime.checkpoint import abstract_like
from cispo_jax.task import HELDOUT, Scorer, make_sources
from cispo_jax.trainer import adapters as adapters_lib
from cispo_jax.trainer import batch as batch_lib

log = logging.getLogger(__name__)


# --- where the old log-probs come from: decided here, and only here --------------------------------
BEHAVIOUR = "behaviour"  # a stale rollout: the policy that sampled it (recomputed, or the sampler's own)
UPDATE_FORWARD = "update_forward"  # the update's first forward (UpdateConfig.old_logps_in_update)
SEPARATE_FORWARD = "separate_forward"  # a forward of the current params before the update


def old_logps_source(rl, *, stale_rollout: bool) -> str:
  """Where an update's old log-probs (pi_old of the ratio) come from. A stale rollout's are the
  behaviour policy's. Else the update's first forward gives them when nothing needs them before the
  update: one minibatch (later minibatches need pi_old of the params before the first), no TIS (it
  reweights by pi_old / pi_sampler before the update) and a loop that never trains on stale rollouts
  (the update program is compiled once for both). Otherwise a separate forward of the current params."""
  up, ro = rl.update, rl.rollout
  if stale_rollout:
    return BEHAVIOUR
  if up.old_logps_in_update and up.num_minibatches == 1 and up.tis_cap == 0 and not ro.stale:
    return UPDATE_FORWARD
  return SEPARATE_FORWARD


# --- devices, policy, sharded state ---------------------------------------------------------------
def split_devices(rl, devices) -> tuple[list, list]:
  """(train devices, rollout devices): the first RolloutConfig.rollout_devices sample, the rest train."""
  ro = rl.rollout
  devices = list(jax.devices() if devices is None else devices)
  if ro.pipelined and jax.process_count() > 1:
    raise ValueError("RolloutConfig.max_staleness > 0 and RolloutConfig.rollout_devices > 0 run on one process "
                     f"for now (this run has {jax.process_count()}); use the synchronous loop across hosts")
  if not ro.rollout_devices:
    return devices, []
  if ro.rollout_devices >= len(devices):
    raise ValueError(f"RolloutConfig.rollout_devices={ro.rollout_devices} leaves no device to train on "
                     f"({len(devices)} devices)")
  return devices[ro.rollout_devices:], devices[:ro.rollout_devices]


def load_policy(rl):
  """The model config (with ModelRunConfig), the tokenizer and the stop set of RLConfig.model_dir."""
  model_cfg = hf_io.load_config(rl.model_dir, **rl.model_run.overrides())
  if rl.lora.enabled:
    rl.lora.check_model(model_cfg)
    model_cfg = model_cfg.replace(lora_scaling=rl.lora.scaling)
  tokenizer = hf_io.load_tokenizer(rl.model_dir)
  if tokenizer.eos_token_id is None:
    raise ValueError(f"tokenizer in {rl.model_dir} has no eos_token: the sampler needs a stop token")
  stops = run_stops(rl.rollout, tokenizer, rl.model_dir, model_cfg.vocab_size)
  log.info("stop tokens: %s", stops.describe(tokenizer))
  log.info("%s", run_choices(rl, model_cfg))
  return model_cfg, tokenizer, stops


def resolved_operative(text: str, rl) -> str:
  """The operative config as this platform runs it: `ModelRunConfig.dtype = 'auto'` recorded as the dtype it
  resolved to (the line before says so), so a resume compares what ran: a run started on CPU ('auto' =
  float32) resumed on a GPU ('auto' = bfloat16) is a config change, and one recorded before 'auto' existed
  ('float32') resumes on CPU unchanged."""
  line = f"ModelRunConfig.dtype = {AUTO!r}"
  if rl.model_run.dtype != AUTO or line not in text.splitlines():
    return text
  platform = jax.default_backend()
  return text.replace(line, f"# ModelRunConfig.dtype = {AUTO!r}, resolved on {platform}:\n"
                            f"ModelRunConfig.dtype = {resolve_dtype(AUTO, platform)!r}", 1)


def run_choices(rl, model_cfg, platform: str | None = None) -> str:
  """One line: what this run resolved its "auto" settings to on this platform (dtype, the training
  attention kernel at the longest sequence, remat, the log-prob chunk)."""
  platform = platform or jax.default_backend()
  T = max(rl.rollout.prompt_buckets) + rl.rollout.max_new_tokens
  attention = choose_impl(model_cfg.attention_impl, T, T, platform, dtype=model_cfg.jnp_dtype,
                          head_dim=model_cfg.head_dim)
  remat = f"on ({model_cfg.remat_policy})" if model_cfg.remat else "off"
  return (f"run choices on {platform}: dtype {model_cfg.dtype} (ModelRunConfig.dtype={rl.model_run.dtype!r}), "
          f"master weights {model_cfg.param_dtype}, LM head {'float32' if model_cfg.lm_head_f32 else model_cfg.dtype}, "
          f"training attention {attention} (ModelRunConfig.attention_impl={model_cfg.attention_impl!r}, "
          f"{T} positions), remat {remat}, logprob_chunk {model_cfg.logprob_chunk}")


@dataclasses.dataclass
class ShardedState:
  """The policy's train state in its layout, and the shardings and optimizer it was built with."""
  tx: Any
  schedule: Any
  param_shardings: Any
  state_shardings: TrainState
  batch_sharding: Any  # dim 0 over the data axes, any rank
  state: TrainState
  ref_params: Any  # the KL's reference params, or None
  frozen: Any = None  # LoRA: the frozen base (compute dtype), the update's third argument; state.params = adapters
  base_fingerprint: str | None = None  # LoRA: lora.fingerprint of the base as loaded (checkpoints keep it)

  def policy(self, params):
    """The policy's full parameter tree for `params` (the state's): the base with the adapters beside them."""
    return lora.combine(self.frozen, params) if self.frozen is not None else params


def build_state(rl, loss_cfg, optim, mesh, model_cfg) -> ShardedState:
  """Parameters sharded by the logical-axis rules, the optimizer state alike, loaded tensor by tensor
  from safetensors straight into their shards (never a second full copy). With LoRA the trained params
  are the adapters alone (optimizer state for them only) and the base is frozen in the compute dtype; it is
  also the KL's reference (adapters off: the same buffers, no copy)."""
  up = rl.update
  tx, schedule = make_optimizer(optim, rl.total_steps * up.num_iterations * up.num_minibatches)
  base_logical, base_shapes = logical_axes(model_cfg), param_shapes(model_cfg)
  params_logical, shapes = base_logical, base_shapes
  if rl.lora.enabled:
    params_logical = lora.adapter_logical_axes(base_logical, rl.lora)
    shapes = lora.adapter_shapes(base_shapes, rl.lora, model_cfg.jnp_param_dtype)
  param_shardings = sharding.param_shardings(params_logical, shapes, mesh)
  opt_shardings = sharding.param_shardings(
      sharding.optimizer_logical_axes(tx, params_logical, shapes), jax.eval_shape(tx.init, shapes), mesh)
  rep = sharding.replicated(mesh)
  state_shardings = TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep)
  create = jax.jit(functools.partial(TrainState.create, tx=tx, seed=rl.seed), out_shardings=state_shardings)
  base_shardings = sharding.param_shardings(base_logical, base_shapes, mesh)
  params = hf_io.load_params(rl.model_dir, model_cfg, shardings=base_shardings)
  batch_sharding = sharding.batch_sharding(mesh, 1)
  if not rl.lora.enabled:
    # Built directly in its layout: the optimizer state is born sharded like the params.
    state = create(params)
    # Only a KL needs the reference: a copy (each update donates the state's buffers), in the compute dtype.
    ref_params = reference_params(params, model_cfg) if loss_cfg.kl_coef else None
    return ShardedState(tx, schedule, param_shardings, state_shardings, batch_sharding, state, ref_params)
  fingerprint = lora.fingerprint(params)
  frozen = reference_params(params, model_cfg, copy=False)
  del params
  adapters = adapters_lib.init(rl, model_cfg, base_shapes, param_shardings, fingerprint)
  return ShardedState(tx, schedule, param_shardings, state_shardings, batch_sharding, create(adapters),
                      frozen if loss_cfg.kl_coef else None, frozen, fingerprint)


def reference_params(params, model_cfg, copy: bool = True):
  """The KL reference's copy of `params` in the compute dtype (bf16 on an accelerator: half the f32 copy),
  except the LM head's weights (ModelConfig.head_weights: `embed` when tied, else `lm_head`) under lm_head_f32, which stay as they are so
  the reference's log-probs come from the same f32 head as the policy's. copy=False (the LoRA base): the
  input's buffers are donated, so where the dtype is already the compute dtype nothing is copied."""
  head = set(model_cfg.head_weights) if model_cfg.lm_head_f32 else set()

  def cast(path, x):
    keep = getattr(path[-1], "key", None) in head or not jnp.issubdtype(x.dtype, jnp.floating)
    if keep:
      return jnp.copy(x) if copy else x
    return x.astype(model_cfg.jnp_dtype)
  layout = jax.tree.map(lambda x: x.sharding, params)
  return jax.jit(lambda p: jax.tree_util.tree_map_with_path(cast, p), out_shardings=layout,
                 donate_argnums=() if copy else 0)(params)


def build_engines(rl, model_cfg, tokenizer, mesh, rollout_devices):
  """(eval engine, rollout engine). Eval samples on the train mesh with the current params. Rollouts
  come from the rollout sub-mesh if the devices are split; else from the train mesh, reading the
  trainer's own buffers in lock-step (max_staleness 0) or a copy of them (stale rollouts)."""
  ro = rl.rollout
  engine = functools.partial(NativeEngine, model_cfg, tokenizer, apply_chat_template=ro.apply_chat_template,
                             paged=paged_config(ro), rollout_merged=rl.lora.rollout_merged)
  logical, shapes = adapters_lib.policy_layout(rl.lora, model_cfg)
  decode_layout = lambda m: sharding.param_shardings(logical, shapes, m, sharding.DECODE_RULES)  # noqa: E731
  eval_engine = engine(mesh, decode_layout(mesh), copy_weights=False)
  if not rollout_devices:
    return eval_engine, engine(mesh, decode_layout(mesh), copy_weights=ro.stale)
  if len(rollout_devices) % ro.rollout_tensor:
    raise ValueError(f"RolloutConfig.rollout_tensor={ro.rollout_tensor} does not divide the "
                     f"RolloutConfig.rollout_devices={len(rollout_devices)} devices of the rollout sub-mesh")
  rollout_mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, tensor=ro.rollout_tensor), rollout_devices)
  return eval_engine, engine(rollout_mesh, decode_layout(rollout_mesh), copy_weights=True)


# --- data and evaluation --------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
  stream: data_lib.PromptStream  # this process's shard of the training prompts
  eval_sets: dict  # name -> examples; the held-out split first, then TaskConfig.eval_sets
  scorer: Scorer


def build_data(rl, task, tokenizer, model_cfg) -> Data:
  """The prompt stream and eval sets, every prompt checked before anything compiles: too long for the
  buckets or the model, or token ids outside the vocabulary (TaskConfig.too_long: drop and count, or
  refuse naming file:line)."""
  ro = rl.rollout
  proc, nproc = jax.process_index(), jax.process_count()
  if rl.prompts_per_step % nproc:
    raise ValueError(f"RLConfig.prompts_per_step={rl.prompts_per_step} must be divisible by the "
                     f"process count {nproc}")
  checks = dict(max_new_tokens=ro.max_new_tokens, prompt_buckets=ro.prompt_buckets,
                apply_chat_template=ro.apply_chat_template)
  train_src, eval_examples = make_sources(task, seed=rl.seed)
  train_src, eval_examples = task.check_sources(train_src, eval_examples, tokenizer, model_cfg, **checks)
  eval_sets = {HELDOUT: eval_examples[:min(rl.eval.eval_size, len(eval_examples))],
               **task.eval_sources(tokenizer, model_cfg, **checks)}
  stream = data_lib.PromptStream(train_src, rl.prompts_per_step, seed=rl.seed).shard(proc, nproc)
  return Data(stream, eval_sets, Scorer(task))


def build_evaluator(rl, task, eval_engine, tokenizer, scorer, stops) -> Evaluator:
  """evals.Evaluator sampling with `eval_engine` (the current params, on the train mesh)."""
  ro = rl.rollout
  sampled = sampling_config(ro, tokenizer, stops, greedy=False, n=task.eval_samples) if task.eval_samples else None
  return Evaluator(
      lambda params, examples, key, cfg: eval_engine.generate(examples, key, cfg, params=params, host=True),
      eval_engine.local_rows, tokenizer, scorer, greedy_cfg=sampling_config(ro, tokenizer, stops, greedy=True, n=1),
      sampled_cfg=sampled, ks=task.pass_k(), batch_size=task.eval_batch_size, seed=rl.seed)


# --- the jitted update ----------------------------------------------------------------------------
@dataclasses.dataclass
class UpdateFns:
  step_cfg: StepConfig
  update: programs.Programs  # the jitted (state, batch[, order]) -> (state, metrics[, old log-probs])
  perms: Any  # jitted rng -> each epoch's minibatch order (UpdateConfig.compact_groups)
  logps: programs.Programs  # (params, tokens, kv_valid, n_completion=) -> completion log-probs, micro-batched
  gather: Any  # batch.gather through its programs registry
  group_quantum: int  # update rows come in multiples of this many groups (plan_update)
  old_logps_in_update: bool  # the program returns the old log-probs of its first forward
  programs: dict  # phase -> Programs (or a count function): compile/programs_<phase> (programs.program_counts)

  def program_counts(self) -> dict[str, float]:
    """compile/programs_<phase>: the programs each phase (update, gather, logps, rollout) has built so far."""
    return programs.program_counts(self.programs)


def build_update(rl, loss_cfg, model_cfg, st: ShardedState, mesh, data: Data, tokenizer) -> UpdateFns:
  """The update program, compiled once per (rows, width) bucket, and the forwards beside it, each through a
  programs.Programs registry; all of their buckets compiled now under UpdateConfig.precompile."""
  ro, up = rl.rollout, rl.update
  tx, schedule, state_shardings, batch_sharding = st.tx, st.schedule, st.state_shardings, st.batch_sharding
  use_ref = st.ref_params is not None
  step_cfg = StepConfig(model=model_cfg, loss=loss_cfg, temperature=ro.temperature, micro_batches=up.micro_batches,
                        num_generations=ro.num_generations, use_ref=use_ref)
  in_update = old_logps_source(rl, stale_rollout=False) == UPDATE_FORWARD
  update = functools.partial(update_on_rollout, cfg=step_cfg, tx=tx, schedule=schedule,
                             num_iterations=up.num_iterations, num_minibatches=up.num_minibatches,
                             old_from_first_step=in_update, packed=True)  # metrics: one vector, one transfer
  rep = sharding.replicated(mesh)
  outs = (state_shardings, rep) + ((batch_sharding,) if in_update else ())
  # The last argument is the LoRA base (None without LoRA): an argument, never donated (the engines and the
  # reference read the same buffers), and never closed over (it would become a constant of the program).
  frozen = None if st.frozen is None else jax.tree.map(lambda x: x.sharding, st.frozen)
  if up.compact_groups:  # the host passes each epoch's minibatch order (plan_update)
    jitted = jax.jit(update, in_shardings=(state_shardings, batch_sharding, rep, frozen), out_shardings=outs,
                     donate_argnums=0)
  else:
    jitted = jax.jit(lambda state, batch, frozen: update(state, batch, frozen=frozen),
                     in_shardings=(state_shardings, batch_sharding, frozen), out_shardings=outs, donate_argnums=0)
  perms = jax.jit(functools.partial(epoch_permutations, n_groups=rl.prompts_per_step,
                                    num_iterations=up.num_iterations), out_shardings=rep)
  update_programs = programs.Programs("update", jitted, _describe_update)
  logps = programs.Programs("logps", batched_completion_logps, _describe_logps, model_cfg=model_cfg,
                            temperature=ro.temperature, micro_batches=up.micro_batches)
  gather_rows = batch_lib.gather_programs()
  sizes = dict(mesh.shape)
  quantum = group_quantum(ro.num_generations, up.micro_batches, sizes["data"] * sizes["fsdp"])
  fns = UpdateFns(step_cfg, update_programs, perms, logps, functools.partial(batch_lib.gather, rows_fn=gather_rows),
                  quantum, in_update, {"update": update_programs, "gather": gather_rows, "logps": logps,
                                       "rollout": rollout_program_count})
  if up.precompile:
    precompile(rl, fns, st, mesh, prompt_widths(rl, data.stream.source, tokenizer))
  return fns


def _describe_update(args, _static) -> str:
  batch = args[1]
  return (f"rows {batch.tokens_BxL.shape[0]}, tokens {batch.tokens_BxL.shape[1]}, "
          f"completion width {batch.mask_BxN.shape[1]}")


def _describe_logps(args, static) -> str:
  return (f"rows {args[1].shape[0]}, tokens {args[1].shape[1]}, completion width {static['n_completion']}, "
          f"params {jax.tree.leaves(args[0])[0].dtype}")


def rollout_program_count() -> int:
  """The sampler's programs in this process (the static engine's, shared by rollouts and eval; the paged
  engine's jitted steps)."""
  from cispo_jax.rollout.paged import step as paged_step

  jitted = [v for v in vars(paged_step).values() if hasattr(v, "_cache_size") and v.__module__ == paged_step.__name__]
  return sampling.compile_count() + sum(f._cache_size() for f in jitted)


def prompt_widths(rl, examples, tokenizer) -> list[int]:
  """The prompt buckets a rollout of `examples` can be padded to: a batch pads to the bucket of its longest
  prompt (sampling.bucket_for), so every bucket from that of the shortest prompt to that of the longest."""
  ro = rl.rollout
  lengths = [len(ids) for ids in tokenize_prompts(tokenizer, [ex.prompt for ex in examples], ro.apply_chat_template)]
  first = lambda length: next(b for b in ro.prompt_buckets if b >= length)  # noqa: E731 (checked: it fits one)
  lo, hi = first(min(lengths)), first(max(lengths))
  return sorted({b for b in ro.prompt_buckets if lo <= b <= hi})


def precompile(rl, fns: UpdateFns, st: ShardedState, mesh, widths: list[int]):
  """UpdateConfig.precompile: lower and compile the update, the row gather and the old / reference forwards
  for every (rows, width) update_plan.update_shapes gives and each prompt bucket in `widths`, from
  jax.ShapeDtypeStructs in the loop's shardings (no data is made; nothing runs)."""
  ro, up, n = rl.rollout, rl.update, rl.rollout.num_generations
  shapes = update_shapes(groups=rl.prompts_per_step, num_generations=n, num_minibatches=up.num_minibatches,
                         quantum=fns.group_quantum, width=ro.max_new_tokens, compact=up.compact_groups,
                         trim=up.trim_completions, buckets=Buckets.for_run(up, ro.max_new_tokens))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=st.batch_sharding)  # noqa: E731
  separate = old_logps_source(rl, stale_rollout=False) == SEPARATE_FORWARD
  t0, built = time.perf_counter(), 0
  with jax.set_mesh(mesh):
    for P in widths:
      for R, w in shapes:
        tokens, kv, f32 = spec((R, P + w), jnp.int32), spec((R, P + w), jnp.bool_), spec((R, w), jnp.float32)
        built += fns.programs["gather"].compile(
            *batch_lib.gather_specs(rl, P, R, st.batch_sharding, sharding.replicated(mesh)), width=w)
        for params in ([st.policy(st.state.params)] if separate else []) + (
            [st.ref_params] if st.ref_params is not None else []):
          built += fns.logps.compile(params, tokens, kv, n_completion=w)
        order = (jax.ShapeDtypeStruct((up.num_iterations, up.num_minibatches, R // (n * up.num_minibatches)),
                                      jnp.int32),) if up.compact_groups else ()
        batch = RolloutBatch(tokens, kv, f32, f32, f32, f32, spec((R,), jnp.int32))
        built += fns.update.compile(st.state, batch, *order, st.frozen)
  log.info("precompiled %d programs (%d update buckets x %d prompt buckets %s) in %.1f s", built, len(shapes),
           len(widths), widths, time.perf_counter() - t0)


# --- resume ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Resumed:
  """Where a run starts: iteration 0 with fresh counters, or the newest good checkpoint."""
  restored: bool
  iteration: int
  state: TrainState
  eval_start: float | None
  reward_events: dict
  nonfinite_skips: dict
  pending: list  # rollouts in flight at the save (pipelined runs)
  stream_state: Any  # the prompt position after the last rollout trained on


def resume(ckpt, state: TrainState, stream: data_lib.PromptStream, check_host=None) -> Resumed:
  """The newest verified checkpoint (bad ones are moved aside), restoring the stream's position.
  check_host(host state): raises if the run cannot go on from it (a LoRA run on another base)."""
  fresh = Resumed(False, 0, state, None, {"errors": 0, "timeouts": 0}, {"total": 0, "consecutive": 0}, [],
                  None)
  restored = ckpt.restore_latest_good(abstract_like(state))
  if restored is None:
    fresh.stream_state = stream.state()
    return fresh
  _, state, host = restored
  if check_host is not None:
    check_host(host)
  stream.restore(host["data"])
  pending = [Rollout.from_json(r) for r in host.get("pending_rollouts", [])]
  log.info("resumed from %s at iteration %d (%d rollouts in flight restored)", ckpt.directory,
           host["iteration"], len(pending))
  return Resumed(True, host["iteration"], state, host["eval_start"], host["reward_events"],
                 host.get("nonfinite_skips", fresh.nonfinite_skips), pending,
                 host["consumed_data"] if "consumed_data" in host else stream.state())

