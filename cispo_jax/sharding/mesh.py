"""Device mesh and the one table that maps logical axis names to mesh axes.

The model names every parameter dimension (`vocab`, `embed`, `heads`, ...);
`RULES` says which mesh axes (`data`, `fsdp`, `tensor`) split each name.
Changing the parallelism is changing `MeshConfig` (gin) or `RULES`, never the model.

Resolution is a pure function of axis *sizes* (`resolve_spec`), so the memory
planner computes exactly the shard shapes that `param_shardings` places.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
# FSDP splits the model dimension of every matrix; tensor parallelism splits
# heads, MLP width and vocab (Megatron style); the batch runs over data x fsdp.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("length", None),
    ("lora_rank", None),  # LoRA's rank axis: tiny, replicated (model/lora.py says why)
)

# The decode layout: weights split only by tensor parallelism (heads, MLP width, vocab) and replicated
# over data x fsdp, which split the requests instead. Sampling reads every weight once per token, so
# FSDP's layout would gather the whole model on every device at every step (or, hoisted by XLA out of
# the decode loop, hold a gathered copy for the whole rollout); this one never gathers a weight.
DECODE_RULES: tuple[tuple[str, Any], ...] = tuple((n, None if n == "embed" else m) for n, m in RULES)

# KV cache [layers, B, S, kv_heads, head_dim] (cispo_jax.model.init_cache).
CACHE_AXES = P("layers", "batch", "length", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; -1 means "all the devices the other axes leave"."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def __post_init__(self):
    for name in AXES:
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or (v < 1 and v != -1):
        raise ValueError(f"MeshConfig.{name}={v!r}; allowed: a positive int, or -1 for the remaining devices")
    rest = [n for n in AXES if getattr(self, n) == -1]
    if len(rest) > 1:
      raise ValueError(f"MeshConfig.{rest[1]}=-1: only one axis may be -1 (also {rest[0]}=-1)")

  def resolve(self, num_devices: int) -> dict[str, int]:
    """Axis sizes {data, fsdp, tensor} whose product is `num_devices`."""
    sizes = {n: getattr(self, n) for n in AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for name, v in sizes.items():
      if v == -1:
        if num_devices % fixed:
          others = "*".join(f"{n}={sizes[n]}" for n in AXES if n != name)
          raise ValueError(f"MeshConfig.{name}=-1 cannot take the rest: {num_devices} devices are not "
                           f"divisible by {others}={fixed}")
        sizes[name] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
      raise ValueError(f"MeshConfig data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = "
                       f"{math.prod(sizes.values())} != {num_devices} devices; fix MeshConfig.data/fsdp/tensor "
                       "or set one of them to -1")
    return sizes


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh with axes ("data", "fsdp", "tensor") laid out on the real topology.

  Multi-slice TPU (devices with several `slice_index`): slices are joined over
  the data axis (data-center network is slowest, data parallelism talks least).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = cfg.resolve(len(devices))
  shape = tuple(sizes[n] for n in AXES)
  auto = (AxisType.Auto,) * len(AXES)  # GSPMD propagation; jax.make_mesh defaults to Explicit
  slices = {getattr(d, "slice_index", 0) for d in devices}
  if len(slices) > 1:
    n = len(slices)
    if sizes["data"] % n:
      raise ValueError(f"MeshConfig.data={sizes['data']} must be a multiple of the {n} TPU slices")
    ici = (sizes["data"] // n, sizes["fsdp"], sizes["tensor"])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (n, 1, 1), devices)
    return Mesh(grid, AXES, axis_types=auto)
  return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def axis_sizes(mesh_or_shape: Mesh | Mapping[str, int]) -> dict[str, int]:
  """{axis: size} from a Mesh or a (partial) dict; missing axes have size 1."""
  shape = dict(mesh_or_shape.shape) if isinstance(mesh_or_shape, Mesh) else dict(mesh_or_shape)
  unknown = set(shape) - set(AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} unknown; allowed: {AXES}")
  return {n: int(shape.get(n, 1)) for n in AXES}


_LOGGED: set = set()


def _log_once(key, msg):
  if key not in _LOGGED:
    _LOGGED.add(key)
    log.warning(msg)


def resolve_spec(logical: P | Sequence[Any], shape: Sequence[int], sizes: Mapping[str, int],
                 rules: Sequence[tuple[str, Any]] = RULES) -> P:
  """Mesh PartitionSpec for one array from its logical names and shape.

  A mesh axis that does not divide its dimension (14 heads over tensor=4), or
  that an earlier dimension already uses, is dropped for that dimension, which is
  then replicated over it; each such fallback is logged once.
  """
  table = dict(rules)
  names = tuple(logical) + (None,) * (len(shape) - len(tuple(logical)))
  if len(names) != len(shape):
    raise ValueError(f"logical spec {tuple(logical)} has more entries than the array's shape {tuple(shape)}")
  used, out = set(), []
  for dim, name in zip(shape, names):
    group = name if isinstance(name, tuple) else (name,)
    mesh_axes: list[str] = []
    for n in group:
      if n is None:
        continue
      if n not in table:
        raise ValueError(f"logical axis {n!r} has no rule; known: {sorted(table)}")
      m = table[n]
      mesh_axes += [] if m is None else [m] if isinstance(m, str) else list(m)
    kept, size = [], 1
    for ax in mesh_axes:
      if ax not in sizes:
        raise ValueError(f"rule maps logical axis {name!r} to mesh axis {ax!r}; allowed: {tuple(sizes)}")
      if ax in used:
        continue  # one mesh axis can split only one dimension of an array
      if dim % (size * sizes[ax]):
        _log_once((name, dim, ax, sizes[ax]),
                  f"sharding: dim {name!r} of size {dim} is not divisible by mesh axis {ax!r} "
                  f"(x{size * sizes[ax]}); replicating that dim over {ax!r}")
        continue
      kept.append(ax)
      size *= sizes[ax]
    used.update(kept)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def shard_shape(shape: Sequence[int], spec: P, sizes: Mapping[str, int]) -> tuple[int, ...]:
  """Per-device block shape of an array of `shape` placed with mesh `spec`."""
  out = []
  for i, dim in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    out.append(dim // math.prod(sizes[a] for a in axes))
  return tuple(out)


def _is_spec(x):
  return isinstance(x, P)


def param_shardings(logical_axes_tree, shapes_tree, mesh: Mesh, rules=RULES):
  """Tree of NamedSharding from a tree of logical PartitionSpecs and one of shapes."""
  sizes = axis_sizes(mesh)
  return jax.tree.map(lambda lg, x: NamedSharding(mesh, resolve_spec(lg, np.shape(x), sizes, rules)),
                      logical_axes_tree, shapes_tree, is_leaf=_is_spec)


def constrain(x, *logical: str | None):
  """Pin an activation's layout by logical axis names, under the mesh of `jax.set_mesh`.

  Without it GSPMD is free to keep FSDP-sharded weights in place and replicate the batch
  instead (measured: Qwen2.5-0.5B on fsdp=8 held the global batch's [8, T, F] MLP activations
  on every device, 4x the memory of one device). A no-op outside a mesh context (one
  device, tests), so the model stays a plain function.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return x
  sizes = axis_sizes({n: mesh.shape[n] for n in AXES})
  return jax.lax.with_sharding_constraint(x, resolve_spec(P(*logical), x.shape, sizes))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Dim 0 split over data x fsdp, the rest replicated (batch size must divide)."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def cache_sharding(mesh: Mesh, cache_shape: Sequence[int], rules=RULES) -> NamedSharding:
  """Sharding for one KV-cache array [layers, B, S, kv_heads, head_dim]."""
  return NamedSharding(mesh, resolve_spec(CACHE_AXES, cache_shape, axis_sizes(mesh), rules))


def optimizer_logical_axes(optimizer, params_logical, params_shapes):
  """Logical specs of an optax state: moments like their params, counters replicated."""
  import optax  # only the trainer needs it

  state = jax.eval_shape(optimizer.init, params_shapes)
  return optax.tree_map_params(optimizer, lambda _, lg: lg, state, params_logical,
                               transform_non_params=lambda _: P(), is_leaf=_is_spec)


def shard_init(init_fn: Callable[..., Any], mesh: Mesh, logical_axes, *args, rules=RULES):
  """Run `init_fn(*args)` so its outputs are created already sharded.

  `logical_axes` is the output's tree of logical PartitionSpecs, or a function
  from the abstract output (jax.eval_shape) to it. Nothing is materialised whole
  on one device: each device computes only its shards.
  """
  abstract = jax.eval_shape(init_fn, *args)
  logical = logical_axes(abstract) if callable(logical_axes) else logical_axes
  shardings = param_shardings(logical, abstract, mesh, rules)
  return jax.jit(init_fn, out_shardings=shardings)(*args)
