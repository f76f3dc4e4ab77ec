"""The decode programs compiled on a mesh, read for what they communicate and hold (compile only).

`compiled_decode("static" | "paged", cfg, mesh, layout=...)` compiles the static sampler (prefill + the
decode loop, sampling._generate_core) or the paged engine's decode burst (paged/step.py) with the weights
in the trainer's layout (`layout="train"`, sharding.RULES) or the decode layout (`"decode"`,
sharding.DECODE_RULES), and reports the all-gathers of weights in the compiled HLO (sharding/hlo.py),
XLA's temp bytes, and the per-device bytes of the weights and of the KV cache or pool. Read by the
decode-layout check (tests/test_decode_layout.py) and the rollout benchmark.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cispo_jax.model import ModelConfig, logical_axes, param_shapes
from cispo_jax.rollout import sampling
from cispo_jax.rollout.paged import step as paged_step
from cispo_jax.sharding import hlo
from cispo_jax.sharding.mesh import (DECODE_RULES, RULES, axis_sizes, batch_sharding, cache_sharding, param_shardings,
                                     replicated)

LAYOUTS = {"train": RULES, "decode": DECODE_RULES}


@dataclasses.dataclass(frozen=True)
class DecodeReport:
  weight_gathers: tuple  # hlo.Collective of every all-gather whose result is a weight (or a block of one)
  temp: int  # XLA's temp bytes per device
  weights: int  # the weights' bytes per device in this layout
  kv: int  # the KV cache's (static) or the pool's (paged) bytes per device
  collectives: tuple  # every collective of the program

  @property
  def gathers_in_loop(self) -> int:
    return sum(g.in_loop for g in self.weight_gathers)


def _per_device(tree) -> int:
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compiled_decode(program: str, cfg: ModelConfig, mesh: Mesh, *, layout: str, slots: int, prompt_len: int,
                    budget: int, page_size: int = 16, pool_pages: int | None = None, max_pages: int | None = None,
                    steps: int = 8, scfg: sampling.SamplingConfig | None = None) -> DecodeReport:
  """Compile one decode program (nothing runs). Paged: a pool of `pool_pages` pages (default: every slot at
  prompt + budget) and bursts reading `max_pages` pages a slot (default: prompt + budget)."""
  shapes, logical = param_shapes(cfg), logical_axes(cfg)
  shardings = param_shardings(logical, shapes, mesh, LAYOUTS[layout])
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  scfg = scfg or sampling.SamplingConfig(max_new_tokens=budget, prompt_buckets=(prompt_len,), stop_token_ids=(0,))
  S = slots
  with jax.set_mesh(mesh):
    if program == "static":
      tok = jax.ShapeDtypeStruct((S, prompt_len), jnp.int32, sharding=batch_sharding(mesh, 2))
      key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated(mesh))
      fn = jax.jit(lambda p, *a: sampling._generate_core(p, *a, model_cfg=cfg, cfg=scfg, share_prefill=False,
                                                         sharding=batch_sharding(mesh, 1)))
      compiled = fn.lower(params, tok, tok, key).compile()
      kv_shape = (cfg.num_layers, S, prompt_len + budget - 1, cfg.num_kv_heads, cfg.head_dim)
      block = cache_sharding(mesh, kv_shape).shard_shape(kv_shape)
      kv = 2 * int(np.prod(block)) * jnp.dtype(cfg.jnp_dtype).itemsize  # k and v
    elif program == "paged":
      pages_a_row = -(-(prompt_len + budget) // page_size)
      num_pages = pool_pages or 1 + S * pages_a_row
      M = max_pages or pages_a_row
      init = jax.jit(lambda: paged_step.init_pool(cfg, num_pages, page_size))
      out_sh = init.lower().compile().output_shardings
      pool = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                          jax.eval_shape(init), out_sh)
      i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
      state = {"token": i32(S), "pos": i32(S), "t": i32(S), "active": jax.ShapeDtypeStruct((S,), bool),
               "budget": i32(S), "key": jax.ShapeDtypeStruct((S, 2), jnp.uint32), "table": i32(S, M),
               "recent": i32(S, 1)}
      compiled = paged_step.decode_burst.lower(params, pool, state, cfg=cfg, scfg=scfg, steps=steps).compile()
      kv = _per_device(pool)
    else:
      raise ValueError(f"program={program!r}; allowed: 'static', 'paged'")
  blocks = hlo.weight_block_shapes(logical, shapes, axis_sizes(mesh), tuple(LAYOUTS.values()))
  return DecodeReport(tuple(hlo.weight_gathers(compiled, blocks)), int(compiled.memory_analysis().temp_size_in_bytes),
                      _per_device(params), kv, tuple(hlo.collectives(compiled)))
