"""What XLA says a program needs: compile the trainer's programs on abstract inputs, run nothing.

`compiled_memory(...)` lowers and compiles one of the three device programs of an RL iteration
at a real shape on a real (possibly fake-device) mesh, with every parameter and batch array a
`ShapeDtypeStruct` carrying its sharding, and returns XLA's own per-device figures
(`compiled.memory_analysis()`). Nothing is allocated, so a 7B model at 32k tokens can be
checked on a laptop before a pod is booked. `plan_memory` (memory.py) is validated against it.

  "loss_grad"   jax.value_and_grad of the training loss (train_step._loss_fn): the activation
                memory of the update, without the optimizer
  "train_step"  one optimizer step (loss, grads, AdamW), the state donated as in the trainer
  "update"      the trainer's whole update program (train_step.update_on_rollout: one epoch, one minibatch,
                the trainer's optimizer rl/optim.make_optimizer with global-norm clipping), the state donated
  "logps"       the old-log-prob forward (rollout.batched_completion_logps)
  "sampler"     prefill + decode of the rollout (sampling._generate_core)

With `lora` (a LoraConfig of rank > 0) the programs are the LoRA run's, as trainer/parts.build_state lays it
out: the trained params are the adapters alone (param_dtype, optimizer state for them only) and the frozen base
(`frozen_base`: the compute dtype, the LM head's weights kept in param_dtype under lm_head_f32) is a separate,
undonated argument; the forwards (logps, sampler) take base + adapters. A loss with kl_coef > 0 adds the KL
term (the reference log-probs are an input of the batch either way).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp
import optax
import numpy as np
from jax.sharding import Mesh

from cispo_jax.model import ModelConfig, logical_axes, lora as lora_lib, param_shapes
from cispo_jax.rl import losses
from cispo_jax.rl import train_step as ts
from cispo_jax.rl.optim import OptimConfig, make_optimizer
from cispo_jax.rollout import sampling
from cispo_jax.rollout.engine import batched_completion_logps
from cispo_jax.sharding.mesh import batch_sharding, optimizer_logical_axes, param_shardings, replicated

PROGRAMS = ("loss_grad", "train_step", "update", "logps", "sampler")


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """Per-device bytes as XLA reports them, and the seconds lower + compile took."""
  temp: int
  argument: int
  output: int
  alias: int  # output bytes that reuse donated argument buffers
  compile_s: float
  cpu_upcast: int = 0  # of temp: f32 copies XLA:CPU makes of whole bf16 arguments (`cpu_upcast_bytes`)

  @property
  def peak(self) -> int:
    """Live at once: arguments + temporaries + outputs that are not donated arguments."""
    return self.argument + self.temp + self.output - self.alias


def _abstract(tree, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def abstract_params(cfg: ModelConfig, mesh: Mesh):
  """The parameters as ShapeDtypeStructs placed by the rules table (nothing allocated)."""
  shapes = param_shapes(cfg)
  return _abstract(shapes, param_shardings(logical_axes(cfg), shapes, mesh))


def frozen_dtype(top: str, cfg: ModelConfig):
  """The dtype a LoRA run keeps a base weight in (parts.reference_params(copy=False)): the compute dtype, except
  the LM head's weights (ModelConfig.head_weights) under lm_head_f32, which stay in param_dtype."""
  return cfg.jnp_param_dtype if cfg.lm_head_f32 and top in cfg.head_weights else cfg.jnp_dtype


def frozen_base(cfg: ModelConfig, mesh: Mesh):
  """The LoRA run's frozen base (also its KL reference, and what full fine-tuning's reference copy holds) as
  ShapeDtypeStructs in the base's layout: `frozen_dtype` per weight."""
  params = abstract_params(cfg, mesh)
  return {top: jax.tree.map(lambda x, t=top: jax.ShapeDtypeStruct(x.shape, frozen_dtype(t, cfg), sharding=x.sharding),
                            sub) for top, sub in params.items()}


