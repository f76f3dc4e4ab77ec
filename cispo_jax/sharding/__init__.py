"""Mesh, logical-axis rules and multi-host start-up.

    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    params = shard_init(init_fn, mesh, logical_axes(cfg), rng)
    batch = host_local_batch_to_global(my_rows, mesh)

`python -m cispo_jax.sharding` prints the memory table for Qwen2.5 0.5B/7B/32B (the planner lives in
cispo_jax/scale/memory.py: it reads the model, which itself reads these rules).
"""

from cispo_jax.sharding.mesh import (AXES, BATCH_AXES, CACHE_AXES, DECODE_RULES, RULES, MeshConfig, axis_sizes,
                                     batch_sharding, cache_sharding, make_mesh, optimizer_logical_axes,
                                     param_shardings, replicated, resolve_spec, shard_init, shard_shape)
from cispo_jax.sharding.multihost import (allgather_host, host_local_batch_to_global, initialize_distributed,
                                          is_distributed_initialized, is_main_process, process_batch_rows,
                                          to_host, wait_for_all_processes)
