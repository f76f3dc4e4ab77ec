"""Mesh, rules, sharded init, sharded forward/grad parity, multi-host, memory planner."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import multihost_worker as mw
from cispo_jax import model, sharding
from cispo_jax.scale import memory
from cispo_jax.sharding import mesh as mesh_lib

MESHES = {
    "data8": sharding.MeshConfig(data=8, fsdp=1),
    "d2f2t2": sharding.MeshConfig(data=2, fsdp=2, tensor=2),
    "f4t2": sharding.MeshConfig(fsdp=4, tensor=2),
}
RULE = dict(sharding.RULES)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


@pytest.fixture(scope="module")
def batch():
  return mw.global_batch()


@pytest.fixture(scope="module")
def reference(batch):
  """Forward + grad of the tiny model on one device."""
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])
  return mw.run_step(mesh, *batch)[0]


@pytest.fixture(scope="module")
def placed():
  """Tiny-model params placed on each mesh by shard_init (compiled once per mesh)."""
  cache = {}

  def get(name):
    if name not in cache:
      mesh = sharding.make_mesh(MESHES[name])
      cache[name] = mesh, mw.init_params(mesh)
    return cache[name]

  return get


@pytest.fixture(scope="module", params=list(MESHES))
def sharded_run(request, batch):
  mesh = sharding.make_mesh(MESHES[request.param])
  return request.param, mesh, *mw.run_step(mesh, *batch)


# ----------------------------------------------------------------------------- mesh


def test_make_mesh_axes_and_sizes():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, tensor=2))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3  # GSPMD, not sharding-in-types
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  sub = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:4])
  assert dict(sub.shape) == {"data": 1, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("kwargs, n, field", [
    (dict(tensor=0), 8, "MeshConfig.tensor"),
    (dict(data=-2), 8, "MeshConfig.data"),
    (dict(data=-1, fsdp=-1), 8, "MeshConfig.fsdp"),
    (dict(data=3), 8, "MeshConfig.fsdp=-1"),
    (dict(data=2, fsdp=2, tensor=1), 8, "MeshConfig data\\*fsdp\\*tensor"),
    (dict(data=2, fsdp=8, tensor=1), 8, "!= 8 devices"),
])
def test_bad_mesh_config_names_the_field(kwargs, n, field):
  with pytest.raises(ValueError, match=field):
    sharding.MeshConfig(**kwargs).resolve(n)


def test_mesh_config_rest_axis():
  assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.MeshConfig(data=-1, fsdp=2, tensor=1).resolve(8) == {"data": 4, "fsdp": 2, "tensor": 1}


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize("name", list(MESHES))
def test_params_sharded_as_rules_say(name, placed):
  mesh, params = placed(name)
  logical = model.logical_axes(mw.TINY)
  sizes = dict(mesh.shape)
  flat_lg = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P))
  for lg, x in zip(flat_lg, jax.tree.leaves(params)):
    # Every tiny-model dim divides every mesh axis, so the spec is the rules verbatim.
    assert tuple(x.sharding.spec) == tuple(RULE[n] for n in lg), (lg, x.sharding.spec)
    split = [math.prod(sizes[a] for a in ((ax,) if isinstance(ax, str) else ax or ()))
             for ax in x.sharding.spec]
    want = tuple(d // s for d, s in zip(x.shape, split))
    assert all(s.data.shape == want for s in x.addressable_shards)
  # A few by hand: embed [V=128, E=32] is (vocab -> tensor, embed -> fsdp).
  t, f = sizes["tensor"], sizes["fsdp"]
  assert params["embed"].addressable_shards[0].data.shape == (128 // t, 32 // f)
  # Layer parameters are stacked [L=2, ...]; the layers axis is never split.
  assert params["layers"]["attn"]["q_kernel"].addressable_shards[0].data.shape == (2, 32 // f, 4 // t, 8)
  assert params["layers"]["mlp"]["down_kernel"].addressable_shards[0].data.shape == (2, 64 // t, 32 // f)
  assert params["final_norm"]["scale"].sharding.is_fully_replicated
  # Distinct blocks = fsdp * tensor (data replicates the params).
  distinct = {str(s.index) for s in params["embed"].addressable_shards}
  assert len(distinct) == f * t


def test_non_divisible_dims_fall_back_and_log_once(monkeypatch, caplog):
  monkeypatch.setattr(mesh_lib, "_LOGGED", set())
  cfg = mw.TINY.replace(num_heads=6, num_kv_heads=2, head_dim=8, num_layers=3)
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=4))
  with caplog.at_level(logging.WARNING, logger=mesh_lib.__name__):
    sh = sharding.param_shardings(model.logical_axes(cfg), model.param_shapes(cfg), mesh)
  attn = sh["layers"]["attn"]
  assert attn["q_kernel"].spec == P(None, "fsdp", None, None)  # 6 heads over tensor=4: replicated
  assert attn["k_kernel"].spec == P(None, "fsdp", None, None)  # 2 kv heads over tensor=4
  assert sh["layers"]["mlp"]["up_kernel"].spec == P(None, "fsdp", "tensor")  # 64 / 4 still splits
  msgs = [r.getMessage() for r in caplog.records]
  assert sum("'heads' of size 6" in m for m in msgs) == 1  # one message
  assert sum("'kv_heads' of size 2" in m for m in msgs) == 1


def test_resolve_spec_edge_cases():
  sizes = {"data": 2, "fsdp": 4, "tensor": 1}
  assert sharding.resolve_spec(P("batch"), (8,), sizes) == P(("data", "fsdp"))
  assert sharding.resolve_spec(P("batch"), (6,), sizes) == P("data")  # 6 % 8 != 0, 6 % 2 == 0
  # A mesh axis splits one dim only: embed would reuse fsdp after batch took it.
  assert sharding.resolve_spec(P("batch", None, "embed"), (8, 3, 16), sizes) == P(("data", "fsdp"), None, None)
  assert sharding.resolve_spec(P("embed"), (16, 5), sizes) == P("fsdp", None)  # short spec: rest replicated
  with pytest.raises(ValueError, match="'nope' has no rule"):
    sharding.resolve_spec(P("nope"), (8,), sizes)
  with pytest.raises(ValueError, match="unknown"):
    sharding.axis_sizes({"pipeline": 2})


def test_batch_and_replicated_shardings():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  x = jax.device_put(np.arange(8 * 3).reshape(8, 3), sharding.batch_sharding(mesh, 2))
  assert x.sharding.spec == P(("data", "fsdp"), None)
  assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}
  assert sharding.replicated(mesh).spec == P()
  c = sharding.cache_sharding(mesh, (2, 8, 16, 2, 8))
  assert c.spec == P(None, ("data", "fsdp"), None, "tensor", None)


# ----------------------------------------------------------------------------- sharded init


def test_shard_init_train_state_shardings():
  cfg, mesh = mw.TINY, sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
  opt = optax.adamw(1e-3)
  logical = model.logical_axes(cfg)

  def init(rng):
    params = model.init_params(cfg, rng)
    return params, opt.init(params)

  state_axes = lambda abstract: (logical, sharding.optimizer_logical_axes(opt, logical, abstract[0]))
  params, opt_state = sharding.shard_init(init, mesh, state_axes, jax.random.PRNGKey(0))
  mu = opt_state[0].mu
  assert mu["embed"].sharding.spec == params["embed"].sharding.spec == P("tensor", "fsdp")
  assert mu["layers"]["attn"]["o_kernel"].sharding.spec == P(None, "tensor", None, "fsdp")
  assert opt_state[0].count.sharding.is_fully_replicated
  plain = model.init_params(cfg, jax.random.PRNGKey(0))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same values as unsharded init


def test_shard_init_never_builds_the_whole_array_on_a_device():
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=8))
  shape = (2048, 256)

  def init(rng):
    return {"w": jax.random.normal(rng, shape) * 0.02, "b": jnp.zeros((256,))}

  logical = {"w": P("embed", "mlp"), "b": P("norm")}
  out = sharding.shard_init(init, mesh, logical, jax.random.PRNGKey(1))
  assert out["w"].addressable_shards[0].data.shape == (256, 256)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(1))
  shardings = sharding.param_shardings(logical, abstract, mesh)
  stats = jax.jit(init, out_shardings=shardings).lower(jax.random.PRNGKey(1)).compile().memory_analysis()
  full = math.prod(shape) * 4
  # Each device computes only its block: every per-device buffer is under the full array.
  assert stats.output_size_in_bytes < full / 4
  assert stats.temp_size_in_bytes < full / 2


# ----------------------------------------------------------------------------- parity


def test_sharded_forward_and_grad_match_one_device(reference, sharded_run):
  name, mesh, out, specs = sharded_run
  assert _rel(out["loss"], reference["loss"]) <= 1e-5
  assert _rel(out["logits"], reference["logits"]) <= 1e-5
  grads = [k for k in out if k.startswith("grad")]
  assert len(grads) == len([k for k in reference if k.startswith("grad")]) > 10
  for k in grads:
    assert _rel(out[k], reference[k]) <= 1e-5, (name, k, _rel(out[k], reference[k]))
    assert specs[k] == specs["param" + k[4:]]  # grads come out sharded like their params
    np.testing.assert_array_equal(out["param" + k[4:]], reference["param" + k[4:]])
  assert specs["logits"] == str(P(("data", "fsdp"), None, None))
  # The tolerance is tight enough to catch rows landing on the wrong device.
  assert _rel(np.roll(out["logits"], 1, axis=0), reference["logits"]) > 1e-2


# ----------------------------------------------------------------------------- multi-host


def test_single_process_helpers(monkeypatch, batch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.setattr("cispo_jax.sharding.multihost._cluster_detected", lambda: False)
  assert sharding.initialize_distributed() is False
  with pytest.raises(ValueError, match="cpu_collectives"):
    sharding.initialize_distributed(cpu_collectives="nccl")
  assert sharding.is_main_process()
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  assert sharding.process_batch_rows(mesh, 8) == slice(0, 8)
  tokens = sharding.host_local_batch_to_global(batch[0], mesh)
  assert tokens.shape == batch[0].shape and tokens.sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(tokens), batch[0])


def _fake_cluster(name, present=True, count=2, opt_in=False):
  def process_count():
    if isinstance(count, Exception):
      raise count
    return count
  return type(name, (), {"opt_in_only_method": opt_in, "is_env_present": staticmethod(lambda: present),
                         "get_process_count": staticmethod(process_count)})


@pytest.mark.parametrize("env,detected", [
    (_fake_cluster("Slurm2"), True),
    (_fake_cluster("Absent", present=False), False),
    # mpi4py installed on a one-GPU machine: jax itself only uses it when asked to.
    (_fake_cluster("Mpi4pyLike", opt_in=True), False),
    (_fake_cluster("OneTask", count=1), False),
    (_fake_cluster("NoCount", count=RuntimeError("no metadata server")), False),
])
def test_cluster_detection_needs_more_than_one_process(monkeypatch, env, detected):
  from jax._src import clusters
  monkeypatch.setattr(clusters.ClusterEnv, "_cluster_types", [env])
  assert sharding.multihost._cluster_detected() is detected


def test_two_processes_match_one_process(tmp_path, batch):
  mesh_arg = "data=1,fsdp=2,tensor=2"  # params split across the two processes
  mw.launch(2, lambda pid: ["--mesh", mesh_arg, "--out", str(tmp_path / f"p{pid}.npz")])

  local = sharding.make_mesh(mw.parse_mesh(mesh_arg), devices=jax.devices()[:4])
  want, _ = mw.run_step(local, *batch)
  for pid in range(2):
    with np.load(tmp_path / f"p{pid}.npz", allow_pickle=False) as got:
      # process, processes, global devices, local devices, its batch rows
      np.testing.assert_array_equal(got["meta"], [pid, 2, 4, 2, 4 * pid, 4 * pid + 4])
      assert set(got.files) - {"meta"} == set(want)
      for k in want:
        assert _rel(got[k], want[k]) <= 1e-5, (pid, k)
    specs = dict(line.split("\t") for line in (tmp_path / f"p{pid}.npz.specs").read_text().splitlines())
    assert specs["param['embed']"] == str(P("tensor", "fsdp"))


# ----------------------------------------------------------------------------- memory planner


@pytest.mark.parametrize("name, billions", [("0.5B", 0.494), ("7B", 7.6), ("32B", 32.8)])
def test_qwen25_param_counts(name, billions):
  n = memory.param_count(memory.QWEN25[name])
  assert abs(n / (billions * 1e9) - 1) < 0.01


def test_plan_params_grads_optimizer():
  cfg = memory.QWEN25["0.5B"]  # float32 params
  n = memory.param_count(cfg)
  p8 = memory.plan_memory(cfg, {"fsdp": 8}, 8, 1024)
  assert abs(p8.params / (n * 4 / 8) - 1) < 0.01  # norms/biases replicated: slightly above 1/8
  assert p8.params >= n * 4 / 8
  assert p8.grads == p8.params and p8.optimizer == 2 * p8.params  # adamw: two float32 moments
  assert memory.plan_memory(cfg, {"fsdp": 8}, 8, 1024, optimizer="sgd").optimizer == 0
  p24 = memory.plan_memory(cfg, {"data": 2, "fsdp": 4}, 8, 1024)
  assert abs(p24.params / p8.params - 2) < 0.01  # data replicates params
  bf16 = memory.plan_memory(cfg, {"fsdp": 8}, 8, 1024, param_bytes=2)
  assert bf16.params * 2 == p8.params
  with pytest.raises(ValueError, match="optimizer='adafactorz'"):
    memory.plan_memory(cfg, {"fsdp": 8}, 8, 1024, optimizer="adafactorz")


def test_plan_activations_and_kv_cache():
  cfg = memory.QWEN25["7B"]
  base = memory.plan_memory(cfg, {"fsdp": 8}, 8, 2048, rollout_batch=64, rollout_len=4096)
  assert base.batch_per_device == 1 and base.rollout_batch_per_device == 8
  # KV cache: 2 * L * rows * slots * kv_heads * head_dim * 2 bytes (bf16)
  assert base.kv_cache == 2 * 28 * 8 * 4096 * 4 * 128 * 2
  tp = memory.plan_memory(cfg, {"fsdp": 4, "tensor": 2}, 8, 2048, rollout_batch=64, rollout_len=4096)
  assert tp.kv_cache == base.kv_cache  # 2x rows per device, half the kv heads
  # The docstring's formula, by hand: b=1 row, T=2048 (> the dense-attention limit of 1024^2
  # positions, so no score matrix), bf16 (a=2), no tensor split, chunked head of 1024 positions.
  E, F, H, K, D, V, L, T = 3584, 18944, 28, 4, 128, 152064, 28, 2048
  layer = 2 * (4 * E + 3 * H * D + 3 * K * D + 4 * F)
  head = int(3 * 1024 * V * 4) + E * V * 4
  unit = V * E * 4  # the embedding is the largest FSDP unit, gathered in f32
  assert base.activations == 2 * L * T * E * 2 + int(0.25 * T * layer) + head + unit
  no_remat = memory.plan_memory(cfg, {"fsdp": 8}, 8, 2048, remat=False)
  assert no_remat.activations == int(3.2 * L * T * layer) + head + unit
  data_only = memory.plan_memory(cfg, {"data": 8}, 8, 2048)
  assert data_only.activations == base.activations - unit  # nothing to gather without fsdp
  longer = memory.plan_memory(cfg, {"fsdp": 8}, 8, 4096)
  # Twice the tokens: with remat and a chunked head, at most twice the activations (linear in T).
  assert longer.activations - unit < 2 * (base.activations - unit)
  dense = memory.plan_memory(cfg.replace(attention_impl="dense"), {"fsdp": 8}, 8, 2048)
  assert dense.activations == base.activations + H * T * T * (4 + 2)  # one live layer's scores
  assert base.peak == base.params + base.optimizer + max(base.grads + base.activations, base.kv_cache)


@pytest.mark.parametrize("name", list(MESHES))
def test_plan_params_equal_real_shard_bytes(name, placed):
  mesh, params = placed(name)
  dev0 = jax.devices()[0]
  real = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == dev0)
  assert memory.plan_memory(mw.TINY, dict(mesh.shape), 8, 8).params == real


def test_memory_table_cli(capsys):
  from cispo_jax.sharding.__main__ import main
  main(["--seq_len", "1024"])
  lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
  assert len(lines) == 1 + 3 * 6  # header + 3 models x 6 meshes
  assert lines[1].startswith("| 0.5B | 8 | fsdp=8 |")
