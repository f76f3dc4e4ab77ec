"""Reward functions for tests/test_rewards.py, importable by the reward worker process.

Misbehaviour is keyed on the completion text so one batch mixes good and bad items.
"""

import os
import threading

from cispo_jax.rewards import register_reward

RELEASE = threading.Event()  # ends the thread-mode hang so no spinning thread outlives its test


def length_bonus(completion, example):
  """A user reward given by import path: 'user_reward_fns:length_bonus'."""
  return 0.25 * len(completion.strip())


@register_reward("test_flaky")
def flaky(completion, example):
  """Raises on 'boom', loops forever on 'hang', kills its process on 'exit', else 0.5."""
  if completion == "boom":
    raise RuntimeError("boom goes the reward")
  if completion == "hang":
    while True:
      pass
  if completion == "exit":
    os._exit(3)
  if completion == "nan":
    return float("nan")
  return 0.5


def hang_until_released(completion, example):
  """Spins on 'spin' until the test sets RELEASE (thread mode cannot kill a thread)."""
  if completion == "spin":
    while not RELEASE.is_set():
      pass
  return 1.0


# --- for tests/test_reward_isolation.py -------------------------------------------------------
# What they do is keyed on example.meta, which travels to the worker with the example.

def returns_meta_value(completion, example):
  """Returns example.meta['value'] as it is: 1e39, nan, 'abc', None... (reward validation)."""
  return example.meta["value"]


def spawn_sleeper(completion, example):
  """Starts a `sleep 1000` (Popen, or os.fork if meta['how'] == 'fork'), writes its pid to
  meta['pidfile'], then returns 1.0, or spins forever if the completion is 'hang'."""
  import subprocess
  import time
  if example.meta.get("how") == "fork":
    pid = os.fork()
    if pid == 0:  # the child: sleeps, never returns into the worker's loop
      try:
        time.sleep(1000)
      finally:
        os._exit(0)
  else:
    pid = subprocess.Popen(["sleep", "1000"]).pid
  with open(example.meta["pidfile"], "w") as f:
    f.write(str(pid))
  if completion == "hang":
    while True:
      pass
  return 1.0


def rlimit_as_mib(completion, example):
  """The address-space limit of the process running this reward, in MiB (-1.0: unlimited)."""
  import resource
  soft, _ = resource.getrlimit(resource.RLIMIT_AS)
  return -1.0 if soft == resource.RLIM_INFINITY else soft / 2**20


def allocate(completion, example):
  """Allocates meta['gib'] GiB (calloc'd bytes: address space, no resident memory), returns 1.0."""
  block = bytes(int(example.meta["gib"] * 2**30))
  return 1.0 if len(block) else 0.0


_LEAKED = []


def leak(completion, example):
  """Keeps meta['mib'] MiB more on every call (address space, not resident memory), returns 1.0."""
  _LEAKED.append(bytes(int(example.meta["mib"] * 2**20)))
  return 1.0


def jax_not_imported(completion, example):
  """1.0 if the process running this reward has not imported jax (the worker must not)."""
  import sys
  return 0.0 if "jax" in sys.modules else 1.0


def huge_on_odd_length(completion, example):
  """1e39 (inf in float32) for odd-length completions, else a length bonus (tests/test_reliability.py)."""
  return 1e39 if len(completion) % 2 else 0.25 * len(completion)
