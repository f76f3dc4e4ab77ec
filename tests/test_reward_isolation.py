"""Rewards that return unusable values, start processes, or use too much memory.

A value that is not a finite float32 within RewardConfig.max_abs_reward is an error (reward 0);
the worker's process group dies with it (timeout, close, exit, the trainer killed); the worker's
address space is capped, and an allocation past the cap is an error after which a fresh worker
goes on.
"""

import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cispo_jax.data import Example
from cispo_jax.rewards import RewardConfig, RewardScorer

import user_reward_fns  # noqa: F401  (importable by the worker: tests/ is on sys.path)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)

try:
  import psutil
except ImportError:  # /proc is enough on Linux
  psutil = None


def _running(pid: int) -> bool:
  """Alive and not a zombie (a killed orphan stays a zombie until init, maybe never, reaps it)."""
  if psutil is not None:
    try:
      return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
      return False
  try:
    with open(f"/proc/{pid}/stat") as f:
      state = f.read().rsplit(")", 1)[1].split()[0]
  except (FileNotFoundError, ProcessLookupError):
    return False
  return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode()
  except OSError:
    return ""


def _still_there(pid: int, cmdline: str) -> bool:
  return _running(pid) and _cmdline(pid) == cmdline  # same cmdline: not a reused pid


def _wait_gone(pid: int, cmdline: str, seconds: float = 10.0) -> bool:
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if not _still_there(pid, cmdline):
      return True
    time.sleep(0.05)
  return False


