"""The paged engine (rollout/paged/): greedy rows equal the static sampler's and transformers' generate;
the same tokens whatever the slots, the arrival order, the page size or the pool (waits and preemptions);
every page freed; per-request budgets; stop tokens and stop sequences; refused requests."""

import dataclasses

import jax
import numpy as np
import pytest

from cispo_jax.model import ModelConfig, init_params
from cispo_jax.model.hf_io import load_model
from cispo_jax.model.tiny import make_tiny_model_dir
from cispo_jax.rollout.paged import PagedConfig, PagePool, generate_paged
from cispo_jax.rollout.paged.pool import PoolExhausted
from cispo_jax.rollout.sampling import SamplingConfig, generate

V = 32
LENGTHS = (3, 7, 5, 10, 1, 17)  # a one-token prompt, and one longer than two pages of 8


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, qkv_bias=True, qk_norm=True)
  params = init_params(cfg, jax.random.PRNGKey(0))
  # x10 weights: logits with std ~1, so greedy margins are wide and the filters bite (as test_sampling.py)
  return cfg, jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, params)


@pytest.fixture(scope="module")
def prompts():
  rs = np.random.RandomState(0)
  return [rs.randint(1, V, n).tolist() for n in LENGTHS]


def _padded(prompts):
  W = max(map(len, prompts))
  tok, mask = np.zeros((len(prompts), W), np.int32), np.zeros((len(prompts), W), np.int32)
  for i, p in enumerate(prompts):
    tok[i, W - len(p):], mask[i, W - len(p):] = p, 1
  return tok, mask


GREEDY = SamplingConfig(greedy=True, max_new_tokens=20, stop_token_ids=(3,), prompt_buckets=(8, 16, 32), num_samples=2)
SAMPLED = SamplingConfig(temperature=1.0, top_k=6, top_p=0.9, max_new_tokens=20, stop_token_ids=(3,),
                         prompt_buckets=(8, 16, 32), num_samples=4)


@pytest.fixture(scope="module")
def sampled_ref(model, prompts):
  cfg, params = model
  return generate_paged(params, cfg, prompts, jax.random.PRNGKey(7), SAMPLED, PagedConfig(num_slots=64, page_size=4))


# the last two prefill the prompts of 7, 10 and 17 tokens in chunks of 4 and 5, between decode bursts
@pytest.mark.parametrize("slots,page_size,k,chunk", [(64, 16, 8, 512), (4, 4, 3, 4), (3, 2, 1, 5)])
def test_greedy_rows_equal_the_static_sampler(model, prompts, slots, page_size, k, chunk):
  cfg, params = model
  ref = generate(params, cfg, *_padded(prompts), jax.random.PRNGKey(5), GREEDY)
  out, stats = generate_paged(params, cfg, prompts, jax.random.PRNGKey(5), GREEDY,
                              PagedConfig(num_slots=slots, page_size=page_size, steps_per_sync=k, prefill_chunk=chunk))
  assert 0 < np.asarray(ref.stopped_B).mean() < 1  # rows end on the stop token and on the budget
  for name in ("tokens_BxN", "mask_BxN", "lengths_B", "stopped_B", "prompt_tokens_BxP", "prompt_mask_BxP"):
    np.testing.assert_array_equal(getattr(out, name), np.asarray(getattr(ref, name)), err_msg=name)
  np.testing.assert_allclose(out.logps_BxN, np.asarray(ref.logps_BxN), atol=2e-5)
  assert stats["pages_all_freed"] and stats["useful_row_steps"] == int(np.asarray(ref.lengths_B).sum())
  assert (stats["prefill_chunk_calls"] >= 3) == (chunk < 16)  # the 17-token prompt takes >= 3 chunks


def test_greedy_rows_equal_transformers_generate(tmp_path):
  torch = pytest.importorskip("torch", reason="torch (test-only dependency) is needed for parity tests")
  import transformers

  path = make_tiny_model_dir(str(tmp_path / "m"), "qwen3", hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, seed=4)
  cfg, params = load_model(path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                         local_files_only=True)
  rs = np.random.RandomState(2)
  prompts = [rs.randint(3, cfg.vocab_size, n).tolist() for n in (4, 9, 13)]
  sc = SamplingConfig(greedy=True, max_new_tokens=12, stop_token_ids=(), prompt_buckets=(16,), num_samples=1)
  out, _ = generate_paged(params, cfg, prompts, jax.random.PRNGKey(0), sc, PagedConfig(num_slots=2, page_size=4))
  for i, p in enumerate(prompts):
    with torch.no_grad():
      want = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                         max_new_tokens=12, min_new_tokens=12, pad_token_id=0)[0, len(p):].tolist()
    assert out.tokens_BxN[i].tolist() == want, i


