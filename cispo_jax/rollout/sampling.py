"""Rollout engine: jitted, batched KV-cache sampling with the controls RL needs.

`generate` pads the prompts (on the left) to a bucket length, then runs one compiled program:
a prefill over the bucketed prompts and a `jax.lax.while_loop` decode, one token per step,
that stops when every row has hit a stop token or `max_new_tokens` is reached. Nothing runs
in Python per token.

Log-prob convention (the trainer must match it): `logps_BxN[b, t]` is the log-probability of the
sampled token under `log_softmax(logits / temperature)` -- the temperature-scaled distribution of
the full vocabulary, BEFORE top-k / top-p / min-p filtering (for `greedy=True`, temperature 1).
So a training forward that computes `log_softmax(logits / temperature)` recovers the sampler's
log-probs up to float error; the filters only restrict which tokens can be drawn.

Compiled programs are cached per (prompt bucket, batch size, sampling config, model config,
parameter layout, sharding); `compile_count()` says how many were built, and each new one is
logged, so a run with varied prompt lengths compiles at most one program per bucket.

Memory: the KV cache [layers, B, bucket + max_new_tokens - 1, kv_heads, head_dim] is created
inside the program and updated in place by the loop, so there is no input buffer to donate;
with `num_samples > 1` each prompt is prefilled once and its cache copied to its samples.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cispo_jax.data.prompts import tokenize_prompts
from cispo_jax.model import ModelConfig, forward, init_cache, positions_from_mask
from cispo_jax.rollout.filters import choose_tokens

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample. Hashable: it is a static argument of the compiled program.

  Filters apply in the order top-k, top-p, min-p, each to the (renormalised) distribution the
  previous one left, all on the temperature-scaled logits (the HF `generate` order).
  `greedy=True` takes the argmax and ignores temperature and filters; an evaluation config is
  typically `dataclasses.replace(train_cfg, greedy=True, num_samples=1)`.
  """

  max_new_tokens: int = 64
  temperature: float = 1.0
  greedy: bool = False
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  min_p: float = 0.0  # 0 = off
  stop_token_ids: tuple[int, ...] = ()
  stop_sequences: tuple[tuple[int, ...], ...] = ()  # multi-token stops: the row ends on their last token
  num_samples: int = 1  # completions per prompt; output rows grouped: p0s0, p0s1, .., p1s0, ..
  prompt_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
  pad_token_id: int = 0
  # ScaleRL's forced interruption (the paged engine only): a row that reaches think_budget completion tokens
  # without having produced think_end_tokens gets interrupt_tokens appended (not sampled; they enter the
  # context, not the loss), then goes on to its max_new_tokens. 0 = off.
  think_budget: int = 0
  interrupt_tokens: tuple[int, ...] = ()
  think_end_tokens: tuple[int, ...] = ()

  def __post_init__(self):
    def bad(field, allowed):
      raise ValueError(f"SamplingConfig.{field}={getattr(self, field)!r}; allowed: {allowed}")

    # Lists from gin/CLI become tuples so the config stays hashable.
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    object.__setattr__(self, "stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences))
    object.__setattr__(self, "prompt_buckets", tuple(int(b) for b in self.prompt_buckets))
    for name in ("interrupt_tokens", "think_end_tokens"):
      object.__setattr__(self, name, tuple(int(t) for t in getattr(self, name)))
    if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
      bad("max_new_tokens", "an int >= 1")
    if not self.temperature > 0:
      bad("temperature", "a float > 0 (use greedy=True for argmax decoding)")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      bad("top_k", "an int >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      bad("top_p", "0 < top_p <= 1 (1 = off)")
    if not 0.0 <= self.min_p <= 1.0:
      bad("min_p", "0 <= min_p <= 1 (0 = off)")
    if any(t < 0 for t in self.stop_token_ids):
      bad("stop_token_ids", "token ids >= 0")
    if any(not q or min(q) < 0 for q in self.stop_sequences):
      bad("stop_sequences", "non-empty tuples of token ids >= 0")
    if not (isinstance(self.num_samples, int) and self.num_samples >= 1):
      bad("num_samples", "an int >= 1")
    b = self.prompt_buckets
    if not b or b[0] < 1 or any(x >= y for x, y in zip(b, b[1:])):
      bad("prompt_buckets", "a non-empty, strictly increasing tuple of ints >= 1")
    if self.pad_token_id < 0:
      bad("pad_token_id", "a token id >= 0")
    if self.think_budget and not (self.interrupt_tokens and self.think_end_tokens):
      bad("think_budget", "0, or > 0 with interrupt_tokens and think_end_tokens given")
    if self.think_budget and self.think_budget + len(self.interrupt_tokens) >= self.max_new_tokens:
      bad("think_budget", f"< max_new_tokens={self.max_new_tokens} - {len(self.interrupt_tokens)} interrupt tokens "
          "(else no answer fits after the interruption)")


class SampleOutput(NamedTuple):
  """Rows are prompts repeated `num_samples` times, grouped: p0s0, p0s1, .., p1s0, ...

  Masks are int32 0/1. `mask_BxN` is 1 up to and including the stop token; completion tokens
  after it are `pad_token_id` with log-prob 0. `logps_BxN` follows the module's convention.
  """

  prompt_tokens_BxP: jax.Array  # left-padded to the bucket
  prompt_mask_BxP: jax.Array
  tokens_BxN: jax.Array
  mask_BxN: jax.Array
  logps_BxN: jax.Array  # float32
  lengths_B: jax.Array  # int32, completion tokens incl. the stop token
  stopped_B: jax.Array  # bool: finished by a stop token (else by max_new_tokens)
  forced_BxN: Any = None  # int32 0/1: tokens appended by a forced interruption (context, not loss); None: none


# ----------------------------------------------------------------------------- the program


def _constrain(x, sharding, batch_axis=0):
  """Split dim `batch_axis` of x like the batch; leave the other dims to the compiler."""
  if sharding is None:
    return x
  spec = [PartitionSpec.UNCONSTRAINED] * x.ndim
  spec[batch_axis] = sharding.spec[0] if len(sharding.spec) else None
  return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, PartitionSpec(*spec)))


