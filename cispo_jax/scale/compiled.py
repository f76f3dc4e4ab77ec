"""What XLA says a program needs: compile the trainer's programs on abstract inputs, run nothing.

`compiled_memory(...)` lowers and compiles one of the three device programs of an RL iteration
at a real shape on a real (possibly fake-device) mesh, with every parameter and batch array a
`ShapeDtypeStruct` carrying its sharding, and returns XLA's own per-device figures
(`compiled.memory_analysis()`). Nothing is allocated, so a 7B model at 32k tokens can be
checked on a laptop before a pod is booked. `plan_memory` (memory.py) is validated against it.

  "loss_grad"   jax.value_and_grad of the training loss (train_step._loss_fn): the activation
                memory of the update, without the optimizer
  "train_step"  one optimizer step (loss, grads, AdamW), the state donated as in the trainer
  "logps"       the old-log-prob forward (rollout.batched_completion_logps)
  "sampler"     prefill + decode of the rollout (sampling._generate_core)
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import optax
import numpy as np
from jax.sharding import Mesh

from cispo_jax.model import ModelConfig, logical_axes, param_shapes
from cispo_jax.rl import losses
from cispo_jax.rl import train_step as ts
from cispo_jax.rollout import sampling
from cispo_jax.rollout.engine import batched_completion_logps
from cispo_jax.sharding.mesh import batch_sharding, optimizer_logical_axes, param_shardings, replicated

PROGRAMS = ("loss_grad", "train_step", "logps", "sampler")


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """Per-device bytes as XLA reports them, and the seconds lower + compile took."""
  temp: int
  argument: int
  output: int
  alias: int  # output bytes that reuse donated argument buffers
  compile_s: float

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


def _batch(mesh, B, prompt_len, n):
  L = prompt_len + n
  row = lambda *shape, dt=jnp.float32: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dt, sharding=batch_sharding(mesh, len(shape)))
  return ts.RolloutBatch(tokens_BxL=row(B, L, dt=jnp.int32), kv_valid_BxL=row(B, L, dt=jnp.bool_),
                      mask_BxN=row(B, n), old_logps_BxN=row(B, n), ref_logps_BxN=row(B, n),
                      adv_BxN=row(B, n), group_ids_B=row(B, dt=jnp.int32))


def compiled_memory(program: str, cfg: ModelConfig, mesh: Mesh, *, batch: int, prompt_len: int,
                    n_completion: int, loss=None, temperature: float = 1.0) -> CompiledMemory:
  """Compile `program` (see PROGRAMS) for `batch` global sequences of prompt_len + n_completion."""
  if program not in PROGRAMS:
    raise ValueError(f"program={program!r}; allowed: {PROGRAMS}")
  loss = (loss or losses.LossConfig()).resolved()
  params = abstract_params(cfg, mesh)
  step_cfg = ts.StepConfig(model=cfg, loss=loss, temperature=temperature, micro_batches=1,
                           num_generations=1, use_ref=False)
  with jax.set_mesh(mesh):  # the model's activation constraints need the mesh (mesh.constrain)
    return _compile(program, cfg, mesh, params, step_cfg, batch, prompt_len, n_completion, temperature)


def _compile(program, cfg, mesh, params, step_cfg, batch, prompt_len, n_completion, temperature):
  t0 = time.perf_counter()
  shardings = param_shardings(logical_axes(cfg), param_shapes(cfg), mesh)
  rep = replicated(mesh)
  if program == "loss_grad":  # the gradient comes out sharded like the params, as in train_step
    loss_fn = lambda p, b: ts._loss_fn(p, b, step_cfg)[0]  # noqa: E731
    fn = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(rep, shardings))
    lowered = fn.lower(params, _batch(mesh, batch, prompt_len, n_completion))
  elif program == "train_step":
    tx = optax.adamw(1e-6)
    opt_shardings = param_shardings(
        _optimizer_axes(tx, cfg), jax.eval_shape(tx.init, param_shapes(cfg)), mesh)
    state = ts.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=params,
                          opt_state=_abstract(jax.eval_shape(tx.init, param_shapes(cfg)), opt_shardings),
                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))
    state_shardings = ts.TrainState(step=rep, params=shardings, opt_state=opt_shardings, rng=rep)
    fn = jax.jit(functools.partial(ts.train_step, cfg=step_cfg, tx=tx, schedule=lambda _: 1e-6),
                 out_shardings=(state_shardings, rep), donate_argnums=0)
    lowered = fn.lower(state, _batch(mesh, batch, prompt_len, n_completion))
  elif program == "logps":
    b = _batch(mesh, batch, prompt_len, n_completion)
    lowered = batched_completion_logps.lower(params, b.tokens_BxL, b.kv_valid_BxL, model_cfg=cfg,
                                             n_completion=n_completion, temperature=temperature,
                                             micro_batches=1)
  else:
    sc = sampling.SamplingConfig(max_new_tokens=n_completion, stop_token_ids=(0,), num_samples=1,
                                 prompt_buckets=(prompt_len,))
    bs = batch_sharding(mesh, 2)
    prompts = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=bs)
    fn = jax.jit(functools.partial(sampling._generate_core, model_cfg=cfg, cfg=sc, share_prefill=False,
                                   sharding=batch_sharding(mesh, 1)))
    lowered = fn.lower(params, prompts, prompts, jax.ShapeDtypeStruct((2,), jnp.uint32,
                                                                      sharding=replicated(mesh)))
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  m = compiled.memory_analysis()
  return CompiledMemory(temp=int(m.temp_size_in_bytes), argument=int(m.argument_size_in_bytes),
                        output=int(m.output_size_in_bytes), alias=int(m.alias_size_in_bytes),
                        compile_s=seconds)


def _optimizer_axes(tx, cfg):
  return optimizer_logical_axes(tx, logical_axes(cfg), param_shapes(cfg))


def single_device_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


__all__ = ["PROGRAMS", "CompiledMemory", "abstract_params", "compiled_memory", "single_device_mesh"]
