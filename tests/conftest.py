"""Test-wide setup: 8 fake CPU devices (for mesh tests) before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Subprocess runs of `python -m cispo_jax.train` must not fill ~/.cache; tests that want the
# persistent compilation cache point this at a temporary directory.
os.environ.setdefault("CISPO_JAX_COMPILATION_CACHE", "")