def _generate_core(params, prompt_tokens_BxP, prompt_mask_BxP, rng, *, model_cfg: ModelConfig,
                   cfg: SamplingConfig, share_prefill: bool, sharding):
  """Prefill + while_loop decode. Shapes are static; B here is prompts x num_samples."""
  n, N = cfg.num_samples, cfg.max_new_tokens
  P = prompt_tokens_BxP.shape[1]
  pad = jnp.int32(cfg.pad_token_id)
  stop_ids = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)
  batch = lambda x, axis=0: _constrain(x, sharding, axis)
  repeat = lambda x, axis=0: batch(jnp.repeat(x, n, axis=axis), axis)

  if not share_prefill:  # repeat first: each copy is prefilled (needed when B can't be split)
    prompt_tokens_BxP, prompt_mask_BxP = repeat(prompt_tokens_BxP), repeat(prompt_mask_BxP)
  prompt_mask_BxP = prompt_mask_BxP.astype(jnp.int32)
  Bp = prompt_tokens_BxP.shape[0]
  # Slot P-1+t holds the token fed at decode step t. Slots not yet written are hidden by the
  # causal mask, so kv_valid is fixed for the whole decode.
  kv_valid_BxS = jnp.concatenate([prompt_mask_BxP, jnp.ones((Bp, N - 1), jnp.int32)], axis=1) > 0
  cache = jax.tree.map(lambda c: batch(c, 1), init_cache(model_cfg, Bp, P + N - 1))
  if P > 1:
    # Prefill all but the last prompt token and drop the logits: XLA then skips the LM head, which
    # would be a [B, P, vocab] array. The last token is decode step 0.
    _, cache = forward(params, model_cfg, prompt_tokens_BxP[:, :-1],
                       positions_from_mask(prompt_mask_BxP)[:, :-1], kv_valid_BxS, cache, 0)
  if share_prefill and n > 1:  # one prefill per prompt, then copy its cache to its samples
    cache = jax.tree.map(lambda c: repeat(c, 1), cache)
    kv_valid_BxS, prompt_tokens_BxP, prompt_mask_BxP = map(
        repeat, (kv_valid_BxS, prompt_tokens_BxP, prompt_mask_BxP))
  B = prompt_tokens_BxP.shape[0]
  last_pos_B = prompt_mask_BxP.sum(axis=1) - 1

  def body(carry):
    step, cache, tokens_BxN, logps_BxN, done_B, len_B = carry
    prev_B1 = jnp.where(step == 0, prompt_tokens_BxP[:, -1:],
                        jax.lax.dynamic_slice_in_dim(tokens_BxN, jnp.maximum(step - 1, 0), 1, axis=1))
    logits_Bx1xV, cache = forward(params, model_cfg, prev_B1, (last_pos_B + step)[:, None],
                                  kv_valid_BxS, cache, P - 1 + step)
    tok_B, logp_B = choose_tokens(logits_Bx1xV[:, 0], jax.random.fold_in(rng, step), cfg)
    tok_B = jnp.where(done_B, pad, tok_B)
    logp_B = jnp.where(done_B, 0.0, logp_B)
    hit_B = jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1)
    tokens_BxN = jax.lax.dynamic_update_slice_in_dim(tokens_BxN, tok_B[:, None], step, 1)
    for seq in cfg.stop_sequences:  # the completion's last len(seq) tokens are the sequence
      m = len(seq)
      window_Bxm = jax.lax.dynamic_slice_in_dim(tokens_BxN, jnp.maximum(step - m + 1, 0), m, axis=1)
      hit_B |= (step >= m - 1) & jnp.all(window_Bxm == jnp.asarray(seq, jnp.int32)[None, :], axis=1)
    hit_B &= ~done_B
    logps_BxN = jax.lax.dynamic_update_slice_in_dim(logps_BxN, logp_B[:, None], step, 1)
    return step + 1, cache, tokens_BxN, logps_BxN, done_B | hit_B, jnp.where(hit_B, step + 1, len_B)

  def cond(carry):
    return (carry[0] < N) & ~jnp.all(carry[4])

  init = (jnp.int32(0), cache, batch(jnp.full((B, N), pad, jnp.int32)),
          batch(jnp.zeros((B, N), jnp.float32)), batch(jnp.zeros((B,), bool)),
          batch(jnp.full((B,), N, jnp.int32)))
  _, _, tokens_BxN, logps_BxN, stopped_B, len_B = jax.lax.while_loop(cond, body, init)
  mask_BxN = (jnp.arange(N)[None, :] < len_B[:, None]).astype(jnp.int32)
  return SampleOutput(prompt_tokens_BxP, prompt_mask_BxP, tokens_BxN, mask_BxN, logps_BxN,
                      len_B, stopped_B)


