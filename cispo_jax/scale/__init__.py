"""Planning at scale: the analytic memory planner (python -m cispo_jax.sharding) and compile-only measurements
of the real programs (scale.compiled)."""