def _kill(pid: int) -> None:
  try:
    os.kill(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


# --- B: reward values ----------------------------------------------------------------------

BAD_VALUES = [1e39, -1e39, float("nan"), float("inf"), -float("inf"), "abc", None, "1.0", b"1", 2e6, -2e6,
              complex(1, 0), [1.0]]
GOOD_VALUES = [(0.5, 0.5), (1e6, 1e6), (-3, -3.0), (True, 1.0), (np.float32(0.25), 0.25), (np.int64(2), 2.0)]


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_unusable_reward_values_are_zero_and_counted(isolation, caplog):
  values = [v for v, _ in GOOD_VALUES] + BAD_VALUES
  examples = [Example("q", "a", {"value": v}) for v in values]
  scorer = RewardScorer(RewardConfig((("user_reward_fns:returns_meta_value", 1.0),), isolation=isolation))
  try:
    with caplog.at_level(logging.WARNING):
      rewards_N, stats = scorer.score([f"c{i}" for i in range(len(values))], examples)
  finally:
    scorer.close()
  expected = [e for _, e in GOOD_VALUES] + [0.0] * len(BAD_VALUES)
  assert np.isfinite(rewards_N).all()
  np.testing.assert_array_equal(rewards_N, np.asarray(expected, np.float32))
  assert stats["errors"] == len(BAD_VALUES) and stats["user_reward_fns:returns_meta_value/errors"] == len(BAD_VALUES)
  assert stats["timeouts"] == 0 and np.isfinite(stats["mean"])
  logged = caplog.text
  first = len(GOOD_VALUES)  # the first few are quoted: the reward, the item, its completion, why
  assert "'user_reward_fns:returns_meta_value'" in logged and f"{len(BAD_VALUES)} error(s)" in logged
  assert f"item {first} (completion 'c{first}'): returned 1e+39, which is not finite as float32" in logged
  assert f"item {first + 2} (completion 'c{first + 2}'): returned nan" in logged


def test_range_is_configurable():
  examples = [Example("q", "a", {"value": v}) for v in (2e6, 2e7)]
  scorer = RewardScorer(RewardConfig((("user_reward_fns:returns_meta_value", 1.0),), isolation="none",
                                     max_abs_reward=1e7))
  rewards_N, stats = scorer.score(["a", "b"], examples)
  np.testing.assert_array_equal(rewards_N, [2e6, 0.0])
  assert stats["errors"] == 1
  with pytest.raises(ValueError, match="max_abs_reward"):
    RewardConfig(max_abs_reward=0.0)
  with pytest.raises(ValueError, match="memory_limit_mb"):
    RewardConfig(memory_limit_mb=0)


# --- C: processes a reward starts -------------------------------------------------------------

@pytest.mark.parametrize("how", ["popen", "fork"])
def test_children_of_a_reward_die_with_the_scorer(tmp_path, how):
  pidfile = tmp_path / "pid"
  scorer = RewardScorer(RewardConfig((("user_reward_fns:spawn_sleeper", 1.0),), timeout_s=30.0))
  pid = None
  try:
    rewards_N, stats = scorer.score(["x"], [Example("q", "a", {"pidfile": str(pidfile), "how": how})])
    assert rewards_N.tolist() == [1.0] and stats["errors"] == 0
    pid = int(pidfile.read_text())
    cmdline = _cmdline(pid)
    assert _running(pid), "the reward's child should run until the scorer closes"
    scorer.close()
    assert _wait_gone(pid, cmdline, 5.0), f"{how} child {pid} ({cmdline!r}) outlived scorer.close()"
  finally:
    scorer.close()
    if pid is not None:
      _kill(pid)


def test_children_of_a_hung_reward_die_at_the_timeout(tmp_path):
  pidfile = tmp_path / "pid"
  scorer = RewardScorer(RewardConfig((("user_reward_fns:spawn_sleeper", 1.0),), timeout_s=1.0))
  pid = None
  try:
    rewards_N, stats = scorer.score(["hang"], [Example("q", "a", {"pidfile": str(pidfile)})])
    assert rewards_N.tolist() == [0.0] and stats["timeouts"] == 1 and stats["worker_restarts"] == 1
    pid = int(pidfile.read_text())
    assert _wait_gone(pid, _cmdline(pid), 5.0), "the hung reward's child outlived the restart"
    # The scorer still works, in its fresh worker.
    other = tmp_path / "pid2"
    rewards_N, stats = scorer.score(["x"], [Example("q", "a", {"pidfile": str(other)})])
    assert rewards_N.tolist() == [1.0] and stats["errors"] == stats["timeouts"] == 0
  finally:
    scorer.close()
    if pid is not None:
      _kill(pid)


_SCRIPT = """
import os, signal, sys
sys.path[:0] = [{tests!r}, {repo!r}]
from cispo_jax.data import Example
from cispo_jax.rewards import RewardConfig, RewardScorer
scorer = RewardScorer(RewardConfig((("user_reward_fns:spawn_sleeper", 1.0),), timeout_s=30.0))
rewards, stats = scorer.score(["x"], [Example("q", "a", {{"pidfile": {pidfile!r}}})])
assert rewards.tolist() == [1.0], (rewards, stats)
if {sigkill}:
  os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no close: the worker must notice
# else: exit without close(): atexit must kill the worker's group
"""


@pytest.mark.parametrize("sigkill", [False, True], ids=["atexit", "trainer_sigkilled"])
def test_children_of_a_reward_die_when_the_trainer_exits(tmp_path, sigkill):
  pidfile = tmp_path / "pid"
  script = _SCRIPT.format(tests=TESTS_DIR, repo=REPO_DIR, pidfile=str(pidfile), sigkill=sigkill)
  log = tmp_path / "log"
  with open(log, "w") as out:  # not a pipe: a leftover process holding it would hang run()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], stdout=out, stderr=out, timeout=120)
  assert proc.returncode == (-signal.SIGKILL if sigkill else 0), log.read_text()
  pid = int(pidfile.read_text())
  try:
    assert _wait_gone(pid, "sleep 1000 ", 10.0), f"sleep {pid} outlived its trainer"
  finally:
    _kill(pid)


# --- C: memory ------------------------------------------------------------------------------

def test_worker_address_space_is_capped_by_default():
  assert RewardConfig().memory_limit_mb == 4096
  scorer = RewardScorer(RewardConfig((("user_reward_fns:rlimit_as_mib", 1.0),
                                      ("user_reward_fns:jax_not_imported", 1.0)), timeout_s=30.0))
  try:
    _, stats = scorer.score(["x"], [Example("q", "a")])
  finally:
    scorer.close()
  assert stats["errors"] == 0
  assert stats["user_reward_fns:rlimit_as_mib/mean"] == 4096.0
  assert stats["user_reward_fns:jax_not_imported/mean"] == 1.0  # JAX would not fit in the cap
  scorer = RewardScorer(RewardConfig((("user_reward_fns:rlimit_as_mib", 1.0),), memory_limit_mb=None))
  try:
    rewards_N, _ = scorer.score(["x"], [Example("q", "a")])
  finally:
    scorer.close()
  soft, _ = resource.getrlimit(resource.RLIMIT_AS)
  assert rewards_N[0] == (-1.0 if soft == resource.RLIM_INFINITY else np.float32(soft / 2**20))


def test_allocating_10_gib_is_an_error_and_the_scorer_goes_on(caplog):
  scorer = RewardScorer(RewardConfig((("user_reward_fns:allocate", 1.0),), timeout_s=30.0))
  examples = [Example("q", "a", {"gib": g}) for g in (0.01, 10.0, 0.01)]
  try:
    with caplog.at_level(logging.WARNING):
      rewards_N, stats = scorer.score(["a", "b", "c"], examples)
    np.testing.assert_array_equal(rewards_N, [1.0, 0.0, 1.0])
    assert stats["errors"] == 1 and stats["timeouts"] == 0 and stats["worker_restarts"] == 1
    assert "MemoryError" in caplog.text and "memory limit of 4096 MiB" in caplog.text
    rewards_N, stats = scorer.score(["d"], [Example("q", "a", {"gib": 0.01})])
    assert rewards_N.tolist() == [1.0] and stats["errors"] == 0
  finally:
    scorer.close()


def test_a_leaking_reward_is_stopped_and_its_worker_replaced():
  """128 MiB kept per call under a 1 GiB cap: every few items one hits the cap, is an error, and
  the next item runs in a fresh worker (without the replacement every later item would fail)."""
  scorer = RewardScorer(RewardConfig((("user_reward_fns:leak", 1.0),), timeout_s=30.0, memory_limit_mb=1024))
  n = 24
  try:
    rewards_N, stats = scorer.score([str(i) for i in range(n)], [Example("q", "a", {"mib": 128})] * n)
  finally:
    scorer.close()
  failed = np.flatnonzero(rewards_N == 0.0)
  assert 2 <= len(failed) <= n // 4, rewards_N
  assert stats["errors"] == len(failed) and stats["worker_restarts"] == len(failed)
  assert all(rewards_N[i + 1] == 1.0 for i in failed if i + 1 < n)  # a fresh worker after each
