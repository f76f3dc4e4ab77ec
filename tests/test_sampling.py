"""Sampler tests: every check compares the KV-cache decode with an independent full forward."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cispo_jax.rollout import sampling
from cispo_jax.model import ModelConfig, forward, init_params, logical_axes
from cispo_jax.rollout.sampling import SamplingConfig, generate

V = 32
BUCKETS = (8, 16, 32)
BASE = dict(prompt_buckets=BUCKETS, max_new_tokens=8)


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, qkv_bias=True)
  params = init_params(cfg, jax.random.PRNGKey(0))
  # x10 weights: logits with std ~1, so greedy margins are wide and the filters bite.
  params = jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, params)
  return cfg, params


@pytest.fixture(scope="module")
def prompts():
  """4 prompts of lengths 3, 7, 5, 10 in a width-12 array, NOT bucket-aligned."""
  rs = np.random.RandomState(0)
  lengths = [3, 7, 5, 10]
  tokens = np.zeros((4, 12), np.int32)
  mask = np.zeros((4, 12), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, 12 - n:] = rs.randint(1, V, n)
    mask[i, 12 - n:] = 1
  return tokens, mask


@pytest.fixture(scope="module")
def full_logits(model):
  cfg, params = model
  return jax.jit(lambda t, m: forward(params, cfg, t, kv_valid_BxS=m)[0])


def full_forward_logps(full_logits, out, temperature):
  """Log-probs of the completion tokens from one forward over prompt + completion."""
  P = out.prompt_tokens_BxP.shape[1]
  tokens = jnp.concatenate([out.prompt_tokens_BxP, out.tokens_BxN], 1)
  mask = jnp.concatenate([out.prompt_mask_BxP, out.mask_BxN], 1)
  logits = full_logits(tokens, mask)[:, P - 1:-1] / temperature
  logps = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), out.tokens_BxN[..., None], -1)[..., 0]
  return np.asarray(logits), np.asarray(logps)


@pytest.fixture(scope="module")
def greedy_out(model, prompts):
  cfg, params = model
  return generate(params, cfg, *prompts, jax.random.PRNGKey(0), SamplingConfig(greedy=True, **BASE))


def test_greedy_equals_stepwise_argmax_of_full_forward(greedy_out, full_logits):
  out = greedy_out
  P, N = out.prompt_tokens_BxP.shape[1], out.tokens_BxN.shape[1]
  assert P == 16  # longest prompt 10 -> bucket 16
  tokens = np.concatenate([out.prompt_tokens_BxP, np.zeros((4, N), np.int32)], 1)
  mask = np.concatenate([out.prompt_mask_BxP, np.zeros((4, N), np.int32)], 1)
  for t in range(N):  # right padding is invisible to earlier positions (causal)
    tokens[:, P + t] = np.argmax(full_logits(tokens, mask)[:, P - 1 + t], -1)
    mask[:, P + t] = 1
  np.testing.assert_array_equal(out.tokens_BxN, tokens[:, P:])
  assert np.all(out.mask_BxN == 1) and not np.any(out.stopped_B)
  np.testing.assert_array_equal(out.lengths_B, N)
  _, logps = full_forward_logps(full_logits, out, 1.0)
  np.testing.assert_allclose(out.logps_BxN, logps, atol=1e-4)


def allowed_set(z, top_k=0, top_p=1.0, min_p=0.0, tol=1e-4):
  """Tokens a filter may emit, from full-forward scaled logits z [V]; `tol` widens every cut."""
  keep = np.ones(V, bool)
  if top_k:
    keep &= z >= np.sort(z)[-top_k] - tol
  if top_p < 1:
    p = np.where(keep, np.exp(z - z.max()), 0)
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    inside = np.zeros(V, bool)
    inside[order[before < top_p + tol]] = True
    keep &= inside
  if min_p:
    p = np.where(keep, np.exp(z - z[keep].max()), 0)
    keep &= p >= min_p * (1 - tol)
  return keep


# Configs are shared with later tests so the compiled programs are too.
FILTERS = [(0.7, dict(top_k=3)), (1.3, dict(top_p=0.5)), (0.9, dict(min_p=0.3)),
           (1.0, dict(top_k=6, top_p=0.8, min_p=0.1))]


def filter_config(temperature, filt, **kw):
  return SamplingConfig(temperature=temperature, num_samples=16, **filt, **BASE, **kw)


@pytest.mark.parametrize("temperature,filt", FILTERS)
def test_filters_emit_only_allowed_tokens_and_logps_match(model, prompts, full_logits, temperature, filt):
  cfg, params = model
  outside, shrunk, emitted = 0, 0, set()
  for seed in range(2):  # 2 x 64 rows x 8 tokens = 1024 draws
    out = generate(params, cfg, *prompts, jax.random.PRNGKey(seed), filter_config(temperature, filt))
    logits, logps = full_forward_logps(full_logits, out, temperature)
    # Log-probs are of the unfiltered temperature-scaled distribution.
    np.testing.assert_allclose(out.logps_BxN, logps, atol=1e-4)
    toks = np.asarray(out.tokens_BxN)
    for b in range(toks.shape[0]):
      for t in range(toks.shape[1]):
        keep = allowed_set(logits[b, t], **filt)
        outside += not keep[toks[b, t]]
        shrunk += keep.sum() < V // 2
        emitted.add(int(toks[b, t]))
  assert outside == 0
  assert shrunk > 900  # the filter really restricted the choice
  assert len(emitted) > 3  # and sampling is not degenerate


def test_rows_stop_independently_and_samples_are_grouped(model, prompts, greedy_out):
  cfg, params = model
  free = np.asarray(greedy_out.tokens_BxN)
  stops = (int(free[0, 2]), int(free[1, 5]))  # two stop ids, found at different steps
  # Greedy x 2 samples: both copies of a prompt (one shared prefill) must equal the n=1 run.
  out = jax.device_get(generate(params, cfg, *prompts, jax.random.PRNGKey(0), SamplingConfig(
      greedy=True, stop_token_ids=stops, pad_token_id=31, num_samples=2, **BASE)))
  pm = np.repeat(greedy_out.prompt_mask_BxP, 2, 0)
  np.testing.assert_array_equal(out.prompt_mask_BxP, pm)
  np.testing.assert_array_equal(out.prompt_tokens_BxP,  # left padding with this config's pad id
                                np.where(pm, np.repeat(greedy_out.prompt_tokens_BxP, 2, 0), 31))
  N = free.shape[1]
  for r in range(8):
    b = r // 2
    hits = np.flatnonzero(np.isin(free[b], stops))
    n = hits[0] + 1 if hits.size else N
    assert out.lengths_B[r] == n and bool(out.stopped_B[r]) == bool(hits.size)
    np.testing.assert_array_equal(out.tokens_BxN[r, :n], free[b, :n])
    np.testing.assert_array_equal(out.tokens_BxN[r, n:], 31)
    np.testing.assert_array_equal(out.mask_BxN[r], np.arange(N) < n)
    np.testing.assert_allclose(out.logps_BxN[r, :n], greedy_out.logps_BxN[b, :n], atol=1e-6)
    np.testing.assert_array_equal(out.logps_BxN[r, n:], 0.0)
  assert out.lengths_B[0] <= 3 and out.lengths_B[2] <= 6 and len(set(out.lengths_B.tolist())) > 1


def test_sampled_rows_stop_invariants(model, prompts, full_logits):
  cfg, params = model
  sc = SamplingConfig(temperature=1.5, num_samples=8, stop_token_ids=(1, 2, 3, 4), pad_token_id=0,
                      prompt_buckets=BUCKETS, max_new_tokens=12)
  out = jax.device_get(generate(params, cfg, *prompts, jax.random.PRNGKey(3), sc))
  is_stop = np.isin(out.tokens_BxN, (1, 2, 3, 4)) & (out.mask_BxN == 1)
  np.testing.assert_array_equal(out.lengths_B, out.mask_BxN.sum(1))
  np.testing.assert_array_equal(out.stopped_B, is_stop.any(1))
  for b in range(out.tokens_BxN.shape[0]):
    n = out.lengths_B[b]
    assert np.all(out.mask_BxN[b, :n] == 1) and np.all(out.tokens_BxN[b, n:] == 0)
    assert not is_stop[b, :n - 1].any()  # only the last kept token may be a stop
  assert out.stopped_B.any() and not out.stopped_B.all()
  assert len(set(out.lengths_B.tolist())) > 2
  _, logps = full_forward_logps(full_logits, out, 1.5)
  m = out.mask_BxN == 1
  assert np.abs(out.logps_BxN - logps)[m].max() <= 1e-4 and np.all(out.logps_BxN[~m] == 0)


def test_rng_determinism(model, prompts):
  cfg, params = model
  sc = filter_config(*FILTERS[-1])
  a, b, c = (generate(params, cfg, *prompts, jax.random.PRNGKey(s), sc) for s in (7, 7, 8))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert np.mean(np.asarray(a.tokens_BxN) != np.asarray(c.tokens_BxN)) > 0.3
  assert np.any(np.asarray(a.tokens_BxN[0]) != np.asarray(a.tokens_BxN[1]))  # samples differ


def test_too_long_prompt_is_refused(model):
  cfg, params = model
  tokens = np.ones((2, 40), np.int32)
  with pytest.raises(ValueError, match=r"40 tokens is longer than the largest prompt bucket 32"):
    generate(params, cfg, tokens, np.ones_like(tokens), jax.random.PRNGKey(0),
             SamplingConfig(**BASE))


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", 0.0),
                                         ("top_k", -1), ("top_p", 0.0), ("min_p", 1.5),
                                         ("num_samples", 0), ("prompt_buckets", (16, 8))])
def test_config_validation_names_field(field, value):
  with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
    SamplingConfig(**{field: value})


def test_compile_count_bounded_over_varied_prompt_lengths(model, caplog):
  cfg, params = model
  sc = SamplingConfig(greedy=True, **BASE)  # bucket 16 may already exist (greedy_out)
  before = sampling.compile_count()
  rs = np.random.RandomState(1)
  lengths = (2, 5, 8, 9, 13, 16, 17, 25, 31, 3, 11, 32)
  with caplog.at_level(logging.INFO, logger=sampling.__name__):
    for n in lengths + lengths:
      tokens = rs.randint(1, V, (4, n)).astype(np.int32)
      out = generate(params, cfg, tokens, np.ones_like(tokens), jax.random.PRNGKey(0), sc)
      assert out.prompt_tokens_BxP.shape[1] == next(b for b in BUCKETS if b >= n)
  new = sampling.compile_count() - before
  assert 2 <= new <= len(BUCKETS)  # one program per bucket, whatever the lengths
  assert sum("compiled program" in r.getMessage() for r in caplog.records) == new


def test_batch_sharding_matches_single_device(model, prompts):
  cfg, params = model
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  rules = {"embed": "fsdp", "mlp": "data"}
  specs = jax.tree.map(lambda s: PartitionSpec(*(rules.get(a) for a in s)), logical_axes(cfg),
                       is_leaf=lambda s: isinstance(s, PartitionSpec))
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
  batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  tokens8 = np.concatenate([prompts[0], prompts[0][::-1]])
  mask8 = np.concatenate([prompts[1], prompts[1][::-1]])
  # 4 prompts x 16 samples: prompts enter replicated (4 rows can't split 8 ways), then the
  # 64 rows are split; 8 prompts x 16: split on entry, prefill shared.
  sc = filter_config(*FILTERS[-1])
  for tok, msk in ((prompts[0], prompts[1]), (tokens8, mask8)):
    ref = generate(params, cfg, tok, msk, jax.random.PRNGKey(5), sc)
    out = generate(sharded, cfg, tok, msk, jax.random.PRNGKey(5), sc, batch_sharding=batch)
    assert out.tokens_BxN.sharding.is_equivalent_to(batch, 2)
    _assert_same_samples_up_to_rounding(out, ref)


def _assert_same_samples_up_to_rounding(out, ref, max_diverged=2):
  """Sharded matmuls sum in another order, so the logits differ by f32 rounding (seen: 4e-5 in the
  log-probs after 8 decode steps). Rarely that flips a token at a filter's edge (top-p / min-p cut
  or a near-tie; seen on another CPU: 1 row of 64), and the row differs from there on. So: every
  row equals the reference up to its first differing token, at most `max_diverged` rows differ at
  all (a wrong key or row order would change nearly every row), and the log-probs agree on the
  common prefix."""
  got, want = np.asarray(out.tokens_BxN), np.asarray(ref.tokens_BxN)
  differs = got != want
  first = np.where(differs.any(1), differs.argmax(1), got.shape[1])  # first differing position per row
  assert (differs.any(1)).sum() <= max_diverged, np.flatnonzero(differs.any(1))
  common = np.arange(got.shape[1])[None, :] < first[:, None]
  np.testing.assert_allclose(np.where(common, out.logps_BxN, 0), np.where(common, ref.logps_BxN, 0), atol=1e-4)


def test_text_helpers_roundtrip():
  from cispo_jax.model.tiny import SIMPLE_CHAT_TEMPLATE, build_char_tokenizer

  tok = build_char_tokenizer(chat_template=SIMPLE_CHAT_TEMPLATE)
  sc = SamplingConfig(prompt_buckets=(4, 32), pad_token_id=tok.pad_token_id)
  tokens, mask = sampling.encode_prompts(tok, ["ab", "hello world"], sc)
  assert tokens.shape == (2, 32) and mask[0].sum() == 2 and mask[0, -2:].all()  # left padded
  assert [tok.decode(t[m == 1]) for t, m in zip(tokens, mask)] == ["ab", "hello world"]
  tokens, mask = sampling.encode_prompts(tok, ["ab"], sc, apply_chat_template=True)
  assert tok.decode(tokens[0][mask[0] == 1]) == "user: ab\nassistant: "
  with pytest.raises(ValueError, match="chat_template"):
    sampling.encode_prompts(build_char_tokenizer(), ["ab"], sc, apply_chat_template=True)
  with pytest.raises(ValueError, match="largest prompt bucket 32"):
    sampling.encode_prompts(tok, ["x" * 33], sc)

  eos, pad = tok.eos_token_id, tok.pad_token_id
  ids = lambda s: tok(s)["input_ids"]
  rows = [ids("hi") + [eos] + [pad] * 3, ids("4+5=9?")]
  out = sampling.SampleOutput(None, None, np.array(rows), None, None, np.array([3, 6]),
                              np.array([True, False]))
  assert sampling.decode_completions(tok, out) == ["hi", "4+5=9?"]


def test_decode_unrolled_on_gpu_samples_the_same(model, prompts, greedy_out):
  """The GPU rule (layer loop unrolled in full) picks the same tokens as a scanned layer loop."""
  import dataclasses
  cfg, params = model
  scanned = dataclasses.replace(cfg, scan_unroll=1)
  assert scanned.layers_per_scan_step == 1
  gpu = sampling.decode_model_config(dataclasses.replace(cfg, remat=True), "gpu")
  assert gpu.layers_per_scan_step == cfg.num_layers
  assert sampling.decode_model_config(scanned, "gpu") is scanned  # an explicit choice stays
  assert sampling.decode_model_config(cfg, "cpu") is cfg
  a, b = (generate(params, c, *prompts, jax.random.PRNGKey(0), SamplingConfig(greedy=True, **BASE))
          for c in (scanned, gpu))
  np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
  np.testing.assert_array_equal(a.tokens_BxN, greedy_out.tokens_BxN)
  np.testing.assert_allclose(a.logps_BxN, b.logps_BxN, atol=1e-5)


def _exact_top_p(x, top_p):
  """The filter by a full sort (the definition): the shortest prefix by logit whose mass reaches top_p."""
  s = -np.sort(-x, axis=-1)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  before = np.cumsum(p, -1) - p
  cut = np.where(before < top_p, s, np.inf).min(-1, keepdims=True)
  return x >= cut, np.abs(before - top_p).min(-1)


@pytest.mark.parametrize("top_k,top_p,scale", [(0, 0.9, 6.0), (0, 0.99, 0.01), (50, 0.8, 1.0), (0, 0.5, 8.0)])
def test_top_p_from_candidates_keeps_the_exact_set(top_k, top_p, scale):
  """Top-p searches the top candidates (a partial top-k), not a sort of the vocabulary; flat rows (scale 0.01:
  the best 256 of 4096 hold far less than 0.99) fall back to the full sort. Either way the kept set is the
  full sort's, except in a row whose cut sits within float rounding of a prefix mass (a tie)."""
  from cispo_jax.rollout.filters import TOP_P_CANDIDATES, filter_logits

  rs = np.random.RandomState(int(top_p * 100) + top_k)
  x = (rs.standard_normal((16, 4096)) * scale).astype(np.float32)
  cfg = SamplingConfig(top_k=top_k, top_p=top_p)
  got = np.asarray(filter_logits(jnp.asarray(x), cfg)) > -1e29
  ref_x = x
  if top_k:
    ref_x = np.where(x >= np.sort(x, -1)[:, -top_k:-top_k + 1], x, -np.inf)
  want, margin = _exact_top_p(ref_x, top_p)
  clear = margin > 1e-5  # rows whose cut is not a rounding tie
  assert clear.sum() >= 14
  np.testing.assert_array_equal(got[clear], want[clear])
  kept = want.sum(-1)
  if scale == 0.01:
    assert kept.min() > TOP_P_CANDIDATES  # the fallback really ran
  else:
    assert 1 <= kept.max() <= (top_k or TOP_P_CANDIDATES)