def abstract_adapters(cfg: ModelConfig, mesh: Mesh, lcfg):
  """The adapters of `lcfg` (param_dtype) as ShapeDtypeStructs in their layout (lora.adapter_logical_axes)."""
  shapes = lora_lib.adapter_shapes(param_shapes(cfg), lcfg, cfg.jnp_param_dtype)
  return _abstract(shapes, param_shardings(lora_lib.adapter_logical_axes(logical_axes(cfg), lcfg), shapes, mesh))


def tree_bytes(tree) -> int:
  """Per-device bytes of a tree of sharded ShapeDtypeStructs (or arrays)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _batch(mesh, B, prompt_len, n):
  L = prompt_len + n
  row = lambda *shape, dt=jnp.float32: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dt, sharding=batch_sharding(mesh, len(shape)))
  return ts.RolloutBatch(tokens_BxL=row(B, L, dt=jnp.int32), kv_valid_BxL=row(B, L, dt=jnp.bool_),
                      mask_BxN=row(B, n), old_logps_BxN=row(B, n), ref_logps_BxN=row(B, n),
                      adv_BxN=row(B, n), group_ids_B=row(B, dt=jnp.int32))


def compiled_memory(program: str, cfg: ModelConfig, mesh: Mesh, *, batch: int, prompt_len: int,
                    n_completion: int, loss=None, temperature: float = 1.0, lora=None) -> CompiledMemory:
  """Compile `program` (see PROGRAMS) for `batch` global sequences of prompt_len + n_completion; `lora`: a
  LoraConfig (rank > 0: the LoRA run's programs, see the module docstring) or None."""
  if program not in PROGRAMS:
    raise ValueError(f"program={program!r}; allowed: {PROGRAMS}")
  loss = (loss or losses.LossConfig()).resolved()
  lcfg = lora if lora is not None and lora.enabled else None
  if lcfg is not None:
    lcfg.check_model(cfg)
    cfg = cfg.replace(lora_scaling=lcfg.scaling)
  step_cfg = ts.StepConfig(model=cfg, loss=loss, temperature=temperature, micro_batches=1,
                           num_generations=1, use_ref=loss.kl_coef > 0)
  with jax.set_mesh(mesh):  # the model's activation constraints need the mesh (mesh.constrain)
    return _compile(program, cfg, mesh, lcfg, step_cfg, batch, prompt_len, n_completion, temperature)


def _trained(cfg, mesh, lcfg):
  """(logical axes, shapes, layout of the trained params, the frozen base or None): the full model, or the adapters
  beside the base, as parts.build_state lays them out."""
  logical, shapes = logical_axes(cfg), param_shapes(cfg)
  frozen = None
  if lcfg is not None:
    frozen = frozen_base(cfg, mesh)
    logical, shapes = (lora_lib.adapter_logical_axes(logical, lcfg),
                       lora_lib.adapter_shapes(shapes, lcfg, cfg.jnp_param_dtype))
  return logical, shapes, param_shardings(logical, shapes, mesh), frozen


def _state(tx, logical, shapes, shardings, mesh):
  """(abstract TrainState of the params under optimizer `tx`, its shardings): the moments laid out like the params."""
  rep = replicated(mesh)
  opt_shapes = jax.eval_shape(tx.init, shapes)
  opt_shardings = param_shardings(optimizer_logical_axes(tx, logical, shapes), opt_shapes, mesh)
  state = ts.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=_abstract(shapes, shardings),
                        opt_state=_abstract(opt_shapes, opt_shardings),
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))
  return state, ts.TrainState(step=rep, params=shardings, opt_state=opt_shardings, rng=rep)


