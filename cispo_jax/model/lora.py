"""LoRA adapters on the decoder's linear layers: their config, shapes, layout, init, merge and fingerprint.

An adapter is two leaves beside the weight it adapts, in the same parameter tree:

    params["layers"]["attn"]["q_kernel"]   [L, E, H, D]     the frozen base weight
    params["layers"]["attn"]["q_lora_a"]   [L, E, r]        A: the weight's input dims x rank
    params["layers"]["attn"]["q_lora_b"]   [L, r, H, D]     B: rank x the weight's output dims

and the model (transformer.py, and the paged engine's step) adds `scaling * (x @ A) @ B` to the weight's
output wherever such a pair is in the tree it is given. So the policy is `combine(base, adapters)`, the
reference is `base` itself (the same buffers, adapters absent: no copy), and every forward in the framework
(training, rollouts, eval) takes either without knowing which it has. The trainer differentiates and
optimises the adapters alone; the base is a separate, never-donated argument stored in the compute dtype.

Init as in the paper and peft: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform with a = sqrt(5)),
B = 0, so the policy at step 0 is the base exactly. The embedding's adapter follows peft's Embedding layer:
A = 0 and B ~ N(0, 1) (a lookup has no fan-in), again a zero product. Scaling: alpha / rank, or alpha /
sqrt(rank) with rsLoRA (Kalajdzievski 2023), as peft's `use_rslora`.

Layout (sharding): A keeps its weight's input axes and B its output axes (logical names and so mesh axes),
the rank axis is replicated ("lora_rank" -> None). Then x @ A needs exactly the communication x @ W needs
(none under tensor parallelism for q/k/v/gate/up; a partial sum over the sharded input for o/down, of an
[tokens, r] array instead of [tokens, E]), and (x @ A) @ B comes out sharded like x @ W, so the sum needs no
reshard. Replicating A and B instead would cost nothing in memory (a 7B model's rank-32 adapters are 80M
parameters) but would all-gather the sharded activation for o/down; following the weight costs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import jax
import jax.numpy as jnp

LAYER_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
TARGETS = LAYER_TARGETS + ("embed", "lm_head")
EXPORTS = ("peft", "merged", "both")
RANK_AXIS = "lora_rank"

# target -> (path of its weight in the tree, number of leading input dims of the weight after `layers`)
WEIGHTS: dict[str, tuple[tuple[str, ...], int]] = {
    "q": (("layers", "attn", "q_kernel"), 1), "k": (("layers", "attn", "k_kernel"), 1),
    "v": (("layers", "attn", "v_kernel"), 1), "o": (("layers", "attn", "o_kernel"), 2),
    "gate": (("layers", "mlp", "gate_kernel"), 1), "up": (("layers", "mlp", "up_kernel"), 1),
    "down": (("layers", "mlp", "down_kernel"), 1),
    "embed": (("embed",), 1), "lm_head": (("lm_head",), 1),
}
# target -> its module in a transformers model (peft's target_modules)
HF_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj", "embed": "embed_tokens", "lm_head": "lm_head"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters instead of full fine-tuning (rank 0 = full fine-tuning, the default).

  targets: of q, k, v, o, gate, up, down (the decoder's linear layers, the default) and embed, lm_head.
  rollout_merged: the rollout engine samples with W + scaling * A @ B merged once per policy version (a
  full copy of the weights per version it holds) instead of adding the adapters' product at every step.
  export: final_model/ as a PEFT adapter directory ('peft'), a merged HF model ('merged'), or the adapter
  directory with the merged model in final_model/merged ('both').
  """
  rank: int = 0
  alpha: float = 32.0
  targets: tuple[str, ...] = LAYER_TARGETS
  rslora: bool = False
  rollout_merged: bool = False
  export: str = "peft"

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"LoraConfig.rank={self.rank}; must be >= 0 (0 = full fine-tuning)")
    if self.alpha <= 0:
      raise ValueError(f"LoraConfig.alpha={self.alpha}; must be > 0")
    object.__setattr__(self, "targets", tuple(self.targets))
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ValueError(f"LoraConfig.targets={self.targets!r}: want distinct names of {', '.join(TARGETS)}")
    if self.export not in EXPORTS:
      raise ValueError(f"LoraConfig.export={self.export!r}; allowed: {', '.join(EXPORTS)}")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scaling(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def check_model(self, model_cfg) -> None:
    """Refuse targets the model cannot take: with tied embeddings the LM head is the embedding, and an
    adapter on either would change the other in a merged export but not in peft."""
    tied = [t for t in ("embed", "lm_head") if t in self.targets and model_cfg.tie_word_embeddings]
    if tied:
      raise ValueError(f"LoraConfig.targets has {tied} but the model ties its embedding and LM head "
                       "(tie_word_embeddings): adapt the decoder's linear layers only")


def adapter_key(name: str, which: str) -> str:
  """The leaf name of a weight's adapter: 'q_kernel' -> 'q_lora_a'; 'embed' -> 'embed_lora_a'."""
  return f"{name.removesuffix('_kernel')}_lora_{which}"


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def _set(tree: dict, keys, value):
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def _targets(lcfg: LoraConfig):
  for t in lcfg.targets:
    path, n_in = WEIGHTS[t]
    yield t, path, n_in


def _split_dims(seq, path, n_in):
  """(layer dims, input dims, output dims) of a weight's shape or logical names."""
  lead = 1 if path[0] == "layers" else 0
  return tuple(seq[:lead]), tuple(seq[lead:lead + n_in]), tuple(seq[lead + n_in:])


def adapter_shapes(base_shapes, lcfg: LoraConfig, dtype=jnp.float32):
  """ShapeDtypeStructs of the adapters of `lcfg` for a model with these base parameter shapes."""
  out: dict = {}
  for t, path, n_in in _targets(lcfg):
    if t == "lm_head" and "lm_head" not in base_shapes:
      raise ValueError("LoraConfig.targets has 'lm_head' but the model has no separate LM head (tied embeddings)")
    lead, ins, outs = _split_dims(_get(base_shapes, path).shape, path, n_in)
    parent, name = path[:-1], path[-1]
    _set(out, parent + (adapter_key(name, "a"),), jax.ShapeDtypeStruct(lead + ins + (lcfg.rank,), dtype))
    _set(out, parent + (adapter_key(name, "b"),), jax.ShapeDtypeStruct(lead + (lcfg.rank,) + outs, dtype))
  return out


def adapter_logical_axes(base_logical, lcfg: LoraConfig):
  """PartitionSpecs of the adapters: A the weight's input axes and the rank, B the rank and its output axes."""
  from jax.sharding import PartitionSpec as P

  out: dict = {}
  for _, path, n_in in _targets(lcfg):
    lead, ins, outs = _split_dims(tuple(_get(base_logical, path)), path, n_in)
    parent, name = path[:-1], path[-1]
    _set(out, parent + (adapter_key(name, "a"),), P(*lead, *ins, RANK_AXIS))
    _set(out, parent + (adapter_key(name, "b"),), P(*lead, RANK_AXIS, *outs))
  return out


def init_adapters(rng, base_shapes, lcfg: LoraConfig, dtype=jnp.float32):
  """A random, B zero (embedding: A zero, B ~ N(0, 1), as peft): policy == base at step 0."""
  shapes = adapter_shapes(base_shapes, lcfg, dtype)
  out: dict = {}
  keys = jax.random.split(rng, len(lcfg.targets))
  for key, (t, path, n_in) in zip(keys, _targets(lcfg)):
    parent, name = path[:-1], path[-1]
    sa, sb = _get(shapes, parent + (adapter_key(name, "a"),)), _get(shapes, parent + (adapter_key(name, "b"),))
    lead = 1 if path[0] == "layers" else 0
    if t == "embed":
      a, b = jnp.zeros(sa.shape, dtype), jax.random.normal(key, sb.shape, jnp.float32).astype(dtype)
    else:
      fan_in = math.prod(sa.shape[lead:-1])
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(key, sa.shape, jnp.float32, -bound, bound).astype(dtype)
      b = jnp.zeros(sb.shape, dtype)
    _set(out, parent + (adapter_key(name, "a"),), a)
    _set(out, parent + (adapter_key(name, "b"),), b)
  return out


def combine(base, adapters):
  """The policy's parameter tree: the base's leaves with the adapters beside them (no array is copied)."""
  if adapters is None:
    return base
  if not isinstance(adapters, dict):
    raise TypeError(f"adapters must be a dict tree, got {type(adapters).__name__}")
  out = dict(base)
  for k, v in adapters.items():
    out[k] = combine(base[k], v) if isinstance(v, dict) and k in base else v
  return out


def split(params):
  """(base, adapters) of a combined tree; adapters is None when it has none."""
  base, adapters = {}, {}
  for k, v in params.items():
    if isinstance(v, dict):
      b, a = split(v)
      base[k] = b
      if a is not None:
        adapters[k] = a
    elif k.endswith("_lora_a") or k.endswith("_lora_b"):
      adapters[k] = v
    else:
      base[k] = v
  return base, (adapters or None)


def delta(x_BxTxI, a, b, n_in: int, scaling: float, dt):
  """scaling * (x @ A) @ B for activations [B, T, *in] (tokens merged into one dim, as _tokens_matmul):
  [B, T, *out]. The scaling multiplies the [tokens, r] product, the smallest array on the way."""
  B, T = x_BxTxI.shape[:2]
  x = x_BxTxI.reshape(B * T, *x_BxTxI.shape[2:]).astype(dt)
  h = jnp.tensordot(x, a.astype(dt), axes=n_in) * jnp.asarray(scaling, dt)
  y = jnp.tensordot(h, b.astype(dt), axes=1)
  return y.reshape(B, T, *y.shape[1:])


def adapted(y, x, adapter, n_in: int, cfg):
  """y = x @ W plus the adapter's scaling * (x @ A) @ B (`delta`); y itself when there is none (adapter None)."""
  if adapter is None:
    return y
  if not cfg.lora_scaling:
    raise ValueError("the params hold LoRA adapters but ModelConfig.lora_scaling is 0 (set it to LoraConfig.scaling)")
  return y + delta(x, *adapter, n_in, cfg.lora_scaling, cfg.jnp_dtype).astype(y.dtype)


def module_adapter(module, name: str):
  """(A, B) of the weight `name`'s adapter if the params a Flax module was applied with hold one, else None."""
  a, b = adapter_key(name, "a"), adapter_key(name, "b")
  if not module.has_variable("params", a):
    return None
  return module.get_variable("params", a), module.get_variable("params", b)


def embed_delta(tokens_BxT, a, b, scaling: float, dt):
  """The embedding adapter's rows: scaling * A[tokens] @ B, [B, T, E]."""
  h = jnp.take(a, tokens_BxT, axis=0).astype(dt) * jnp.asarray(scaling, dt)
  return jnp.einsum("btr,re->bte", h, b.astype(dt))


def product(a, b, lead: int):
  """A @ B in f32 in the weight's own layout ([L,] *in, *out)."""
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  if lead:
    return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a32, b32)
  return jnp.tensordot(a32, b32, axes=1)


