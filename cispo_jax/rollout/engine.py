"""Where rollouts come from: the engine interface, the native jitted engine, and the rollout record.

A `RolloutEngine` holds versions of the policy's weights and samples completions with them:

    engine.load_weights(params, version)              # the trainer's params after `version` RL iterations
    out = engine.generate(examples, key, cfg, version=v)   # SampleOutput of the global batch
    logps = engine.completion_logps(out, version=v, ...)   # the behaviour policy's training-forward log-probs
    engine.release_below(v)                           # older versions are done with

The trainer talks to nothing else, so another engine (a vLLM / sglang-jax server, a remote slice)
only has to implement these four methods. `NativeEngine` is the jitted sampler
(`sampling.generate`) on a device mesh: the trainer's own mesh (colocated: the devices take turns)
or a rollout sub-mesh of other devices (disaggregated: weights are copied over after each update,
with the rollout mesh's shardings, and sampling runs while the train mesh updates).

A `Rollout` is one iteration's sampled and scored batch with the policy version that sampled it. Its
arrays stay on the devices that sampled them: each process fetches only its own rows to decode and
score, and only the reward vector is all-gathered. It serialises to JSON (arrays as base64) so a
pipelined run can checkpoint the rollouts that are in flight (pipeline.py).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import threading
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cispo_jax import sharding
from cispo_jax.rollout import sampling
from cispo_jax.model import ModelConfig, lora
from cispo_jax.model.logprobs import completion_logps


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


class RolloutEngine(Protocol):
  """What the trainer needs from whatever samples the rollouts: versioned weights in, samples out."""

  def load_weights(self, params: Any, version: int) -> None:
    """Take the trainer's params after `version` RL iterations. The caller may donate `params` to the
    next update as soon as this returns, so an engine that keeps them past that copies them."""

  def generate(self, examples: Sequence[Any], key: jax.Array, cfg: sampling.SamplingConfig, *,
               version: int) -> sampling.SampleOutput:
    """Completions of `examples` by policy `version`: the global batch, as host numpy arrays (one process)
    or as jax Arrays sharded over the batch axes (the native engine leaves them where it sampled them)."""

  def completion_logps(self, out: sampling.SampleOutput, *, version: int, temperature: float,
                       micro_batches: int) -> np.ndarray:
    """The training forward's log-probs [B, N] of `out`'s completions under policy `version`."""

  def release_below(self, version: int) -> None:
    """Versions older than `version` will not be asked for again."""


class NativeEngine:
  """cispo_jax's jitted sampler on a mesh: the trainer's own (colocated) or a rollout sub-mesh.

  `param_shardings` is the engine's decode layout (sharding.DECODE_RULES: tensor-parallel, replicated
  over the batch axes, which split the requests), so sampling never gathers a weight. load_weights puts
  each version into it once: a jitted reshard on the same devices, or a transfer to this mesh's devices
  (device_put), finished before it returns, since the next update donates the source buffers. Where the
  trainer's layout already is the decode layout (one device, a data-parallel mesh) and
  `copy_weights=False` (colocated, lock-step: max_staleness 0), it samples with the trainer's own buffers.
  Weights are kept per version until release_below drops them.

  LoRA (params holding adapters, model/lora.py): the base is frozen and never donated, so it is put into the
  decode layout once and kept; each version copies only the adapters (megabytes, where a full-model sync moves
  the whole model), and samples with base + adapters unmerged, or with `rollout_merged` with
  W + scaling * A @ B merged once per version (a full copy of the weights per version held).
  """

  def __init__(self, model_cfg: ModelConfig, tokenizer, mesh, param_shardings, *, apply_chat_template: bool,
               copy_weights: bool, paged=None, rollout_merged: bool = False):
    """paged: a paged.PagedConfig to sample with the paged engine (continuous batching), else None.
    param_shardings: the decode layout of the policy's tree (with LoRA: base and adapters)."""
    self.model_cfg, self.tokenizer, self.mesh, self.paged = model_cfg, tokenizer, mesh, paged
    self.param_shardings, self.apply_chat_template = param_shardings, apply_chat_template
    self.batch_sharding = sharding.batch_sharding(mesh, 1)
    self.copy_weights = copy_weights
    self._weights: dict[int, Any] = {}
    self._lock = threading.Lock()  # load_weights (trainer thread) vs generate (a producer thread)
    copy = lambda p: jax.tree.map(lambda x: x.copy(), p)  # noqa: E731
    self._copy = jax.jit(copy, out_shardings=param_shardings)
    self.rollout_merged = rollout_merged
    base_layout, adapter_layout = lora.split(param_shardings)
    if adapter_layout is not None:  # LoRA: each part placed by its own program
      self._lora = {"base": (base_layout, jax.jit(copy, out_shardings=base_layout)),
                    "adapters": (adapter_layout, jax.jit(copy, out_shardings=adapter_layout)),
                    "merge": jax.jit(functools.partial(lora.merged, scaling=model_cfg.lora_scaling),
                                     out_shardings=base_layout)}
    self._base_source, self._base = None, None  # LoRA: the trainer's base and this engine's layout of it
    self.sync_bytes = 0  # bytes the last load_weights copied or transferred (benchmarks read it)

  def load_weights(self, params, version: int) -> None:
    sent = {id(x) for x in jax.tree.leaves(params)}
    params = self._in_engine(params, copy=self.copy_weights)
    self.sync_bytes = int(sum(x.nbytes for x in jax.tree.leaves(params) if id(x) not in sent))
    with self._lock:
      self._weights[version] = params

  def _in_engine(self, params, *, copy: bool):
    """`params` as this engine samples with them. LoRA: the base placed once (again only if the trainer's base
    changed), the adapters placed (copied under `copy`) every time; merged under rollout_merged."""
    base, adapters = lora.split(params)
    if adapters is None:
      return self.to_layout(params, copy=copy)
    if self._base_source is None or not all(a is b for a, b in zip(jax.tree.leaves(self._base_source),
                                                                   jax.tree.leaves(base))):
      self._base_source, self._base = base, _place(base, *self._lora["base"], self.mesh, copy=False)
    policy = lora.combine(self._base, _place(adapters, *self._lora["adapters"], self.mesh, copy=copy))
    if self.rollout_merged:
      return jax.block_until_ready(self._lora["merge"](policy))
    return policy

  def in_layout(self, params) -> bool:
    return _in_layout(params, self.param_shardings)

  def to_layout(self, params, *, copy: bool):
    """`params` in this engine's decode layout: themselves if they are in it already (unless copy)."""
    return _place(params, self.param_shardings, self._copy, self.mesh, copy=copy)

  def weights(self, version: int):
    with self._lock:
      if version not in self._weights:
        raise KeyError(f"rollout engine: policy version {version} not loaded (have {sorted(self._weights)})")
      return self._weights[version]

  def versions(self) -> list[int]:
    with self._lock:
      return sorted(self._weights)

  def release_below(self, version: int) -> None:
    with self._lock:
      for v in [v for v in self._weights if v < version]:
        del self._weights[v]

  def local_rows(self, total: int) -> slice:
    return sharding.process_batch_rows(self.mesh, total, self.batch_sharding)

  def generate(self, examples, key, cfg: sampling.SamplingConfig, *, version: int | None = None,
               params=None, host: bool = False) -> sampling.SampleOutput:
    """Sample on this engine's mesh with policy `version` (or `params`, which must live on this mesh).
    The outputs are global arrays, sharded over this mesh's batch axes, where the sampler left them;
    host=True gathers them to host numpy arrays of the full global batch on every process."""
    params = self.weights(version) if params is None else self._in_engine(params, copy=False)
    tok, mask = sampling.encode_prompts(self.tokenizer, [e.prompt for e in examples], cfg,
                                        apply_chat_template=self.apply_chat_template)
    if self.paged is not None:
      return self._generate_paged(params, tok, mask, key, cfg, host)
    if jax.process_count() > 1:  # every process must feed the same bucket: the largest any of them needs
      width = int(sharding.allgather_host(np.array([tok.shape[1]])).max())
      pad = ((0, 0), (width - tok.shape[1], 0))
      tok, mask = np.pad(tok, pad, constant_values=cfg.pad_token_id), np.pad(mask, pad)
    tok = sharding.host_local_batch_to_global(tok, self.mesh, self.batch_sharding)
    mask = sharding.host_local_batch_to_global(mask, self.mesh, self.batch_sharding)
    with jax.set_mesh(self.mesh):  # the model pins its activations' layout on this mesh
      out = sampling.generate(params, self.model_cfg, tok, mask, key, cfg, batch_sharding=self.batch_sharding)
    return jax.tree.map(sharding.to_host, out) if host else out

  def _generate_paged(self, params, tok, mask, key, cfg, host: bool) -> sampling.SampleOutput:
    from cispo_jax.rollout.paged import generate_paged

    if jax.process_count() > 1:
      raise ValueError("RolloutConfig.engine='paged' runs on one process for now (this run has "
                       f"{jax.process_count()}); use engine='static' across hosts")
    prompts = [row[m > 0].tolist() for row, m in zip(tok, mask)]
    with jax.set_mesh(self.mesh):
      out, stats = generate_paged(params, self.model_cfg, prompts, key, cfg, self.paged)
    self.last_stats = stats  # page and row-step accounting of the last call (benchmarks read it)
    if host:
      return out
    return sampling.SampleOutput(*(None if x is None else jax.device_put(x, self.batch_sharding) for x in out))

  def completion_logps(self, out: sampling.SampleOutput, *, version: int, temperature: float,
                       micro_batches: int) -> jax.Array:
    """At full completion width, on this mesh; the behaviour policy's log-probs of a stale rollout."""
    with jax.set_mesh(self.mesh):
      tokens, kv_valid = _sequences(*(jax.device_put(x, self.batch_sharding) for x in (
          out.prompt_tokens_BxP, out.tokens_BxN, out.prompt_mask_BxP, out.mask_BxN)))
      return batched_completion_logps(self.weights(version), tokens, kv_valid, model_cfg=self.model_cfg,
                                      n_completion=out.tokens_BxN.shape[1], temperature=temperature,
                                      micro_batches=micro_batches)


