"""The paged rollout engine: continuous batching over a paged KV cache (engine.py: the host scheduler;
pool.py: page bookkeeping; step.py: the device programs). `generate_paged` returns the static sampler's
SampleOutput, so the trainer, the evaluator and the pipeline read it unchanged."""

from cispo_jax.rollout.paged.engine import PagedConfig, generate_paged
from cispo_jax.rollout.paged.pool import PagePool

__all__ = ["PagedConfig", "PagePool", "generate_paged"]
