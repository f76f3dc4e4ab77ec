"""Optional metrics backends and the profiler switch: Weights & Biases offline, jax.profiler traces."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from cispo_jax.runtime.metrics import MetricWriter, read_metrics
from cispo_jax.runtime.profiler import IterationProfiler


def test_wandb_offline_logs_metrics_and_config(tmp_path, monkeypatch):
  pytest.importorskip("wandb", reason="wandb is optional (requirements-dev.txt); not installed here")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  hparams = {"RLConfig.seed": "7", "LossConfig.loss_type": "'cispo'"}
  w = MetricWriter(str(tmp_path), tensorboard=False, wandb_project="cispo-test", hparams=hparams)
  w.write(1, {"reward/mean": 0.5, "eval/pass_at_1": float("nan")})  # NaN: null in JSONL, left out of wandb
  w.write(2, {"reward/mean": 0.8125})
  w.close()
  assert [r["reward/mean"] for r in read_metrics(str(tmp_path))] == [0.5, 0.8125]  # JSONL stays the record
  [run] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
  with open(tmp_path / "wandb_run_id") as f:
    run_id = f.read().strip()
  assert run.endswith(f"run-{run_id}.wandb")
  logged = open(run, "rb").read()  # protobuf records: keys and JSON values are stored as they are
  for needle in (b"reward/mean", b"0.8125", b"RLConfig.seed", b"LossConfig.loss_type"):
    assert needle in logged, needle
  # a resumed run writes into the same wandb run
  w = MetricWriter(str(tmp_path), tensorboard=False, wandb_project="cispo-test", hparams=hparams, resume_from=2)
  w.write(3, {"reward/mean": 0.9})
  w.close()
  assert {os.path.basename(p) for p in glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))} \
      == {f"run-{run_id}.wandb"}


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_wandb(name, *args, **kwargs):
    if name == "wandb":
      raise ImportError("No module named 'wandb'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_wandb)
  with pytest.raises(ValueError, match="RLConfig.wandb_project is set but the wandb package is not installed"):
    MetricWriter(str(tmp_path), tensorboard=False, wandb_project="p")


def test_profiler_traces_only_the_chosen_iterations(tmp_path):
  f = jax.jit(lambda x: jnp.sin(x) @ x)
  prof = IterationProfiler((2, 3), str(tmp_path / "profile"))
  for it in range(1, 6):
    prof.before(it)
    assert prof.active == (2 <= it <= 3)
    f(jnp.ones((8, 8))).block_until_ready()
    prof.after(it)
  prof.close()
  traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  with pytest.raises(ValueError, match=r"RLConfig.profile_iterations=\(3, 2\)"):
    IterationProfiler((3, 2), str(tmp_path))
  off = IterationProfiler((), str(tmp_path / "off"))
  off.before(1)
  assert not off.active and not os.path.exists(tmp_path / "off")
