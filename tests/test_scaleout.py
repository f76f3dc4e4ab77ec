"""The RL loop on device meshes and across real processes gives what one device gives."""

import jax
import numpy as np
import pytest

from cispo_jax import data
from cispo_jax.rl import losses
from cispo_jax.model.tiny import build_char_tokenizer, make_tiny_model_dir
from cispo_jax.rl.optim import OptimConfig
from cispo_jax.sharding import MeshConfig
from cispo_jax.task import TaskConfig
from cispo_jax.trainer import RLConfig, Trainer

# A fine-tuning step size: Adam normalises each update, so at 1e-2 the f32 rounding of tiny gradients
# (which differs with the reduction order of each layout) moves parameters by ~1e-5 relative.
OPTIM = OptimConfig(learning_rate=1e-3)
TASK = TaskConfig(task="arithmetic", task_args={"max_operand": 9}, train_size=64, eval_size=8)
MESHES = {"1": (MeshConfig(data=1, fsdp=1, tensor=1), 1), "data8": (MeshConfig(data=8, fsdp=1, tensor=1), 8),
          "2x2x2": (MeshConfig(data=2, fsdp=2, tensor=2), 8), "fsdp4_tp2": (MeshConfig(data=1, fsdp=4, tensor=2), 8)}


def rl_config(model_dir, run_dir, **kw):
  base = dict(run_dir=str(run_dir), model_dir=model_dir, total_steps=1, prompts_per_step=8, num_generations=4,
              num_iterations=2, num_minibatches=2, max_new_tokens=4, eval_every=1, eval_size=8, save_every=1,
              export_final=False, filter_zero_variance=False)
  base.update(kw)
  return RLConfig().replace(**base)  # flat names: each goes to its section


def make_trainer(model_dir, run_dir, mesh_cfg, n_devices, **kw):
  return Trainer(rl_config(model_dir, run_dir, **kw), losses.LossConfig(), OPTIM, mesh_cfg, TASK,
                 devices=jax.devices()[:n_devices])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  # 8 heads / 4 kv heads / 64 mlp: every sharded dimension divides the 2- and 4-way axes.
  path = str(tmp_path_factory.mktemp("tiny_policy_mesh"))
  return make_tiny_model_dir(path, "qwen2", tokenizer=build_char_tokenizer(data.ALPHABET), hidden_size=32,
                             intermediate_size=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8, seed=1)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.fixture(scope="module")
def one_device_run(model_dir, tmp_path_factory):
  trainer = make_trainer(model_dir, tmp_path_factory.mktemp("run_1"), *MESHES["1"])
  start = _host(trainer.state.params)
  metrics = trainer.step()
  out = (start, _host(trainer.state.params), metrics)
  trainer.close()
  return out


@pytest.mark.parametrize("mesh_name", ["data8", "2x2x2", "fsdp4_tp2"])
def test_one_rl_iteration_matches_single_device(model_dir, tmp_path, one_device_run, mesh_name):
  start, want_params, want = one_device_run
  trainer = make_trainer(model_dir, tmp_path, *MESHES[mesh_name])
  sizes = dict(trainer.mesh.shape)
  # parameters really are laid out by the rules table
  embed = trainer.state.params["embed"]
  q = trainer.state.params["layers"]["attn"]["q_kernel"]  # stacked [L, E, H, D]
  vocab = embed.shape[0]  # 23 characters: not divisible by tensor=2, so the rules fall back to replicating it
  assert vocab % 2 and embed.sharding.shard_shape(embed.shape) == (vocab, 32 // sizes["fsdp"])
  assert q.sharding.shard_shape(q.shape) == (q.shape[0], 32 // sizes["fsdp"], 8 // sizes["tensor"], 8)
  mu = jax.tree.leaves(trainer.state.opt_state)  # Adam moments follow their parameters
  assert any(getattr(x, "sharding", None) == embed.sharding and x.shape == embed.shape for x in mu)
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(_host(trainer.state.params))):
    np.testing.assert_array_equal(a, b)

  got = trainer.step()
  assert got["reward/mean"] == want["reward/mean"]  # same rng -> same samples -> same rewards
  for key in ("train/loss", "train/grad_norm", "train/ratio_mean", "train/approx_kl"):
    assert abs(got[key] - want[key]) <= 1e-5 * max(abs(want[key]), 1e-3), (key, got[key], want[key])
  assert got["logp_gap/sampler_vs_trainer"] < 1e-5  # f32 rounding, different on each layout
  got_params = _host(trainer.state.params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_params), jax.tree.leaves(want_params)):
    assert _rel(a, b) <= 1e-5, (jax.tree_util.keystr(path), _rel(a, b))
  trainer.close()


def test_checkpoint_restores_on_another_mesh(model_dir, tmp_path):
  saver = make_trainer(model_dir, tmp_path, *MESHES["2x2x2"], total_steps=2)
  saver.run(stop_after=1)
  saved = _host(saver.state)
  saver.close()
  restorer = make_trainer(model_dir, tmp_path, *MESHES["1"], total_steps=2)  # resumes from the checkpoint
  assert restorer.iteration == 1
  assert restorer.state.params["embed"].sharding.num_devices == 1
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(_host(restorer.state))):
    np.testing.assert_array_equal(a, b)
  restorer.close()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_two_processes_run_rl_like_one(model_dir, tmp_path, lora_rank):
  """Two real jax.distributed processes (gloo, 2 CPU devices each) run 2 RL iterations (full fine-tuning, and
  LoRA: the adapters, the base's fingerprint gathered across processes, the checkpoint's base record)."""
  import multihost_worker

  multihost_worker.launch(2, lambda pid: [
      "--mesh", "data=2,fsdp=1,tensor=2", "--rl_model_dir", model_dir, "--rl_run_dir", str(tmp_path / "mp"),
      "--out", str(tmp_path / f"p{pid}.npz"), "--rl_lora_rank", str(lora_rank)], timeout_s=400)

  trainer = make_trainer(model_dir, tmp_path / "sp", MeshConfig(data=2, fsdp=1, tensor=2), 4, total_steps=2,
                         rank=lora_rank)
  trainer.run()
  want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(_host(trainer.state.params))}
  trainer.close()
  for pid in range(2):
    with np.load(tmp_path / f"p{pid}.npz", allow_pickle=False) as got:
      assert int(got["iterations"]) == 2
      for k, v in want.items():
        assert _rel(got["param" + k], v) <= 1e-5, (pid, k)
  assert (tmp_path / "mp" / "metrics.jsonl").exists()  # written by process 0 only
