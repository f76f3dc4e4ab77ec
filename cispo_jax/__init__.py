"""cispo_jax: RL for language models with verifiable rewards in JAX/Flax, built around CISPO.

Start at trainer.py (the loop), losses.py (CISPO and the GRPO family) and sharding/ (the mesh rules).
"""

__version__ = "0.1.0"
