"""One process of a real multi-process JAX run on localhost (CPU, gloo collectives).

test_sharding.py spawns N fresh interpreters of this file; each joins the
coordinator, builds the global mesh, loads only its rows of a deterministic
batch, runs a jitted sharded forward + grad of a tiny model, gathers the results
and writes them to `--out` (npz, arrays only). The same `run_step` runs
in-process on one mesh for the reference, so the two must agree.

    python tests/multihost_worker.py --coordinator 127.0.0.1:PORT --num_processes 2 \
        --process_id 0 --mesh data=1,fsdp=2,tensor=2 --out /tmp/p0.npz

Extend `run_step` (or add a sibling) to run RL iterations across processes.
"""

from __future__ import annotations

import argparse
import os
import sys

# Fresh interpreter: the devices must be configured before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cispo_jax import model, sharding  # noqa: E402

TINY = model.ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, qkv_bias=True, max_position_embeddings=64)
BATCH, LENGTH = 8, 8


def global_batch(seed: int = 0, batch: int = BATCH, length: int = LENGTH):
  """Deterministic left-padded tokens_BxT and mask_BxT, identical in every process."""
  rng = np.random.default_rng(seed)
  tokens_BxT = rng.integers(0, TINY.vocab_size, (batch, length), dtype=np.int32)
  pad_B = rng.integers(0, length // 2, (batch,))
  mask_BxT = np.arange(length)[None, :] >= pad_B[:, None]
  return np.where(mask_BxT, tokens_BxT, 0).astype(np.int32), mask_BxT


def nll_loss(params, cfg, tokens_BxT, mask_BxT):
  """Token-mean next-token NLL over real tokens (float32)."""
  logits_BxTxV, _ = model.forward(params, cfg, tokens_BxT, kv_valid_BxS=mask_BxT)
  logps_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1], axis=-1)
  tgt_logps_BxT = jnp.take_along_axis(logps_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
  valid_BxT = (mask_BxT[:, 1:] & mask_BxT[:, :-1]).astype(jnp.float32)
  return -(tgt_logps_BxT * valid_BxT).sum() / valid_BxT.sum(), logits_BxTxV


def init_params(mesh, cfg=TINY, seed: int = 0):
  return sharding.shard_init(lambda k: model.init_params(cfg, k), mesh, model.logical_axes(cfg),
                             jax.random.PRNGKey(seed))


def run_step(mesh, local_tokens_BxT, local_mask_BxT, cfg=TINY):
  """Sharded forward + grad; returns host numpy arrays of the global results."""
  params = init_params(mesh, cfg)
  p_shard = jax.tree.map(lambda x: x.sharding, params)
  b_shard = sharding.batch_sharding(mesh, 2)
  tokens = sharding.host_local_batch_to_global(local_tokens_BxT, mesh)
  mask = sharding.host_local_batch_to_global(local_mask_BxT, mesh)

  def step(params, tokens_BxT, mask_BxT):
    (loss, logits), grads = jax.value_and_grad(nll_loss, has_aux=True)(params, cfg, tokens_BxT, mask_BxT)
    return loss, logits, grads

  step = jax.jit(step, in_shardings=(p_shard, b_shard, b_shard),
                 out_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh, 3), p_shard))
  loss, logits, grads = step(params, tokens, mask)
  out = {"loss": loss, "logits": logits}
  out.update({f"grad{jax.tree_util.keystr(k)}": g for k, g in jax.tree_util.tree_leaves_with_path(grads)})
  out.update({f"param{jax.tree_util.keystr(k)}": p for k, p in jax.tree_util.tree_leaves_with_path(params)})
  specs = {k: str(v.sharding.spec) for k, v in out.items()}
  # One jitted all-gather for the whole dict (process_allgather would compile one per leaf).
  gathered = jax.jit(lambda t: t, out_shardings=sharding.replicated(mesh))(out)
  return {k: np.asarray(v.addressable_data(0)) for k, v in gathered.items()}, specs


def launch(num_processes: int, args_of, timeout_s: float = 300) -> None:
  """Run this file as `num_processes` fresh interpreters (2 CPU devices each) joined by a coordinator
  on a free localhost port; `args_of(process_id)` gives each one's other flags. Raises with the logs
  if one fails; a hung peer is killed at the timeout so it never hangs CI."""
  import socket
  import subprocess
  from pathlib import Path

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  repo = Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
  procs = [subprocess.Popen([sys.executable, __file__, "--coordinator", f"127.0.0.1:{port}", "--num_processes",
                             str(num_processes), "--process_id", str(pid), *args_of(pid)],
                            env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for pid in range(num_processes)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout_s)[0].decode(errors="replace"))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  if any(p.returncode != 0 for p in procs):
    raise AssertionError("a worker process failed:\n" + "\n".join(log[-3000:] for log in logs))


def parse_mesh(text: str) -> sharding.MeshConfig:
  return sharding.MeshConfig(**{k: int(v) for k, v in (kv.split("=") for kv in text.split(","))})


def run_rl(args):
  """Two RL iterations of the real Trainer on the global mesh (test_scaleout.py's config)."""
  from test_scaleout import OPTIM, TASK, rl_config  # this file's folder is sys.path[0]

  from cispo_jax.rl import losses
  from cispo_jax.trainer import Trainer

  trainer = Trainer(rl_config(args.rl_model_dir, args.rl_run_dir, total_steps=2, rank=args.rl_lora_rank),
                    losses.LossConfig(), OPTIM, parse_mesh(args.mesh), TASK)
  trainer.run()
  params = {f"param{jax.tree_util.keystr(k)}": v for k, v in jax.tree_util.tree_leaves_with_path(trainer.state.params)}
  gathered = jax.jit(lambda t: t, out_shardings=sharding.replicated(trainer.mesh))(params)
  np.savez(args.out, iterations=np.array(trainer.iteration),
           **{k: np.asarray(v.addressable_data(0)) for k, v in gathered.items()})
  trainer.close()


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--coordinator", required=True)
  ap.add_argument("--num_processes", type=int, required=True)
  ap.add_argument("--process_id", type=int, required=True)
  ap.add_argument("--mesh", default="data=1,fsdp=2,tensor=2")
  ap.add_argument("--out", required=True)
  ap.add_argument("--rl_model_dir", default=None, help="run RL iterations on this model instead of one step")
  ap.add_argument("--rl_run_dir", default=None)
  ap.add_argument("--rl_lora_rank", type=int, default=0, help="LoraConfig.rank of the RL run (0: full fine-tuning)")
  args = ap.parse_args(argv)
  sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                  cpu_collectives="gloo", initialization_timeout=60)
  if args.rl_model_dir:
    run_rl(args)
    jax.distributed.shutdown()
    return 0
  mesh = sharding.make_mesh(parse_mesh(args.mesh))
  tokens_BxT, mask_BxT = global_batch()
  rows = sharding.process_batch_rows(mesh, BATCH)
  results, specs = run_step(mesh, tokens_BxT[rows], mask_BxT[rows])
  meta = np.array([jax.process_index(), jax.process_count(), jax.device_count(), jax.local_device_count(),
                   rows.start, rows.stop])
  np.savez(args.out, meta=meta, **results)
  with open(args.out + ".specs", "w") as f:
    f.write("\n".join(f"{k}\t{v}" for k, v in sorted(specs.items())))
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
