"""Preemption and resume with real processes: kill -9 at random moments (before the first checkpoint,
during a save), SIGTERM, a corrupted newest checkpoint, a changed config, the two-process run of docs/scale.md.

Each run is `python -m cispo_jax.train` in a fresh interpreter on one CPU device, exactly as a user
starts it; the reference is the same command run without interruption.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cispo_jax.runtime.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS = 10


_CACHE = {}


def _env(devices: int = 1) -> dict:
  if "dir" not in _CACHE:  # one persistent compilation cache for this module's runs (the default is ~/.cache)
    import tempfile
    _CACHE["dir"] = tempfile.mkdtemp(prefix="cispo_jax_xla_cache_")
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]),
              CISPO_JAX_COMPILATION_CACHE=_CACHE["dir"])


def _cmd(model_dir: str, run_dir: Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "cispo_jax.train", "--model_dir", model_dir, "--run_dir", str(run_dir),
          "--total_steps", str(STEPS), "--prompts_per_step", "4", "--num_generations", "4",
          "--max_new_tokens", "4", "--learning_rate", "0.01",
          "--gin_param", "CheckpointConfig.save_every=2", "--gin_param", "EvalConfig.eval_every=4",
          "--gin_param", "EvalConfig.eval_size=8", "--gin_param", "UpdateConfig.num_minibatches=1",
          "--gin_param", "TaskConfig.task_args={'max_operand': 9}", "--gin_param", "TaskConfig.train_size=64",
          "--gin_param", "TaskConfig.eval_size=8",
          # a length bonus beside the answer check: every group has reward variance, so every step updates
          "--gin_param", "TaskConfig.rewards=(('final_numeric', 1.0), ('user_reward_fns:length_bonus', 0.1))",
          *extra]


def _start(cmd, log_path: Path) -> subprocess.Popen:
  return subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def _rows(run_dir: Path) -> int:
  path = run_dir / "metrics.jsonl"
  return path.read_text().count("\n") if path.exists() else 0


def _saving(run_dir: Path) -> bool:
  """A checkpoint is being written (orbax writes into a temporary directory, then renames it)."""
  try:
    return any(not name.isdigit() for name in os.listdir(run_dir / "checkpoints"))
  except FileNotFoundError:
    return False


def _checkpoints(run_dir: Path) -> list[int]:
  try:
    return sorted(int(n) for n in os.listdir(run_dir / "checkpoints") if n.isdigit())
  except FileNotFoundError:
    return []


def _interrupt(proc: subprocess.Popen, run_dir: Path, moment: str, rng: random.Random) -> bool:
  """Wait for `moment`, then kill -9 (or SIGTERM). Returns False if the run finished first."""
  started, low = time.time(), _rows(run_dir)
  deadline = time.monotonic() + 300
  while proc.poll() is None and time.monotonic() < deadline:
    rows = _rows(run_dir)
    low = min(low, rows)  # a resume first drops the dead attempt's rows past its checkpoint
    if moment == "before_first_checkpoint" and rows >= 2 and not _checkpoints(run_dir) and not _saving(run_dir):
      break
    if moment == "during_save" and _saving(run_dir):
      break
    fresh = rows > low and (run_dir / "metrics.jsonl").stat().st_mtime > started
    if moment == "random" and fresh:
      time.sleep(rng.uniform(0.0, 1.0))
      break
    if moment == "sigterm" and fresh and read_metrics(str(run_dir))[-1]["iteration"] <= STEPS - 2:
      break  # mid-run: the iteration in flight is not the last
    time.sleep(0.002)
  if proc.poll() is not None:
    return False
  proc.send_signal(signal.SIGTERM if moment == "sigterm" else signal.SIGKILL)
  proc.wait(timeout=300)
  return True


def _comparable(rows):
  return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens/per_s", "compile/"))} for r in rows]


def _final_params(run_dir: Path) -> dict:
  from safetensors.numpy import load_file
  return load_file(str(run_dir / "final_model" / "model.safetensors"))


def test_kill9_sigterm_and_corruption_resume_to_the_uninterrupted_run(model_dir, tmp_path):
  ref = tmp_path / "ref"
  done = subprocess.run(_cmd(model_dir, ref), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert json.loads((ref / "summary.json").read_text())["compile_cache_hits"] == 0  # a fresh cache

  run = tmp_path / "run"
  rng = random.Random(0)
  # Deterministic moments first (the ones that lose the most), then random ones, then SIGTERM.
  moments = ["before_first_checkpoint", "during_save", "sigterm", "random", "during_save", "random"]
  hit, attempts = [], 0
  while True:
    attempts += 1
    assert attempts < 20, f"the run never finished; interruptions so far: {hit}"
    log_path = tmp_path / f"attempt{attempts}.log"
    proc = _start(_cmd(model_dir, run), log_path)
    if moments:
      moment = moments[0]
      if _interrupt(proc, run, moment, rng):
        moments.pop(0)
        hit.append(moment)
        if moment == "sigterm":
          log_text = log_path.read_text()
          assert proc.returncode == 75, log_text[-3000:]
          assert "Rerun the same command to resume" in log_text
          last_row = read_metrics(str(run))[-1]["iteration"]
          assert _checkpoints(run)[-1] == last_row, "SIGTERM must save the iteration it finished"
        continue
    proc.wait(timeout=600)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    break
  assert {"before_first_checkpoint", "during_save", "random", "sigterm"} <= set(hit), hit
  assert len(hit) >= 5, hit

  # The later attempts loaded the reference run's compiled programs from the persistent cache, and
  # still reproduced it bit for bit.
  assert json.loads((run / "summary.json").read_text())["compile_cache_hits"] > 0
  assert _comparable(read_metrics(str(run))) == _comparable(read_metrics(str(ref)))
  got, want = _final_params(run), _final_params(ref)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # bitwise: same machine, same program

  # A flipped byte in the newest checkpoint: detected by its fingerprints, the previous one is used.
  newest = _checkpoints(run)[-1]
  blobs = sorted((p.stat().st_size, p) for p in (run / "checkpoints" / str(newest)).rglob("*")
                 if p.is_file() and "/d/" in str(p))
  raw = bytearray(blobs[-1][1].read_bytes())
  raw[len(raw) // 2] ^= 0x40
  blobs[-1][1].write_bytes(raw)
  resumed = subprocess.run(_cmd(model_dir, run), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"checkpoint {newest} in" in resumed.stderr and "falling back" in resumed.stderr, resumed.stderr[-3000:]
  assert (run / "checkpoints_corrupt" / str(newest)).exists()
  assert _comparable(read_metrics(str(run))) == _comparable(read_metrics(str(ref)))
  got = _final_params(run)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  # The same run directory with another learning rate: refused, naming the key; allowed with the flag.
  changed = _cmd(model_dir, run, "--learning_rate", "0.02")
  refused = subprocess.run(changed, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert refused.returncode != 0
  assert "OptimConfig.learning_rate: 0.01 -> 0.02" in refused.stderr, refused.stderr[-3000:]
  assert "--allow_config_change" in refused.stderr
  allowed = subprocess.run(changed + ["--allow_config_change"], env=_env(), cwd=REPO, capture_output=True,
                           text=True, timeout=600)
  assert allowed.returncode == 0, allowed.stderr[-3000:]
  change = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
  assert change[-1]["iteration"] == STEPS
  assert change[-1]["changed"]["OptimConfig.learning_rate"] == ["0.01", "0.02"]
  assert "learning_rate = 0.02" in (run / "operative_config.gin").read_text()
  assert (run / f"operative_config.before_{STEPS}.gin").exists()


def test_docs_two_process_command_exits_cleanly(model_dir, tmp_path):
  """docs/scale.md's multi-process command on one CPU machine (2 processes x 2 devices, fsdp=2, tensor=2):
  every process exits 0, and the final model and the summary are written."""
  page = (REPO / "docs" / "scale.md").read_text()  # the README links it as "multi-process commands"
  assert "--gin_param=MeshConfig.fsdp=2 --gin_param=MeshConfig.tensor=2" in page
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  run = tmp_path / "mp"
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-m", "cispo_jax.train", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={pid}", "--gin_param=MeshConfig.fsdp=2",
           "--gin_param=MeshConfig.tensor=2"]
    # The page's command with a shorter run (its defaults train 150 iterations), bootstrapping its model
    # like the default run does: process 0 builds it while process 1 waits at a barrier.
    cmd += _cmd(model_dir, run)[5:] + ["--total_steps", "3", "--gin_param", "BootstrapConfig.sft_steps=20",
                                       "--gin_param", f"BootstrapConfig.cache_dir='{tmp_path / 'bootstrap'}'"]
    procs.append(subprocess.Popen(cmd, env=_env(devices=2), cwd=REPO, stdout=open(tmp_path / f"p{pid}.log", "w"),
                                  stderr=subprocess.STDOUT))
  try:
    for p in procs:
      p.wait(timeout=600)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [(tmp_path / f"p{pid}.log").read_text() for pid in range(2)]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
  summary = json.loads((run / "summary.json").read_text())
  assert summary["iterations"] == 3 and "eval_end" in summary
  assert (run / "final_model" / "model.safetensors").exists()
  shutil.rmtree(run)
