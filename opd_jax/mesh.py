"""Device mesh, the one rules table that maps logical axis names to mesh axes, and moving batch rows between
process-local numpy and global sharded arrays."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opd_jax.config.schema import MeshConfig
from opd_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes). Every weight, activation and cache dimension
# carries one of these names; this table is the single place where parallelism is decided.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "seq": None,
    "cache_seq": None,
    "cache_blocks": None,
    "lora_rank": "fsdp",  # shards every LoRA factor (and its optimizer moments) even where its other axes can't be
}

# Decode-time layouts: weights resharded inside the step so each token does not all-gather FSDP shards.
SAMPLING_RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    "train": RULES,
    "replicated": {**RULES, "embed": None, "vocab": None, "heads": None, "kv_heads": None, "mlp": None,
                   "lora_rank": None},
    "tensor": {**RULES, "embed": None, "lora_rank": None},
}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ("data", "fsdp", "tensor") mesh; one axis may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {free}")
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k}: must be positive or -1, got {v}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    named = " x ".join(f"mesh.{k}={v}" for k, v in sizes.items())
    if free:
        if len(devices) % fixed:
            raise ConfigError(f"{named}: the {len(devices)} devices are not divisible by the fixed axes' product "
                              f"{fixed}")
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ConfigError(f"{named} needs {total} devices, but {len(devices)} are available",
                          hint="set one axis to -1 to take the remaining devices")
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(
            tuple(sizes[a] for a in MESH_AXES), devices=devices, allow_split_physical_axes=True
        )
    except Exception:  # CPU / abstract devices without a physical topology
        arr = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(arr, MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None, rules=None
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec. A mesh axis that does not divide the dimension is dropped
    (the dimension is replicated instead), so tiny test models and odd head counts still shard."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for ax in mesh_axes:
            if ax in used:
                continue
            if mesh is not None and shape is not None:
                size = mesh.shape[ax]
                prod = math.prod(mesh.shape[a] for a in kept) * size
                if shape[i] % prod:
                    continue
            kept.append(ax)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int], rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def with_logical_constraint(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None, rules=None) -> jax.Array:
    """Sharding constraint by logical names; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape, rules))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    return named_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ---- host rows <-> global arrays ---------------------------------------------------------------------------------
def host_local(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, as numpy (the inverse of `global_rows`)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    sh = x.sharding
    assert isinstance(sh, NamedSharding), sh
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, sh.mesh, sh.spec))


def global_rows(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Process-local numpy rows -> one global array in `sharding` (rows of process p follow those of p-1)."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
