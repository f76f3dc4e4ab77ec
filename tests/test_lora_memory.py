"""LoRA's memory, compile only (nothing runs): the update's arguments hold the adapters' optimizer state and a bf16
base instead of f32 params and moments for the whole model, the planner's LoRA rows (scale/memory.py) follow the
same layout and are smaller than full fine-tuning's, and the frozen base the planner and the compiled programs
assume is the one the trainer builds (trainer/parts.reference_params). Figures: docs/benchmarks.md ("LoRA")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from cispo_jax.model import ModelConfig, init_params, lora, param_shapes
from cispo_jax.rl import losses
from cispo_jax.scale import memory
from cispo_jax.scale.compiled import compiled_memory, frozen_base, single_device_mesh, tree_bytes

# bf16 compute over f32 master weights, remat: the setting of a real run, at a size that compiles in seconds.
TINY = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=32, dtype="bfloat16", remat=True, logprob_chunk=64)
RANK = lora.LoraConfig(rank=4)
B, P, N = 2, 16, 64


@pytest.fixture(scope="module")
def update_memory():
  loss = losses.LossConfig(kl_coef=0.05)  # the KL term on: reference log-probs are a batch input either way
  return {name: compiled_memory("update", TINY, single_device_mesh(), batch=B, prompt_len=P, n_completion=N, loss=loss,
                                lora=lc) for name, lc in (("full", None), ("lora", RANK))}


def test_lora_update_arguments_are_the_adapters_state_and_the_bf16_base(update_memory):
  """Full FT's update reads f32 params + two Adam moments of every parameter; LoRA's reads those of the adapters
  alone plus the frozen base in bf16 (the LM head f32): a fraction of it, and exactly that many bytes."""
  full, low = update_memory["full"], update_memory["lora"]
  params = memory.param_count(TINY)
  adapters = lora.count(lora.adapter_shapes(param_shapes(TINY), RANK))
  frozen = tree_bytes(frozen_base(TINY, single_device_mesh()))
  # What the update donates and writes back is the state: f32 params + mu + nu (and a few counters), the adapters'
  # alone under LoRA; the base is an undonated argument beside the batch, which both read alike.
  assert 0 < low.alias - 3 * 4 * adapters == full.alias - 3 * 4 * params < 64
  assert full.argument - full.alias == low.argument - low.alias - frozen > 0  # the batch
  assert frozen < 4 * params
  assert low.argument < 0.3 * full.argument, (low.argument, full.argument)
  assert low.peak < full.peak


def test_cpu_upcast_is_the_f32_copy_of_the_bf16_layers(update_memory):
  """The XLA:CPU artefact the benchmark subtracts: at most one f32 copy of the base's stacked layer weights, and
  none in full fine-tuning (f32 params, cast to bf16 layer by layer)."""
  layers = sum(x.size for x in jax.tree.leaves(param_shapes(TINY)["layers"]))
  assert update_memory["full"].cpu_upcast == 0
  assert 0 < update_memory["lora"].cpu_upcast <= 4 * layers


def test_frozen_base_is_the_trainers():
  """compiled.frozen_base (and the planner's bytes) keep the dtypes trainer/parts.reference_params gives the base."""
  from cispo_jax.trainer.parts import reference_params

  params = init_params(TINY, jax.random.PRNGKey(0))
  real = reference_params(params, TINY, copy=False)
  abstract = frozen_base(TINY, single_device_mesh())
  assert jax.tree.structure(real) == jax.tree.structure(abstract)
  assert [x.dtype for x in jax.tree.leaves(real)] == [x.dtype for x in jax.tree.leaves(abstract)]
  assert {x.dtype for x in jax.tree.leaves(real)} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
  plan = memory.plan_memory(TINY, {}, 1, 64, lora=RANK)
  assert plan.params == tree_bytes(abstract) + 4 * lora.count(lora.adapter_shapes(param_shapes(TINY), RANK))


def test_planner_lora_row_is_smaller_than_full_ft():
  """Qwen2.5-7B on one device: LoRA rank 32's state is the 80.7M adapters' (f32 + Adam), the base bf16 with the
  f32 head, no reference copy; full FT's is 7.6B f32 params + moments (+ the reference copy under a KL)."""
  cfg, lc = memory.QWEN25["7B"], lora.LoraConfig(rank=32)
  full = memory.plan_memory(cfg, {}, 1, 4096, reference=True)
  low = memory.plan_memory(cfg, {}, 1, 4096, lora=lc)
  assert low.trained_param_count == lora.count(lora.adapter_shapes(param_shapes(cfg), lc)) == 80_740_352
  assert full.trained_param_count == full.param_count == low.param_count
  assert low.optimizer == 2 * 4 * low.trained_param_count and low.grads == 4 * low.trained_param_count
  assert low.reference == 0 < full.reference
  head = cfg.vocab_size * cfg.hidden_size  # the (untied) lm_head, kept f32; the embedding (a lookup) in bf16
  assert low.params == 2 * (full.param_count - head) + 4 * head + 4 * low.trained_param_count
  assert low.activations < full.activations  # no f32 gradient accumulator of the frozen LM head
  assert low.peak < full.peak / 5, (low.peak / 2**30, full.peak / 2**30)


def test_planner_lora_activations_near_xla():
  """plan_memory's LoRA activations vs XLA's temp of the LoRA gradient less its f32 copy of the bf16 base (an
  XLA:CPU artefact: compiled.cpu_upcast_bytes), where the planner's formula was fitted (Qwen2.5-0.5B shapes)."""
  cfg, lc, n = memory.QWEN25["0.5B"].replace(num_layers=2), lora.LoraConfig(rank=32), 4096
  x = compiled_memory("loss_grad", cfg, single_device_mesh(), batch=1, prompt_len=128, n_completion=n, lora=lc)
  plan = memory.plan_memory(cfg, {}, 1, 128 + n, completion_len=n, lora=lc).activations
  assert abs(plan / (x.temp - x.cpu_upcast) - 1) <= 0.30, (plan / 2**30, x.temp / 2**30, x.cpu_upcast / 2**30)


def test_memory_table_cli_with_lora(capsys):
  from cispo_jax.sharding.__main__ import MESHES, main

  main(["--lora_rank", "32"])
  out = capsys.readouterr().out
  rows = [ln for ln in out.splitlines() if ln.startswith("| ")]
  assert len(rows) == 1 + 3 * (1 + len(MESHES)) * 2  # header + 3 models x (one device + meshes) x (full, LoRA)
  assert rows[1].startswith("| 0.5B | 1 | - | full FT |") and rows[2].startswith("| 0.5B | 1 | - | LoRA r32 |")
  assert "one 80 GiB device: full FT: 0.5B; LoRA r32: 7B" in out
