"""LoRA policies: adapters on a frozen base that is also the KL reference (model/lora.py, trainer/adapters.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cispo_jax import data
from cispo_jax.model import forward, lora
from cispo_jax.model.tiny import build_char_tokenizer, make_tiny_model_dir
from cispo_jax.rl import losses
from cispo_jax.rl.optim import OptimConfig
from cispo_jax.runtime.metrics import read_metrics
from cispo_jax.sharding import MeshConfig
from cispo_jax.trainer import Trainer
from test_trainer import ONE_DEVICE, TASK_WITH_SIGNAL, _comparable, _host, _rl

TOKENS = jnp.array([[3, 5, 7, 9, 11, 2], [4, 4, 6, 8, 10, 12]])


def _trainer(rl, loss=None, lr=1e-2, devices=1, mesh=ONE_DEVICE):
  return Trainer(rl, loss or losses.LossConfig(), OptimConfig(learning_rate=lr), mesh, TASK_WITH_SIGNAL,
                 devices=jax.devices()[:devices])


def _names(tree):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b))))


def test_step_zero_is_the_base_and_the_reference_is_the_base_without_a_copy(model_dir, tmp_path):
  """Logits of base + fresh adapters equal the base's bitwise; the KL reference is the base's own buffers;
  one update at step 0 (one epoch, one minibatch) has ratio exactly 1 and KL exactly 0."""
  rl = _rl(model_dir, tmp_path, rank=4, total_steps=1, num_iterations=1, num_minibatches=1)
  trainer = _trainer(rl, losses.LossConfig(kl_coef=0.05))
  cfg = trainer.model_cfg
  assert cfg.lora_scaling == 32.0 / 4
  np.testing.assert_array_equal(forward(trainer.policy_params, cfg, TOKENS)[0], forward(trainer.frozen, cfg, TOKENS)[0])
  assert trainer.ref_params is trainer.frozen  # adapters off = the base: no second copy of the model
  assert all(n.endswith(("_lora_a']", "_lora_b']")) for n in _names(trainer.state.params))
  trainer.run()
  trainer.close()
  (row,) = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
  assert row["train/kl_ref"] == 0.0 and row["train/ratio_max"] == row["train/ratio_min"] == 1.0, row


@pytest.mark.parametrize("loss_type", sorted(losses.LOSS_TYPES))
def test_every_loss_trains_the_adapters_alone(model_dir, tmp_path, loss_type):
  """The trained tree and the optimizer state hold the adapters alone; after the updates the base is bitwise
  what was loaded and every adapter B has moved off zero."""
  extra = {"max_completion_length": 4} if loss_type == "dr_grpo" else {}
  rl = _rl(model_dir, tmp_path, rank=2, total_steps=1)
  trainer = _trainer(rl, losses.LossConfig(loss_type=loss_type, kl_coef=0.01, **extra))
  base, adapters = _host(trainer.frozen), _host(trainer.state.params)
  shapes = {x.shape for x in jax.tree.leaves(adapters)}
  moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim]
  assert moments and all(x.shape in shapes for x in moments)  # no optimizer state for the base
  assert lora.count(moments) == 2 * lora.count(adapters)  # Adam's two moments of each adapter, nothing else
  trainer.run()
  trainer.close()
  assert _equal(trainer.frozen, base)
  for name, b in jax.tree_util.tree_leaves_with_path(_host(trainer.state.params)):
    if jax.tree_util.keystr(name).endswith("_lora_b']"):
      assert np.abs(b).max() > 0, jax.tree_util.keystr(name)
  assert all(np.isfinite(r["train/loss"]) for r in read_metrics(str(tmp_path)) if "train/loss" in r)


def test_lora_resume_is_exact_and_a_different_base_is_refused(model_dir, tmp_path):
  kw = dict(rank=4, total_steps=4, eval_every=2, save_every=2, num_iterations=1, num_minibatches=1)
  full = _trainer(_rl(model_dir, tmp_path / "full", **kw), losses.LossConfig(kl_coef=0.05))
  full.run()
  part = _trainer(_rl(model_dir, tmp_path / "part", **kw), losses.LossConfig(kl_coef=0.05))
  part.run(stop_after=2)
  part.close()
  resumed = _trainer(_rl(model_dir, tmp_path / "part", **kw), losses.LossConfig(kl_coef=0.05))
  assert resumed.iteration == 2
  resumed.run()
  full.close()
  resumed.close()
  assert _equal(full.state, resumed.state)  # adapters, Adam moments, step, rng: bitwise on CPU
  assert _comparable(read_metrics(str(tmp_path / "full"))) == _comparable(read_metrics(str(tmp_path / "part")))

  other = make_tiny_model_dir(str(tmp_path / "other_base"), "qwen2", tokenizer=build_char_tokenizer(data.ALPHABET),
                              hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=7)
  kw["total_steps"] = 6
  with pytest.raises(ValueError, match=r"adapters trained on the base .*fingerprint [0-9a-f]{16}.*but this run's "
                                       r"base is .*other_base \(fingerprint [0-9a-f]{16}\)"):
    _trainer(_rl(other, tmp_path / "part", **kw), losses.LossConfig(kl_coef=0.05))


def test_weight_sync_moves_only_the_adapters(model_dir, tmp_path):
  """Stale rollouts (the engine keeps its own versions): each published version copies the adapters alone;
  the engine samples with the trainer's base buffers themselves. On a rollout sub-mesh the base is
  transferred once, then only the adapters."""
  trainer = _trainer(_rl(model_dir, tmp_path / "stale", rank=4, total_steps=3, max_staleness=1))
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.state.params))
  trainer.run()
  assert trainer.engine.sync_bytes == adapter_bytes
  assert all(a is b for a, b in zip(jax.tree.leaves(trainer.engine._base), jax.tree.leaves(trainer.frozen)))
  trainer.close()

  rl = _rl(model_dir, tmp_path / "split", rank=4, total_steps=3, max_staleness=1, rollout_devices=2,
           prompts_per_step=4, behaviour_logps="sampler")
  trainer = _trainer(rl, devices=4, mesh=MeshConfig(data=1, fsdp=2, tensor=1))
  placed, load = [], trainer.engine.load_weights

  def record(params, version):
    load(params, version)
    placed.append((trainer.engine.sync_bytes, id(jax.tree.leaves(trainer.engine._base)[0])))

  trainer.engine.load_weights = record
  trainer.run()
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.frozen))
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.state.params))
  assert placed[0][0] == base_bytes + adapter_bytes and all(n == adapter_bytes for n, _ in placed[1:]), placed
  assert len({b for _, b in placed}) == 1  # one copy of the base on the rollout devices, for every version
  engine_base = jax.tree.leaves(trainer.engine._base)[0]
  assert set(engine_base.sharding.device_set) <= set(trainer.engine.mesh.devices.flat)
  trainer.close()


def _perturbed(adapters, scale=0.3):
  keys = iter(jax.random.split(jax.random.PRNGKey(5), len(jax.tree.leaves(adapters))))
  return jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape, x.dtype), adapters)


def test_rollouts_with_adapters_merged_unmerged_and_paged_agree(model_dir, tmp_path):
  """The same trained-looking adapters (B != 0) sampled greedily: the static engine unmerged, merged once
  (rollout_merged) and the paged engine give the same tokens; merged logits are the unmerged ones to f32
  rounding."""
  from cispo_jax.rollout.config import sampling_config

  outs = {}
  for name, kw in {"unmerged": {}, "merged": {"rollout_merged": True},
                   "paged": {"engine": "paged", "paged_slots": 8}}.items():
    trainer = _trainer(_rl(model_dir, tmp_path / name, rank=4, total_steps=1, max_new_tokens=8, **kw))
    policy = lora.combine(trainer.frozen, _perturbed(trainer.state.params))
    examples = trainer.eval_sets["heldout"][:8]
    cfg = sampling_config(trainer.rl.rollout, trainer.tokenizer, trainer.stops, greedy=True, n=1)
    trainer.engine.load_weights(policy, 99)
    out = trainer.engine.generate(examples, jax.random.PRNGKey(0), cfg, version=99, host=True)
    outs[name] = (np.asarray(out.tokens_BxN) * np.asarray(out.mask_BxN), trainer.engine.weights(99))
    trainer.close()
  np.testing.assert_array_equal(outs["unmerged"][0], outs["merged"][0])
  np.testing.assert_array_equal(outs["unmerged"][0], outs["paged"][0])
  assert outs["unmerged"][0].any()
  merged_tree = outs["merged"][1]
  assert lora.split(merged_tree)[1] is None  # a plain model: W + scaling * A @ B
  cfg = trainer.model_cfg
  np.testing.assert_allclose(forward(merged_tree, cfg, TOKENS)[0], forward(outs["unmerged"][1], cfg, TOKENS)[0],
                             rtol=0, atol=2e-5)


def test_nonfinite_guard_skips_adapter_steps(model_dir, tmp_path):
  """A step size that overflows the adapters' product: the steps with a non-finite loss are skipped, the
  adapters stay finite and the base is untouched."""
  trainer = _trainer(_rl(model_dir, tmp_path, rank=4, total_steps=4, max_nonfinite_skips=8), lr=1e30)
  base = _host(trainer.frozen)
  trainer.run()
  trainer.close()
  assert sum(r.get("train/skipped_nonfinite") or 0 for r in read_metrics(str(tmp_path))) > 0
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_host(trainer.state.params)))
  assert _equal(trainer.frozen, base)


def test_lora_config_is_checked():
  with pytest.raises(ValueError, match="LoraConfig.rank=-1"):
    lora.LoraConfig(rank=-1)
  with pytest.raises(ValueError, match="LoraConfig.targets"):
    lora.LoraConfig(rank=2, targets=("q", "attn"))
  with pytest.raises(ValueError, match="LoraConfig.export"):
    lora.LoraConfig(rank=2, export="gguf")
  assert lora.LoraConfig(rank=16, alpha=32, rslora=True).scaling == 8.0
  assert lora.LoraConfig(rank=16, alpha=32).scaling == 2.0


def test_final_export_is_a_peft_directory_and_the_merged_model(model_dir, tmp_path):
  """export='both': final_model/ holds the trained adapters (bitwise, with the base's path and fingerprint) as a
  PEFT directory, and final_model/merged the merged HF model, whose logits are the policy's."""
  from cispo_jax.model import hf_io

  trainer = _trainer(_rl(model_dir, tmp_path, rank=4, total_steps=1, export_final=True, export="both"))
  trainer.run()
  trainer.close()
  final = str(tmp_path / "final_model")
  assert hf_io.is_peft_dir(final)
  adapters, lcfg, base_dir, fingerprint = hf_io.load_peft(final, trainer.model_cfg)
  assert _equal(adapters, trainer.state.params)
  assert (lcfg.rank, lcfg.alpha, lcfg.targets) == (4, 32.0, lora.LAYER_TARGETS)
  assert (base_dir, fingerprint) == (str(model_dir), trainer.st.base_fingerprint)
  cfg, merged = hf_io.load_model(final + "/merged")
  np.testing.assert_allclose(forward(merged, cfg, TOKENS)[0], forward(trainer.policy_params, trainer.model_cfg,
                                                                       TOKENS)[0], rtol=0, atol=2e-5)
