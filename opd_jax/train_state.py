"""Pure-pytree training state: models split at the jit boundary, loaded into their shardings, the optax optimizer,
and the one micro-batched gradient accumulation + update every trainer uses.

A model is split with `nnx.split` into a graph definition (`ModelDef`) and pure dicts: `trainable` (all weights,
or only the LoRA adapters) and `frozen` (the base weights under LoRA, else empty). Only `trainable` has
optimizer state. `model_spec` gives a model's definition, abstract weights and shardings without allocating
anything (what `opd-jax compile` lowers with); `load_model` fills them with real weights (what the trainer runs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from opd_jax.config.presets import resolve_model_config
from opd_jax.config.schema import LoRAConfig, ModelConfig, OptimConfig
from opd_jax.errors import ConfigError
from opd_jax.mesh import named_sharding, replicated
from opd_jax.models.qwen3 import Qwen3, abstract_model, build_model, model_axes


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


def abstract_train_state(optimizer: optax.GradientTransformation, trainable, frozen, shardings: TrainState
                         ) -> TrainState:
    """The train state as ShapeDtypeStructs carrying their shardings (nothing allocated): for lowering the step."""
    def sds(tree, sh):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

    opt = jax.eval_shape(optimizer.init, trainable)
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
                      trainable=sds(trainable, shardings.trainable), frozen=sds(frozen, shardings.frozen),
                      opt_state=sds(opt, shardings.opt_state))


# ---- models: definition, shardings, weights --------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model split for jit: its resolved config, definition, weights (arrays, or ShapeDtypeStructs with
    shardings from `model_spec`) and the logical axes of each weight."""

    cfg: ModelConfig
    mdef: ModelDef
    trainable: dict
    frozen: dict
    t_axes: dict
    f_axes: dict

    def shardings(self, mesh: Mesh) -> tuple[dict, dict]:
        """(trainable, frozen) NamedShardings from the weights' logical axes."""
        return tree_shardings(mesh, self.t_axes, self.trainable), tree_shardings(mesh, self.f_axes, self.frozen)


def check_model_sources(models: list[tuple[str, ModelConfig]]) -> None:
    """Before anything is loaded or compiled: every `hf_path` of `models` ((field, config) pairs, e.g.
    `("student", cfg.student)`) is a local directory with a config.json, a remote URL, or a Hub id within reach.
    Raises ConfigError naming the field."""
    import os

    from opd_jax import hub

    for field, m in models:
        if not m.hf_path or "://" in m.hf_path:
            continue
        try:
            local = hub.resolve(m.hf_path)
        except ConfigError as e:
            raise ConfigError(f"{field}.hf_path: {e}", hint=e.hint) from None
        if not os.path.isdir(local):
            raise ConfigError(f"{field}.hf_path: {m.hf_path} does not exist (a local directory, gs:// path or Hub id "
                              "org/name)")
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ConfigError(f"{field}.hf_path: {m.hf_path} has no config.json: not a Hugging Face model directory")


def resolve_model(cfg: ModelConfig) -> ModelConfig:
    """The dimensions of a model config: its preset, then an `hf_path`'s config.json (run fields kept). A Hub id
    in `hf_path` becomes its local snapshot directory (`opd_jax.hub.resolve`)."""
    try:
        cfg = resolve_model_config(cfg)
    except ValueError as e:  # an unknown preset
        raise ConfigError(f"preset: {e}") from None
    if cfg.hf_path:
        from opd_jax import hub
        from opd_jax.models.hf_io import hf_config_for

        cfg = hf_config_for(dataclasses.replace(cfg, hf_path=hub.resolve(cfg.hf_path)))
    return cfg


def model_spec(cfg: ModelConfig, mesh: Mesh, lora: LoRAConfig | None = None) -> LoadedModel:
    """The model of `cfg` (already resolved, see `resolve_model`) as ShapeDtypeStructs in their shardings on
    `mesh`: no memory is allocated. `load_model` fills the same structure with weights."""
    mdef, t_abs, f_abs, t_axes, f_axes = split_model(abstract_model(cfg, lora))
    t_sh, f_sh = tree_shardings(mesh, t_axes, t_abs), tree_shardings(mesh, f_axes, f_abs)

    def sds(tree, sh):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

    return LoadedModel(cfg, mdef, sds(t_abs, t_sh), sds(f_abs, f_sh), t_axes, f_axes)


def load_model(cfg: ModelConfig, *, seed: int, mesh: Mesh, lora: LoRAConfig | None = None) -> LoadedModel:
    """Weights from `cfg.hf_path` (streamed tensor by tensor into their shardings) or a seeded random init
    created directly in its shardings (no full copy on one device). With LoRA only the adapters are
    initialized; the base weights are `frozen`."""
    cfg = resolve_model(cfg)
    spec = model_spec(cfg, mesh, lora)
    t_sh, f_sh = spec.shardings(mesh)

    if not cfg.hf_path:
        def init():
            _, t, f, _, _ = split_model(build_model(cfg, seed, lora))
            return t, f

        trainable, frozen = jax.jit(init, out_shardings=(t_sh, f_sh))()
        return LoadedModel(cfg, spec.mdef, trainable, frozen, spec.t_axes, spec.f_axes)

    from opd_jax.models.hf_io import load_hf_params

    base = load_hf_params(cfg.hf_path, cfg, mesh=mesh)
    if not spec.mdef.lora:
        return LoadedModel(cfg, spec.mdef, base, {}, spec.t_axes, spec.f_axes)

    def init_adapters():  # only the LoRA leaves are materialized; the base comes from the checkpoint
        return split_model(build_model(cfg, seed, lora))[1]

    trainable = jax.jit(init_adapters, out_shardings=t_sh)()
    return LoadedModel(cfg, spec.mdef, trainable, base, spec.t_axes, spec.f_axes)


# ---- the update: micro-batched gradients, then one optimizer step ------------------------------------------------
def micro_batches(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...]. Raises ValueError when n does not divide B."""
    if x.shape[0] % n:
        raise ValueError(f"micro_batches={n} does not divide the batch of {x.shape[0]} rows")
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])


def accumulate_gradients(grad_fn: Callable[[Any], tuple[Any, dict]], trainable, xs, n: int) -> tuple[Any, dict]:
    """Sum `grad_fn(mb) -> (grads, aux)` over `n` micro-batches of `xs` (every leaf split on axis 0) under one
    `lax.scan`, so only one micro-batch's activations are live at a time. Returns (summed grads, summed aux).
    Losses must be normalized by a denominator of the whole batch, so that the sum is the batch's gradient."""
    if n == 1:
        return grad_fn(xs)

    def body(acc, mb):
        g, aux = grad_fn(mb)
        return jax.tree.map(jnp.add, acc, g), aux

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    grads, aux = jax.lax.scan(body, zeros, jax.tree.map(lambda x: micro_batches(x, n), xs))
    return grads, jax.tree.map(jnp.sum, aux)


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation, loss: jax.Array
                    ) -> tuple[TrainState, jax.Array, jax.Array]:
    """One optimizer step on `grads`. A non-finite loss or gradient norm skips it: weights and moments stay as
    they were and only the step counter advances. Returns (new state, grad norm, finite flag)."""
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.trainable)
    new_params = optax.apply_updates(state.trainable, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    return TrainState(step=state.step + 1, trainable=keep(new_params, state.trainable), frozen=state.frozen,
                      opt_state=keep(new_opt, state.opt_state)), grad_norm, finite
