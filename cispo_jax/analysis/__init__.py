"""Reading finished runs: statistics over seeds, the ScaleRL fit, curves (python -m cispo_jax.analysis). No jax."""