# ----------------------------------------------------------------------------- compile cache

_PROGRAMS: dict[Any, Any] = {}


def compile_count() -> int:
  """How many sampling programs this process has compiled (one per distinct shape/config)."""
  return len(_PROGRAMS)


def clear_compiled() -> None:
  _PROGRAMS.clear()


def _layout(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


def _program(params, model_cfg, cfg, share_prefill, sharding, args):
  key = (model_cfg, cfg, share_prefill, sharding, _layout(params), _layout(args))
  prog = _PROGRAMS.get(key)
  if prog is None:
    core = jax.jit(lambda p, *a: _generate_core(p, *a, model_cfg=model_cfg, cfg=cfg,
                                                share_prefill=share_prefill, sharding=sharding))
    prog = core.lower(params, *args).compile()
    _PROGRAMS[key] = prog
    _log.info("sampling: compiled program #%d (prompts=%d x samples=%d, prompt bucket=%d, "
              "max_new_tokens=%d)", len(_PROGRAMS), args[0].shape[0], cfg.num_samples,
              args[0].shape[1], cfg.max_new_tokens)
  return prog


# ----------------------------------------------------------------------------- public API


def bucket_for(length: int, cfg: SamplingConfig) -> int:
  """Smallest configured bucket >= length."""
  for b in cfg.prompt_buckets:
    if b >= length:
      return b
  raise ValueError(f"prompt of {length} tokens is longer than the largest prompt bucket "
                   f"{cfg.prompt_buckets[-1]} (SamplingConfig.prompt_buckets={cfg.prompt_buckets})")


def left_pad(tokens_BxT, mask_BxT, cfg: SamplingConfig):
  """Move each row's real tokens to the right end of a bucket-wide array (host, numpy)."""
  tokens_BxT, mask_BxT = np.asarray(tokens_BxT), np.asarray(mask_BxT).astype(bool)
  if tokens_BxT.ndim != 2 or tokens_BxT.shape != mask_BxT.shape:
    raise ValueError(f"prompt tokens {tokens_BxT.shape} and mask {mask_BxT.shape} must be the same [B, T]")
  if tokens_BxT.shape[0] == 0:
    raise ValueError("no prompts: batch size is 0")
  lengths_B = mask_BxT.sum(axis=1)
  if lengths_B.min() == 0:
    raise ValueError(f"prompt rows {np.flatnonzero(lengths_B == 0).tolist()} have no tokens")
  P = bucket_for(int(lengths_B.max()), cfg)
  order_BxT = np.argsort(mask_BxT, axis=1, kind="stable")  # pads first, real tokens in order
  tokens_BxT = np.take_along_axis(np.where(mask_BxT, tokens_BxT, cfg.pad_token_id), order_BxT, 1)
  mask_BxT = np.take_along_axis(mask_BxT, order_BxT, 1)
  T = tokens_BxT.shape[1]
  if T >= P:
    return tokens_BxT[:, T - P:].astype(np.int32), mask_BxT[:, T - P:].astype(np.int32)
  fill = ((0, 0), (P - T, 0))
  return (np.pad(tokens_BxT, fill, constant_values=cfg.pad_token_id).astype(np.int32),
          np.pad(mask_BxT, fill).astype(np.int32))


def _divisible(sharding, shape) -> bool:
  try:
    sharding.shard_shape(shape)
    return True
  except ValueError:
    return False


def _check_token_ids(tokens_BxP, vocab_size: int) -> None:
  """Every prompt id (padding included) must index a row of the embedding: an id outside it
  reads no row and gives NaN logits and a sampled token 0, silently (transformers raises)."""
  if isinstance(tokens_BxP, jax.Array):  # multi-host: this process's shards (each row is on some process)
    parts = [(np.asarray(s.data), " in this process's shard") for s in tokens_BxP.addressable_shards]
  else:
    parts = [(np.asarray(tokens_BxP), "")]
  for part, where in parts:
    bad = np.argwhere((part < 0) | (part >= vocab_size))
    if bad.size:
      raise ValueError(f"prompt row {int(bad[0][0])}{where} holds token id {int(part[tuple(bad[0])])}, outside "
                       f"the model's vocab_size={vocab_size}: the tokenizer does not match the model "
                       "(its embedding has no row for this token)")


def decode_model_config(model_cfg: ModelConfig, platform: str | None = None) -> ModelConfig:
  """The model config the sampler traces: with scan_unroll left on auto (0), on a GPU the layer
  loop of prefill and decode is unrolled in full.

  A decode step is a few hundred small kernels; a scanned layer loop adds a loop (and its
  trip-count check) around them on every step. Measured on an H200 at Qwen2.5-0.5B shapes in
  bf16 (benchmarks/bench_gpu.py, 512 new tokens): 22.9k -> 26.2k tokens/s at batch 64 and
  47.1k -> 54.3k at batch 256, for 12 s of compile instead of 7. The program then grows with
  depth, which is why the training programs keep their scan. On CPU the auto rule stays (an
  unrolled loop only for <= 4 layers). An explicit scan_unroll is kept as given.
  """
  platform = platform or jax.default_backend()
  if model_cfg.scan_unroll == 0 and platform == "gpu":
    return dataclasses.replace(model_cfg, scan_unroll=model_cfg.num_layers)
  return model_cfg


def generate(params, model_cfg: ModelConfig, prompt_tokens_BxP, prompt_mask_BxP, rng,
             cfg: SamplingConfig, *, batch_sharding=None) -> SampleOutput:
  """Sample `cfg.num_samples` completions per prompt; see the module docstring for log-probs.

  Prompts may be padded anywhere (the mask says which tokens are real); they are re-packed to
  the left of the smallest bucket >= the longest prompt. `batch_sharding` (a Sharding of
  [B, ...] arrays, e.g. NamedSharding(mesh, P(("data", "fsdp")))) splits the batch over the
  mesh the params already live on; params are used where they are, never copied.
  """
  if cfg.think_budget:
    raise ValueError("SamplingConfig.think_budget (ScaleRL's forced interruption) runs in the paged engine only: "
                     "set RolloutConfig.engine='paged'")
  for name in ("stop_token_ids", "pad_token_id", "stop_sequences"):
    value = getattr(cfg, name)
    ids = np.asarray([t for q in value for t in q] if name == "stop_sequences" else np.atleast_1d(value))
    if ids.size and ids.max() >= model_cfg.vocab_size:
      raise ValueError(f"SamplingConfig.{name}={getattr(cfg, name)} must be < vocab_size={model_cfg.vocab_size}")
  if isinstance(prompt_tokens_BxP, jax.Array) and not prompt_tokens_BxP.is_fully_addressable:
    # Multi-host: a global array no process can read whole; the caller padded it to a bucket
    # (encode_prompts does) before sharding it, so it goes in as it is.
    if prompt_tokens_BxP.shape[1] not in cfg.prompt_buckets:
      raise ValueError(f"multi-host prompts of length {prompt_tokens_BxP.shape[1]} must be padded to a bucket "
                       f"{cfg.prompt_buckets} before they are sharded (use encode_prompts)")
    tokens_BxP, mask_BxP = prompt_tokens_BxP, prompt_mask_BxP
  else:
    tokens_BxP, mask_BxP = left_pad(prompt_tokens_BxP, prompt_mask_BxP, cfg)
  _check_token_ids(tokens_BxP, model_cfg.vocab_size)
  share_prefill = cfg.num_samples > 1
  if batch_sharding is None:
    tokens_BxP, mask_BxP = jnp.asarray(tokens_BxP), jnp.asarray(mask_BxP)
  else:
    if not isinstance(batch_sharding, NamedSharding):
      raise ValueError(f"batch_sharding must be a jax.sharding.NamedSharding, got {type(batch_sharding)}")
    # Prompts that can't be split over the data axes go in replicated; the repeated batch is split.
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    split = _divisible(batch_sharding, tokens_BxP.shape)
    share_prefill &= split
    tokens_BxP, mask_BxP = (jax.device_put(x, batch_sharding if split else replicated)
                            for x in (tokens_BxP, mask_BxP))
    # Via the host: a key committed to one local device can't be put on a multi-host sharding.
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    raw = np.asarray(jax.device_get(jax.random.key_data(rng) if typed else rng))
    rng = jax.device_put(raw, replicated)
    rng = jax.random.wrap_key_data(rng) if typed else rng
  args = (tokens_BxP, mask_BxP, rng)
  model_cfg = decode_model_config(model_cfg)
  return _program(params, model_cfg, cfg, share_prefill, batch_sharding, args)(params, *args)


# ----------------------------------------------------------------------------- text in / out


def encode_prompts(tokenizer, texts: Sequence[str], cfg: SamplingConfig, apply_chat_template=False,
                   vocab_size: int | None = None):
  """Tokenize texts (optionally through the chat template) -> left-padded int32 (tokens, mask).

  `vocab_size` (the model's): a token id outside it is refused here, naming the text, rather
  than read as a missing embedding row (NaN logits). `generate` checks the ids again.
  """
  if isinstance(texts, str):
    raise ValueError("encode_prompts: texts must be a list of strings, got a single str")
  texts = list(texts)
  if not texts:
    raise ValueError("encode_prompts: no prompts to encode (an empty prompt list; is a split empty?)")
  ids = tokenize_prompts(tokenizer, texts, apply_chat_template)
  for i, x in enumerate(ids):
    if not x:
      raise ValueError(f"encode_prompts: text {i} ({texts[i]!r:.60}) encodes to zero tokens "
                       "(does the tokenizer have its vocabulary files?)")
    if vocab_size is not None and not all(0 <= t < vocab_size for t in x):
      bad = next(t for t in x if not 0 <= t < vocab_size)
      raise ValueError(f"encode_prompts: text {i} ({texts[i]!r:.60}) holds token id {bad}, outside the model's "
                       f"vocab_size={vocab_size}: the tokenizer does not match the model")
  T = max(len(x) for x in ids)
  tokens_BxT = np.full((len(ids), T), cfg.pad_token_id, np.int32)
  mask_BxT = np.zeros((len(ids), T), np.int32)
  for i, x in enumerate(ids):
    tokens_BxT[i, T - len(x):], mask_BxT[i, T - len(x):] = x, 1
  return left_pad(tokens_BxT, mask_BxT, cfg)


def decode_completions(tokenizer, out: SampleOutput, skip_special_tokens=False) -> list[str]:
  """Completion texts, up to but not including the stop token."""
  tokens_BxN = np.asarray(out.tokens_BxN)
  n_B = np.asarray(out.lengths_B) - np.asarray(out.stopped_B).astype(np.int64)
  return [tokenizer.decode(row[:k].tolist(), skip_special_tokens=skip_special_tokens)
          for row, k in zip(tokens_BxN, n_B)]
