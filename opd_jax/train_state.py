"""Pure-pytree training state: the model split at the jit boundary, the optax optimizer, and shardings.

The student is split with `nnx.split` into a graph definition and pure dicts: `trainable` (all weights, or
only the LoRA adapters) and `frozen` (the base weights under LoRA, else empty). Only `trainable` has
optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from opd_jax.config.schema import OptimConfig
from opd_jax.mesh import named_sharding, replicated
from opd_jax.models.qwen3 import Qwen3, model_axes


@struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any


@dataclass(frozen=True)
class ModelDef:
    """How to rebuild a model from pure dicts inside jit."""

    graphdef: Any
    lora: bool

    def merge(self, trainable, frozen=None) -> Qwen3:
        if self.lora:
            return nnx.merge(self.graphdef, trainable, frozen)
        return nnx.merge(self.graphdef, trainable)


def split_model(model: Qwen3) -> tuple[ModelDef, dict, dict, dict, dict]:
    """-> (ModelDef, trainable params, frozen params, trainable axes, frozen axes)."""
    lora = model.lora_cfg is not None
    if lora:
        graphdef, lstate, bstate = nnx.split(model, nnx.LoRAParam, nnx.Param)
        return (ModelDef(graphdef, True), nnx.to_pure_dict(lstate), nnx.to_pure_dict(bstate),
                model_axes(lstate), model_axes(bstate))
    graphdef, state = nnx.split(model)
    return ModelDef(graphdef, False), nnx.to_pure_dict(state), {}, model_axes(state), {}


def tree_shardings(mesh: Mesh, axes: dict, params: dict, rules=None) -> dict:
    """NamedSharding for every leaf of `params` from its logical axes."""
    return jax.tree.map(
        lambda a, x: named_sharding(mesh, a, x.shape, rules), axes, params, is_leaf=lambda a: isinstance(a, tuple)
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the published defaults (b=(0.9, 0.95), eps 1e-8, no decay, no clip), plus schedules."""
    lr = cfg.learning_rate
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        sched = optax.constant_schedule(lr)
    elif cfg.schedule == "linear":
        sched = optax.linear_schedule(lr, 0.0, decay_steps)
    elif cfg.schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        raise ValueError(f"optim.schedule: unknown {cfg.schedule!r}")
    if cfg.warmup_steps > 0:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, cfg.warmup_steps), sched], [cfg.warmup_steps])
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def opt_state_shardings(optimizer: optax.GradientTransformation, trainable, trainable_shardings, mesh: Mesh):
    """Optimizer moments follow their parameters' shardings; scalars (counts) are replicated."""
    abstract = jax.eval_shape(optimizer.init, trainable)
    return optax.tree_map_params(
        optimizer, lambda _, s: s, abstract, trainable_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def state_shardings(optimizer, trainable, frozen, t_axes, f_axes, mesh: Mesh) -> TrainState:
    ts = tree_shardings(mesh, t_axes, trainable)
    return TrainState(
        step=replicated(mesh),
        trainable=ts,
        frozen=tree_shardings(mesh, f_axes, frozen),
        opt_state=opt_state_shardings(optimizer, trainable, ts, mesh),
    )


def init_train_state(optimizer, trainable, frozen, shardings: TrainState | None = None) -> TrainState:
    """Build the state (optimizer moments created directly in their shardings)."""

    def build(trainable, frozen):
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                          opt_state=optimizer.init(trainable))

    if shardings is None:
        return jax.jit(build)(trainable, frozen)
    return jax.jit(build, in_shardings=(shardings.trainable, shardings.frozen), out_shardings=shardings)(
        trainable, frozen
    )
