"""The gin lines that shrink the bootstrap warm start to a 1-layer, 32-wide model cached under a test's
temp dir: shared by the tests that run whole experiments through gin (test_sweep.py, test_fork_probe.py)."""


def tiny_bootstrap_gin(cache_dir, *, sft_steps: int, sft_examples: int) -> str:
  return f"""
BootstrapConfig.cache_dir = '{cache_dir}'
BootstrapConfig.hidden_size = 32
BootstrapConfig.intermediate_size = 64
BootstrapConfig.num_layers = 1
BootstrapConfig.num_heads = 2
BootstrapConfig.num_kv_heads = 1
BootstrapConfig.sft_steps = {sft_steps}
BootstrapConfig.sft_examples = {sft_examples}
"""
