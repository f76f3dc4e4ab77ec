"""Configuration plumbing: gin parsing and its errors, field type checks, the operative config of a run.

No jax and no other cispo_jax layer here: the configurables themselves live with the stage that reads them,
and the command line (cispo_jax/cli.py) lists them.
"""
