"""cispo_jax: RL for language models with verifiable rewards in JAX/Flax, built around CISPO.

Start at trainer/loop.py (the loop: Trainer.step), rl/losses.py (CISPO and the GRPO family) and
sharding/mesh.py (the mesh rules). The packages are the stages of one iteration; imports only point down
(the layers contract in pyproject.toml).
"""

__version__ = "0.1.0"