def merged(params, scaling: float):
  """The base tree with every adapted weight replaced by W + scaling * A @ B (summed in f32, stored in W's
  dtype) and the adapters removed: a plain model (rollout_merged, the merged export). Jittable."""
  base, adapters = split(params)
  if adapters is None:
    return base
  out = jax.tree.map(lambda x: x, base)

  def walk(tree, path):
    for k, v in tree.items():
      if isinstance(v, dict):
        walk(v, path + (k,))
      elif k.endswith("_lora_a"):
        stem = k.removesuffix("_lora_a")
        name = f"{stem}_kernel" if path else stem  # top level: embed, lm_head
        w = _get(base, path + (name,))
        lead = 1 if path and path[0] == "layers" else 0
        ab = product(v, tree[f"{stem}_lora_b"], lead)
        _set(out, path + (name,), (w.astype(jnp.float32) + scaling * ab.reshape(w.shape)).astype(w.dtype))

  walk(adapters, ())
  return out


def fingerprint(base) -> str:
  """A fingerprint of the base weights' values: the checkpoint's per-leaf bit fingerprints (runtime/checkpoint:
  exact integer sums, the same under any sharding) with each leaf's path, shape and dtype, hashed with sha256;
  16 hex digits. A changed weight changes it but with probability 2**-32 per leaf."""
  from cispo_jax.runtime.checkpoint import fingerprints

  flat = jax.tree_util.tree_flatten_with_path(base)[0]
  prints, _ = fingerprints([x for _, x in flat])
  h = hashlib.sha256()
  for (path, x), fp in zip(flat, prints):
    h.update(f"{jax.tree_util.keystr(path)}|{tuple(x.shape)}|{x.dtype}|{fp};".encode())
  return h.hexdigest()[:16]


def count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))

