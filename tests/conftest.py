"""Test-wide setup: 8 fake CPU devices (for mesh tests) before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Subprocess runs of `python -m cispo_jax.train` must not fill ~/.cache; tests that want the
# persistent compilation cache point this at a temporary directory.
os.environ.setdefault("CISPO_JAX_COMPILATION_CACHE", "")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
  """The tiny policy most trainer tests run: a 1-layer, 32-wide Qwen2 with the arithmetic alphabet's character
  tokenizer, built once per session (tests read it, never write it). test_scaleout.py overrides it with a model
  whose sharded dimensions divide its mesh axes."""
  from cispo_jax import data
  from cispo_jax.model.tiny import build_char_tokenizer, make_tiny_model_dir

  path = str(tmp_path_factory.mktemp("tiny_policy"))
  return make_tiny_model_dir(path, "qwen2", tokenizer=build_char_tokenizer(data.ALPHABET), hidden_size=32,
                             num_layers=1, num_heads=2, num_kv_heads=1, seed=0)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
  """Each test module drops the compiled programs the modules before it left in jax's caches (a module's own
  shared fixtures keep theirs while it runs). In one process the whole suite otherwise accumulates every program
  it ever compiled, and XLA:CPU aborted compiling an update after ~900 tests (test_trainer.py, twice, at the same
  test; the file alone and with the LoRA files passes)."""
  yield
  import gc

  import jax

  jax.clear_caches()
  gc.collect()
