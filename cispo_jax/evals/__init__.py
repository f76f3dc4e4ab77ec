"""Evaluation: pass@k over held-out sets, and the eval command (python -m cispo_jax.evaluate)."""
