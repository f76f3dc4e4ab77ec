"""Multi-host start-up and per-process input: JAX's multi-controller runtime.

Every process runs the same program on the same global mesh; each one feeds
only the rows of the batch that live on its own devices, and only process 0
writes logs and plots.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from cispo_jax.sharding.mesh import batch_sharding

log = logging.getLogger(__name__)

_CPU_COLLECTIVES = ("gloo", "mpi", "none")


def _cluster_detected() -> bool:
  """A managed multi-process environment (TPU pod, SLURM, Open MPI, K8s) that
  `jax.distributed.initialize()` configures by itself, with more than one process in it.

  As in jax's own auto-detection, an opt-in-only method is skipped: Mpi4pyCluster counts as
  present wherever mpi4py is installed (it is on the one-GPU machines we measured on, and
  jax.distributed then failed for want of a coordinator address). An environment that names
  no process count above one is not one either: one process needs no runtime.
  """
  try:
    from jax._src import clusters  # private: the same detection jax.distributed uses
    envs = [env for env in clusters.ClusterEnv._cluster_types
            if not getattr(env, "opt_in_only_method", False) and env.is_env_present()]
  except Exception:  # pylint: disable=broad-except
    return False
  for env in envs:
    try:
      count = env.get_process_count()
    except Exception as e:  # pylint: disable=broad-except
      log.warning("cluster environment %s detected but gives no process count (%s); running as one process",
                  env.__name__, e)
      continue
    if count is not None and count > 1:
      return True
    log.info("cluster environment %s detected with %s process(es): running as one process", env.__name__, count)
  return False


def is_distributed_initialized() -> bool:
  return bool(jax.distributed.is_initialized())


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, cpu_collectives: str = "gloo",
                           local_device_ids=None, initialization_timeout: int = 300) -> bool:
  """Start the multi-controller runtime when there is more than one process.

  - explicit arguments (or JAX_COORDINATOR_ADDRESS in the environment): start
    with them (CPU and GPU clusters; every process passes the same address);
  - a detected cluster (TPU pod slice, SLURM, ...): `jax.distributed.initialize()`
    with no arguments, which reads the topology itself;
  - otherwise a single process: no-op.

  Must run before anything touches a JAX device. Returns whether the runtime is
  (now) initialised. On CPU, cross-process collectives use `cpu_collectives`.
  """
  if cpu_collectives not in _CPU_COLLECTIVES:
    raise ValueError(f"cpu_collectives={cpu_collectives!r}; allowed: {_CPU_COLLECTIVES}")
  if is_distributed_initialized():
    return True
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  from_env = os.environ.get("JAX_COORDINATOR_ADDRESS") is not None
  if not (explicit or from_env or _cluster_detected()):
    return False
  if explicit and coordinator_address is None and not from_env and not _cluster_detected():
    raise ValueError("initialize_distributed: num_processes/process_id given without coordinator_address "
                     "(e.g. '10.0.0.1:1234', the same on every process)")
  # Only the CPU client reads this; harmless on GPU/TPU where NCCL/ICI are used.
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout)
  log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def wait_for_all_processes(name: str, timeout_s: float = 3600.0) -> None:
  """Block until every process reaches the barrier `name` (unique per use), for up to timeout_s.

  Uses the coordination service's barrier, not a collective: a collective (e.g.
  multihost_utils.sync_global_devices) gives up after gloo's 30 s context deadline, too short
  for process 0 to build something the others then read (the bootstrap model).
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the coordination-service client jax.distributed created
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("wait_for_all_processes: jax.distributed is not initialised")
  client.wait_at_barrier(name, int(timeout_s * 1000))


def is_main_process() -> bool:
  """Process 0 writes logs, plots and the run summary."""
  return jax.process_index() == 0


def process_batch_rows(mesh: Mesh, global_batch: int, sharding: NamedSharding | None = None) -> slice:
  """Rows [start, stop) of a global batch that this process must load.

  Data loaders call this so each process reads only its share of the prompts.
  """
  sharding = sharding or batch_sharding(mesh, 1)
  idx = sharding.addressable_devices_indices_map((global_batch,))
  rows = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in idx.values()})
  start, stop = rows[0][0], rows[-1][1]
  covered = sum(b - a for a, b in rows)
  if covered != stop - start:
    raise ValueError(f"this process's batch rows {rows} are not contiguous on the mesh; "
                     "lay out the mesh so each process owns a block of the data axes")
  return slice(start, stop)


def host_local_batch_to_global(local_np_array, mesh: Mesh, sharding: NamedSharding | None = None) -> jax.Array:
  """Global jax.Array from this process's rows (`process_batch_rows`) of a batch.

  Single process: the local array is the whole batch.
  """
  local = np.asarray(local_np_array)
  sharding = sharding or batch_sharding(mesh, local.ndim)
  # The global shape is inferred: local rows x (batch shards / this process's shards).
  return jax.make_array_from_process_local_data(sharding, local)


def to_host(x) -> np.ndarray:
  """The full value of an array on this host (gathered from the other processes if needed)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def allgather_host(local: np.ndarray) -> np.ndarray:
  """Concatenate every process's host array (in process order) on every process."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))
