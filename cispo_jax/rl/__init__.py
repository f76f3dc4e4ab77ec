"""The RL stage: losses, advantages, diagnostics, the optimizer, the jitted update and its plan (pure functions)."""
