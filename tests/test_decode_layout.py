"""The decode layout, checked on the compiled programs (8 fake CPU devices, compile only).

Sampling in the trainer's FSDP layout gathers every weight on every device (XLA hoists the gathers out of
the static sampler's decode loop, so each device holds the whole model for the rollout; the paged burst
gathers per step). The engines sample in sharding.DECODE_RULES instead: weights split over `tensor` only,
requests over data x fsdp. For both programs, on fsdp=8 and on fsdp=4 x tensor=2: no all-gather of a
weight anywhere in the program, and temp memory at most the decode layout's weights plus the KV cache /
pool per device. The same check on the trainer's layout must find the gathers (so it can fail), and the
engine must put a version's weights into the decode layout and sample the same greedy tokens as one
device does.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cispo_jax import sharding
from cispo_jax.model import ModelConfig, init_params, logical_axes, param_shapes
from cispo_jax.rollout import sampling
from cispo_jax.scale.decode import compiled_decode
from cispo_jax.sharding.hlo import collectives

CFG = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=8,
                  num_kv_heads=4, head_dim=32)
MESHES = {"fsdp8": sharding.MeshConfig(fsdp=8), "fsdp4_tensor2": sharding.MeshConfig(fsdp=4, tensor=2)}
SHAPE = dict(slots=16, prompt_len=16, budget=32, page_size=16, pool_pages=65, max_pages=4)
SC = sampling.SamplingConfig(max_new_tokens=32, prompt_buckets=(16,), top_p=0.9)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("program", ["static", "paged"])
def test_decode_program_never_gathers_a_weight(mesh_name, program):
  mesh = sharding.make_mesh(MESHES[mesh_name])
  r = compiled_decode(program, CFG, mesh, layout="decode", scfg=SC, **SHAPE)
  assert not r.weight_gathers, [(g.shape, g.in_loop) for g in r.weight_gathers]
  assert r.temp <= r.weights + r.kv, (r.temp, r.weights, r.kv)
  # what the check is for: the trainer's layout makes the same program gather the weights
  train = compiled_decode(program, CFG, mesh, layout="train", scfg=SC, **SHAPE)
  assert len(train.weight_gathers) >= CFG.num_layers, [(c.op, c.shape) for c in train.collectives]
  assert train.weights < r.weights  # FSDP's shards are smaller: the decode layout trades memory for no gathers


def test_hlo_reader_sees_loops():
  mesh = sharding.make_mesh(MESHES["fsdp8"])
  x = jax.ShapeDtypeStruct((8, 64), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp")))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def f(x):
    return jax.lax.fori_loop(0, 3, lambda i, y: jnp.tanh(jax.lax.with_sharding_constraint(y, whole) * 2), x)

  with jax.set_mesh(mesh):
    cs = collectives(jax.jit(f).lower(x).compile())
  assert cs and all(c.op == "all-gather" for c in cs)
  assert {c.shape for c in cs} == {(8, 64)} and cs[0].nbytes == 8 * 64 * 4


def test_engine_puts_weights_into_the_decode_layout_and_samples_as_one_device():
  from cispo_jax.rollout.engine import NativeEngine
  from cispo_jax.rollout.paged import PagedConfig

  cfg = dataclasses.replace(CFG, vocab_size=64, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                            head_dim=16)
  params = init_params(cfg, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)  # peaked logits: few near-ties
  mesh = sharding.make_mesh(MESHES["fsdp4_tensor2"])
  shapes, logical = param_shapes(cfg), logical_axes(cfg)
  train = jax.device_put(params, sharding.param_shardings(logical, shapes, mesh))
  decode = sharding.param_shardings(logical, shapes, mesh, sharding.DECODE_RULES)
  rs = np.random.RandomState(0)
  prompts = [rs.randint(1, 64, rs.randint(3, 12)).tolist() for _ in range(16)]
  tok, mask = np.zeros((16, 16), np.int32), np.zeros((16, 16), np.int32)
  for i, p in enumerate(prompts):
    tok[i, 16 - len(p):], mask[i, 16 - len(p):] = p, 1
  sc = dataclasses.replace(SC, max_new_tokens=12, greedy=True, top_p=1.0, stop_token_ids=())
  want = np.asarray(sampling.generate(params, cfg, tok, mask, jax.random.PRNGKey(0), sc).tokens_BxN)
  for paged in (None, PagedConfig(num_slots=8, page_size=4)):
    engine = NativeEngine(cfg, None, mesh, decode, apply_chat_template=False, copy_weights=False, paged=paged)
    engine.load_weights(train, 0)
    w = engine.weights(0)
    assert engine.in_layout(w) and not engine.in_layout(train)
    assert all("fsdp" not in str(x.sharding.spec) for x in jax.tree.leaves(w))
    assert any("tensor" in str(x.sharding.spec) for x in jax.tree.leaves(w))
    if paged is None:
      with jax.set_mesh(mesh):
        got = sampling.generate(w, cfg, tok, mask, jax.random.PRNGKey(0), sc,
                                batch_sharding=sharding.batch_sharding(mesh, 1))
    else:
      got = engine._generate_paged(w, tok, mask, jax.random.PRNGKey(0), sc, host=True)
    got = np.asarray(got.tokens_BxN)
    differ = [i for i in range(16) if not np.array_equal(got[i], want[i])]
    assert len(differ) <= 2, (paged, differ)  # float rounding at a near-tie may flip one row's path