def test_the_same_tokens_in_4_slots_or_64_in_any_order(model, prompts, sampled_ref):
  """Each row's randomness is keyed by (rollout key, prompt, sample, position), not by its slot or step. Here
  attention also reads the pages a block of 8 positions at a time (online softmax) rather than at once."""
  cfg, params = model
  ref, _ = sampled_ref
  order = np.random.RandomState(1).permutation(len(prompts) * SAMPLED.num_samples).tolist()
  out, stats = generate_paged(params, cfg, prompts, jax.random.PRNGKey(7), SAMPLED,
                              PagedConfig(num_slots=4, page_size=8, steps_per_sync=5, attention_block=8), order=order)
  np.testing.assert_array_equal(out.tokens_BxN, ref.tokens_BxN)
  np.testing.assert_allclose(out.logps_BxN, ref.logps_BxN, atol=1e-4)
  assert len({tuple(r) for r in ref.tokens_BxN[:4]}) > 1  # the samples of a prompt differ
  assert stats["pages_all_freed"] and stats["preemptions"] == 0
  other, _ = generate_paged(params, cfg, prompts, jax.random.PRNGKey(8), SAMPLED, PagedConfig(num_slots=64, page_size=4))
  assert not np.array_equal(other.tokens_BxN, ref.tokens_BxN)  # and the rollout key matters


def test_a_full_pool_waits_and_preempts_and_gives_the_same_tokens(model, prompts, sampled_ref):
  cfg, params = model
  ref, _ = sampled_ref
  order = np.random.RandomState(3).permutation(len(prompts) * SAMPLED.num_samples).tolist()
  out, stats = generate_paged(params, cfg, prompts, jax.random.PRNGKey(7), SAMPLED,
                              PagedConfig(num_slots=8, page_size=4, num_pages=16, steps_per_sync=4, prefill_chunk=6),
                              order=order)
  np.testing.assert_array_equal(out.tokens_BxN, ref.tokens_BxN)
  np.testing.assert_array_equal(out.stopped_B, ref.stopped_B)
  assert stats["preemptions"] > 0 and stats["peak_used"] <= 15  # 15 pages besides the scratch page
  assert stats["pages_all_freed"] and stats["allocated"] == stats["freed"]


def test_a_request_that_can_never_fit_is_refused(model, prompts):
  cfg, params = model
  with pytest.raises(ValueError, match=r"PagedConfig.num_pages=4 cannot hold one request.*max_new_tokens"):
    generate_paged(params, cfg, prompts, jax.random.PRNGKey(0), SAMPLED, PagedConfig(page_size=4, num_pages=4))