def _in_layout(tree, shardings) -> bool:
  return all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def _place(tree, shardings, copy_fn, mesh, *, copy: bool):
  """`tree` in `shardings` on `mesh`: itself if it is in that layout already (unless copy), else `copy_fn`
  (a jitted copy into that layout) on the same devices, or a transfer to this mesh's devices."""
  if _in_layout(tree, shardings) and not copy:
    return tree
  same = set(jax.tree.leaves(tree)[0].sharding.device_set) == set(mesh.devices.flat)
  return jax.block_until_ready(copy_fn(tree) if same else jax.device_put(tree, shardings))


@jax.jit
def _sequences(prompt_BxP, tokens_BxN, prompt_mask_BxP, mask_BxN):
  return (jnp.concatenate([prompt_BxP, tokens_BxN], 1).astype(jnp.int32),
          jnp.concatenate([prompt_mask_BxP, mask_BxN], 1).astype(bool))


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array (all of it with one process), on the host."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  shards = {}
  for shard in x.addressable_shards:  # replicas of a row block appear once per device holding it
    shards.setdefault(shard.index[0].start or 0, shard)
  return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)], axis=0)


@dataclasses.dataclass
class Rollout:
  """One iteration's rollout on the host: sampled by policy `version`, trained on at `iteration`."""

  iteration: int
  version: int
  out: sampling.SampleOutput  # the global batch, on the device where the sampler left it (or host arrays)
  rewards_B: np.ndarray  # every process's rows (all-gathered); only this vector crosses between hosts
  stats: dict  # the reward worker's counts (errors, timeouts) and per-reward means, this process's rows
  behaviour_logps_BxN: Any  # training-forward log-probs at `version` (stale rollouts only), on device
  stream_state: dict  # the prompt stream's state after this rollout's prompts were drawn
  seconds: dict  # time/<phase>_s spent making it: rollout (sampling), reward, logps (behaviour forward)
  valid_B: np.ndarray | None = None  # [B] bool, all-gathered: rows none of whose rewards failed; None = all

  def to_json(self) -> dict:
    """Host copies of everything (one process: pipelined runs are single-process)."""
    return {"iteration": self.iteration, "version": self.version, "out": _encode(self.out._asdict()),
            "rewards_B": _encode(self.rewards_B), "stats": self.stats,
            "behaviour_logps_BxN": _encode(self.behaviour_logps_BxN), "stream_state": self.stream_state,
            "seconds": self.seconds, "valid_B": _encode(self.valid_B)}

  @classmethod
  def from_json(cls, d: dict) -> "Rollout":
    return cls(iteration=int(d["iteration"]), version=int(d["version"]),
               out=sampling.SampleOutput(**_decode(d["out"])), rewards_B=_decode(d["rewards_B"]),
               stats=dict(d["stats"]), behaviour_logps_BxN=_decode(d["behaviour_logps_BxN"]),
               stream_state=dict(d["stream_state"]), seconds=dict(d["seconds"]),
               valid_B=_decode(d.get("valid_B")))  # a checkpoint from before valid_B: every row valid


def _encode(x):
  """Arrays (also inside dicts) as {dtype, shape, base64 bytes}: exact, and a tenth of JSON lists' size."""
  if x is None:
    return None
  if isinstance(x, dict):
    return {k: _encode(v) for k, v in x.items()}
  a = np.ascontiguousarray(jax.device_get(x))
  return {"dtype": str(a.dtype), "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def _decode(d):
  if d is None:
    return None
  if "b64" not in d:
    return {k: _decode(v) for k, v in d.items()}
  return np.frombuffer(base64.b64decode(d["b64"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()
