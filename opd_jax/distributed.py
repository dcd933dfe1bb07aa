"""Multi-host start-up on JAX's own multi-controller runtime (`jax.distributed`).

- TPU pods and SLURM / Open MPI clusters: `jax.distributed.initialize()` finds the coordinator itself.
- GPU hosts without a cluster manager: pass `distributed.coordinator_address`, `num_processes`, `process_id`
  in the config (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).
"""

from __future__ import annotations

import os

import jax

from opd_jax.config.schema import DistributedConfig

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "JAX_COORDINATOR_ADDRESS")


def _on_multihost_cluster() -> bool:
    if any(v in os.environ for v in _CLUSTER_ENV[:2] + _CLUSTER_ENV[3:]):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h and h != "localhost"]) > 1


def initialize_distributed(cfg: DistributedConfig) -> bool:
    """Initialize once; returns True when this process is part of a multi-process job."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    explicit = cfg.coordinator_address is not None
    if cfg.initialize == "never" or (cfg.initialize == "auto" and not explicit and not _on_multihost_cluster()):
        return False
    kwargs = {}
    if explicit:
        kwargs = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                      process_id=cfg.process_id)
    jax.distributed.initialize(**kwargs)
    return jax.process_count() > 1