def _compile(program, cfg, mesh, lcfg, step_cfg, batch, prompt_len, n_completion, temperature):
  t0 = time.perf_counter()
  logical, shapes, shardings, frozen = _trained(cfg, mesh, lcfg)
  params = _abstract(shapes, shardings)
  policy = params if frozen is None else lora_lib.combine(frozen, params)
  rep = replicated(mesh)
  b = _batch(mesh, batch, prompt_len, n_completion)
  if program == "loss_grad":  # the gradient comes out sharded like the params, as in train_step
    loss_fn = lambda p, b, frozen: ts._loss_fn(p, b, step_cfg, None, frozen)[0]  # noqa: E731
    fn = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(rep, shardings))
    lowered = fn.lower(params, b, frozen)
  elif program in ("train_step", "update"):
    if program == "train_step":
      tx, schedule = optax.adamw(1e-6), lambda _: 1e-6
      run = functools.partial(ts.train_step, cfg=step_cfg, tx=tx, schedule=schedule)
    else:
      tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-6), 1000)
      update = functools.partial(ts.update_on_rollout, cfg=step_cfg, tx=tx, schedule=schedule, num_iterations=1,
                                 num_minibatches=1)
      run = lambda state, batch, frozen: update(state, batch, frozen=frozen)  # noqa: E731 (as parts.build_update)
    state, state_shardings = _state(tx, logical, shapes, shardings, mesh)
    fn = jax.jit(run, out_shardings=(state_shardings, rep), donate_argnums=0)
    lowered = fn.lower(state, b, frozen)
  elif program == "logps":
    lowered = batched_completion_logps.lower(policy, b.tokens_BxL, b.kv_valid_BxL, model_cfg=cfg,
                                             n_completion=n_completion, temperature=temperature,
                                             micro_batches=1)
  else:
    sc = sampling.SamplingConfig(max_new_tokens=n_completion, stop_token_ids=(0,), num_samples=1,
                                 prompt_buckets=(prompt_len,))
    bs = batch_sharding(mesh, 2)
    prompts = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=bs)
    fn = jax.jit(functools.partial(sampling._generate_core, model_cfg=cfg, cfg=sc, share_prefill=False,
                                   sharding=batch_sharding(mesh, 1)))
    lowered = fn.lower(policy, prompts, prompts, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  m = compiled.memory_analysis()
  upcast = cpu_upcast_bytes(compiled.as_text()) if jax.default_backend() == "cpu" else 0
  return CompiledMemory(temp=int(m.temp_size_in_bytes), argument=int(m.argument_size_in_bytes),
                        output=int(m.output_size_in_bytes), alias=int(m.alias_size_in_bytes),
                        compile_s=seconds, cpu_upcast=upcast)


_ENTRY_ARG = re.compile(r"([\w.\-]+): bf16\[([\d,]*)\]")


def cpu_upcast_bytes(hlo_text: str) -> int:
  """Bytes of the f32 copies a compiled XLA:CPU program makes of whole bf16 arguments: each instruction that
  converts an entry parameter bf16[S] to f32[S] (a `convert`, or the `wrapped_convert` fusion around one).

  XLA:CPU has no bf16 dot: it rewrites bf16 dots to f32 ones with converts, and then hoists the convert of a
  loop-invariant operand out of the layer scan, so a bf16 argument read by dots inside the scan (the LoRA run's
  frozen base: its stacked [L, ...] layer weights) is held in temp once more in f32, for the whole program. A
  backend with bf16 dots (GPU, TPU) reads the bf16 weights as they are. Full fine-tuning's f32 params are cast
  to bf16 layer by layer inside the scan and have no such copy. Found by reading the compiled HLO text."""
  header = hlo_text[hlo_text.index("\nENTRY") + 1:].split("\n", 1)[0]  # ENTRY %main (name: type, ...) -> ... {
  params = dict(_ENTRY_ARG.findall(header))
  total = 0
  for name, dims in params.items():
    pattern = r"= f32\[%s\]\S* (?:convert|fusion)\(%%%s\)" % (re.escape(dims), re.escape(name))
    total += len(re.findall(pattern, hlo_text)) * 4 * math.prod(int(d) for d in dims.split(",") if d)
  return total


def single_device_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


__all__ = ["PROGRAMS", "CompiledMemory", "abstract_adapters", "abstract_params", "compiled_memory", "frozen_base",
           "frozen_dtype", "single_device_mesh", "tree_bytes"]
