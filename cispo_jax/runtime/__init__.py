"""What a run needs around it: checkpoints, the compilation cache, metric sinks, the profiler.

This face imports nothing: analysis reads metrics.jsonl through runtime.metrics without jax.
"""