def test_per_request_budgets_cut_the_same_rows(model, prompts, sampled_ref):
  cfg, params = model
  ref, _ = sampled_ref
  budgets = [3, 20, 1, 9, 20, 5]
  out, stats = generate_paged(params, cfg, prompts, jax.random.PRNGKey(7), SAMPLED,
                              PagedConfig(num_slots=5, page_size=4), budgets=budgets)
  n = SAMPLED.num_samples
  for r in range(len(prompts) * n):
    b, k = budgets[r // n], int(ref.lengths_B[r])
    want = min(b, k)
    assert out.lengths_B[r] == want and out.tokens_BxN[r, :want].tolist() == ref.tokens_BxN[r, :want].tolist()
    assert out.stopped_B[r] == (ref.stopped_B[r] and k <= b)
  assert stats["useful_row_steps"] == int(out.lengths_B.sum())


def test_stop_sequences_end_rows(model, prompts, sampled_ref):
  cfg, params = model
  ref, _ = sampled_ref
  row = ref.tokens_BxN[0, :int(ref.lengths_B[0])].tolist()
  pair = tuple(row[4:6])
  sc = dataclasses.replace(SAMPLED, stop_sequences=(pair,))
  out, _ = generate_paged(params, cfg, prompts, jax.random.PRNGKey(7), sc, PagedConfig(num_slots=6, page_size=4))
  for r, toks in enumerate(ref.tokens_BxN):
    toks = toks[:int(ref.lengths_B[r])].tolist()
    end = next((i + 2 for i in range(len(toks) - 1) if tuple(toks[i:i + 2]) == pair), None)
    assert out.lengths_B[r] == (end or len(toks)) and bool(out.stopped_B[r]) == (end is not None or ref.stopped_B[r])


def test_forced_interruption_appends_the_interrupt_then_goes_on(model, prompts, sampled_ref):
  """ScaleRL: a row still thinking at think_budget tokens gets the interrupt tokens (forced, marked, with the
  training forward's log-probs), then samples on; a row that closed its thinking (or stopped) earlier is as
  without the option. In any number of slots."""
  from cispo_jax.model.logprobs import completion_logps

  cfg, params = model
  ref, _ = sampled_ref
  budget, row0 = 6, ref.tokens_BxN[0].tolist()
  end = tuple(row0[2:4])  # a think_end some rows produce within the budget
  interrupt = (9,) + end
  sc = dataclasses.replace(SAMPLED, think_budget=budget, interrupt_tokens=interrupt, think_end_tokens=end)
  out, _ = generate_paged(params, cfg, prompts, jax.random.PRNGKey(7), sc, PagedConfig(num_slots=64, page_size=4))
  closed_or_stopped = interrupted = 0
  for r in range(len(ref.tokens_BxN)):
    toks, n = ref.tokens_BxN[r].tolist(), int(ref.lengths_B[r])
    closed = any(tuple(toks[i:i + 2]) == end for i in range(min(n, budget) - 1))
    if closed or n <= budget:
      closed_or_stopped += 1
      assert out.tokens_BxN[r].tolist() == toks and not out.forced_BxN[r].any(), r
      continue
    interrupted += 1
    assert out.tokens_BxN[r, :budget].tolist() == toks[:budget]
    assert tuple(out.tokens_BxN[r, budget:budget + 3]) == interrupt
    np.testing.assert_array_equal(np.flatnonzero(out.forced_BxN[r]), np.arange(budget, budget + 3))
  assert closed_or_stopped and interrupted, (closed_or_stopped, interrupted)
  assert not out.forced_BxN[~out.mask_BxN.astype(bool)].any()
  # the log-probs, forced ones included, are the training forward's
  tokens = np.concatenate([out.prompt_tokens_BxP, out.tokens_BxN], 1)
  valid = np.concatenate([out.prompt_mask_BxP, out.mask_BxN], 1).astype(bool)
  want = np.asarray(completion_logps(params, cfg, tokens, valid, out.tokens_BxN.shape[1], 1.0)[0])
  np.testing.assert_allclose(out.logps_BxN * out.mask_BxN, want * out.mask_BxN, atol=2e-4)
  few, _ = generate_paged(params, cfg, prompts, jax.random.PRNGKey(7), sc,
                          PagedConfig(num_slots=3, page_size=8, steps_per_sync=5))
  np.testing.assert_array_equal(few.tokens_BxN, out.tokens_BxN)
  np.testing.assert_array_equal(few.forced_BxN, out.forced_BxN)
  with pytest.raises(ValueError, match="think_budget.*paged engine only"):
    generate(params, cfg, *_padded(prompts), jax.random.PRNGKey(7), sc)


def test_forced_tokens_stay_in_the_context_not_the_loss():
  from cispo_jax.trainer.batch import gather_rows

  B, P, N = 2, 3, 5
  ones = np.ones((B, N), np.int32)
  forced = np.array([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], np.int32)
  tokens, kv_valid, mask, *_ = gather_rows(np.ones((B, P), np.int32), ones, np.ones((B, P), np.int32), ones,
                                           np.zeros((B, N), np.float32), None, forced, np.arange(B),
                                           np.ones(B), np.ones(B, np.float32), width=N)
  assert np.asarray(kv_valid).all()
  np.testing.assert_array_equal(np.asarray(mask), 1 - forced)


def test_page_pool_accounting():
  pool = PagePool(6, page_size=4)
  assert pool.free == 5 and pool.pages_for(9) == 3
  a = pool.alloc(3)
  assert PagePool.SCRATCH not in a
  pool.share(a[:2])
  with pytest.raises(PoolExhausted):
    pool.alloc(3)
  pool.release(a)
  assert pool.free == 3  # two pages still held by their second holder
  pool.release(a[:2])
  assert pool.all_free() and pool.stats.peak_used == 3 and pool.stats.freed == 3
  with pytest.raises(AssertionError, match="released while free"):
    pool.release(a[:1])


def test_the_trainer_and_its_eval_run_on_the_paged_engine(model_dir, tmp_path):
  """RolloutConfig.engine='paged': the loop, the rewards and the eval read its rollouts as the static sampler's."""
  from cispo_jax.rl import losses
  from cispo_jax.rl.optim import OptimConfig
  from cispo_jax.sharding import MeshConfig
  from cispo_jax.task import TaskConfig
  from cispo_jax.trainer import RLConfig, Trainer

  def trainer(engine, run, **more):
    rl = RLConfig().replace(run_dir=str(tmp_path / run), model_dir=model_dir, total_steps=2, prompts_per_step=8,
                            num_generations=4, max_new_tokens=8, eval_size=8, eval_every=2, export_final=False,
                            engine=engine, paged_slots=6, paged_page_size=4, paged_steps_per_sync=3, **more)
    return Trainer(rl, losses.LossConfig(), OptimConfig(), MeshConfig(fsdp=2), TaskConfig(), devices=jax.devices()[:2])

  paged, static = trainer("paged", "paged"), trainer("static", "static")
  try:
    assert paged.engine.paged is not None and static.engine.paged is None
    assert paged.evaluate()["eval/pass_at_1"] == static.evaluate()["eval/pass_at_1"]  # greedy: the same rows
    summary = paged.run()
    assert summary["iterations"] == 2 and paged.engine.last_stats["pages_all_freed"]
  finally:
    paged.close()
    static.close()
  # a forced interruption's tokens come through the rollout into an update
  forced = trainer("paged", "forced", think_budget=3, interrupt_text="==", think_end_text="=",
                   filter_zero_variance=False)
  try:
    assert forced.train_sampling.interrupt_tokens == tuple(forced.tokenizer.encode("==", add_special_tokens=False))
    out = forced._rollout()[0].out
    assert np.asarray(out.forced_BxN).any()
    assert np.isfinite(forced.step()["train/loss"])
  finally:
    forced.close()
