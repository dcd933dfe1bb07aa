"""Qwen3 dense decoder in Flax NNX.

Layers are stored stacked (leading `layers` axis) and run under `lax.scan` over `decoder_layer`, so compile time
is flat in depth. Every weight comes from the one weight table (`opd_jax.models.weights`) and carries its
`logical_axes`; `opd_jax.mesh.RULES` maps those to mesh axes. The forward pass returns final hidden states; logits
are a separate `lm_head` step so callers can compute logprobs in sequence chunks without ever holding
[batch, seq, vocab] fp32 logits. Attention and the KV cache live in `opd_jax.models.attention`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from opd_jax.config.schema import LoRAConfig, ModelConfig
from opd_jax.mesh import with_logical_constraint
from opd_jax.models.attention import (
    AttentionPlan,
    KVCache,
    attend,
    decode_kind,
    init_cache,
    plan_attention,
    target_platform,
)
from opd_jax.models.weights import LAYER_WEIGHTS, MATRICES

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Qwen3(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        self.cfg = cfg
        self.lora_cfg = lora if lora is not None and lora.rank > 0 else None
        pdtype = _DTYPES[cfg.param_dtype]
        L = cfg.num_layers

        def param(shape, axes, std=0.02, kind=nnx.Param):
            value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
            return kind(value.astype(pdtype), logical_axes=tuple(axes))

        def ones(shape, axes):
            return nnx.Param(jnp.ones(shape, pdtype), logical_axes=tuple(axes))

        self.embed = param((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        for name, w in LAYER_WEIGHTS.items():
            shape, axes = (L, *w.shape(cfg)), ("layers", *w.axes)
            setattr(self, name, ones(shape, axes) if w.is_norm else param(shape, axes))
        self.final_norm = ones((cfg.hidden_size,), ("norm",))
        self.lm_head = None if cfg.tie_embeddings else param((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

        if self.lora_cfg is not None:
            r = self.lora_cfg.rank
            for name in self.lora_cfg.targets:
                if name not in MATRICES:
                    raise ValueError(f"lora.targets: unknown module {name!r}; valid: {sorted(MATRICES)}")
                w = LAYER_WEIGHTS[name]
                shape, n_in = w.shape(cfg), w.n_in
                a = param((L, *shape[:n_in], r), ("layers", *w.axes[:n_in], "lora_rank"),
                          std=1.0 / math.sqrt(math.prod(shape[:n_in])), kind=nnx.LoRAParam)
                # B starts at zero, so a fresh adapter leaves the model unchanged.
                b = nnx.LoRAParam(jnp.zeros((L, r, *shape[n_in:]), pdtype),
                                  logical_axes=("layers", "lora_rank", *w.axes[n_in:]))
                setattr(self, f"lora_{name}_a", a)
                setattr(self, f"lora_{name}_b", b)

    # ---- weights -------------------------------------------------------------------------------------
    def layer_params(self) -> dict[str, jax.Array]:
        """The stacked layer weights (and LoRA adapters) by name: the xs of the layer scan."""
        p = {name: getattr(self, name)[...] for name in LAYER_WEIGHTS}
        if self.lora_cfg is not None:
            for name in self.lora_cfg.targets:
                p[f"lora_{name}_a"] = getattr(self, f"lora_{name}_a")[...]
                p[f"lora_{name}_b"] = getattr(self, f"lora_{name}_b")[...]
        return p

    def head_weight(self) -> jax.Array:
        """[hidden, vocab] output projection (the transposed embedding when tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    @property
    def dtype(self):
        return _DTYPES[self.cfg.dtype]

    @property
    def param_dtype(self):
        return _DTYPES[self.cfg.param_dtype]

    # ---- cache ---------------------------------------------------------------------------------------
    def decode_kind(self, max_len: int, mesh: Mesh | None = None) -> str:
        """The one-token decode attention of this model's programs on `mesh` (default: the default backend)
        with a cache of `max_len` slots: `model.decode_attention` resolved for the target platform
        (`attention.decode_kind`)."""
        c = self.cfg
        return decode_kind(c.decode_attention, target_platform(mesh), c.head_dim, max_len)

    def init_cache(self, batch: int, max_len: int, mesh: Mesh | None = None, rules=None) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` slots in the compute dtype, in the layout its
        decode attention reads (`decode_kind`: "tiled" for the CPU block loop, "flat" otherwise; see `KVCache`)."""
        c = self.cfg
        layout = "tiled" if self.decode_kind(max_len, mesh) == "blocks" else "flat"
        return init_cache(c.num_layers, batch, c.num_kv_heads, c.head_dim, max_len, self.dtype, mesh, rules,
                          layout=layout)

    # ---- forward -------------------------------------------------------------------------------------
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        token_mask: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        mesh: Mesh | None = None,
        rules=None,
        cache_empty: bool = False,
        decode_limit: int | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """tokens, positions, token_mask: [batch, T]. Returns final-normed hidden states [batch, T, hidden]
        and the updated cache. A masked-out token (padding) is never attended to by any other token.

        `cache_empty=True` (static) promises the cache holds nothing yet (a prefill): the tokens then attend
        to each other only, a [T, T] problem, instead of to every slot of the cache ([T, prompt + new tokens]
        scores, which at long generation budgets dwarfs the prompt's own activations). `decode_limit` (static)
        promises that no cache slot at or past it is filled after this call: a one-token call with "dense" decode
        attention then reads only that prefix of the cache (the sampler's decode segments)."""
        c = self.cfg
        B, T = tokens.shape
        if token_mask is None:
            token_mask = jnp.ones((B, T), bool)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        x = with_logical_constraint(x, ("batch", "seq", "embed"), mesh, rules)
        rope = rope_tables(positions, c.head_dim, c.rope_theta)
        plan = plan_attention(token_mask.astype(bool), cache, cache_empty=cache_empty, chunk=c.attention_chunk,
                              cpu_kernel=c.cpu_decode_kernel and (mesh is None or mesh.size == 1),
                              decode=self.decode_kind(cache.max_len, mesh) if cache is not None else "blocks",
                              limit=decode_limit, mesh=mesh, rules=rules)
        lora_scale = (self.lora_cfg.alpha / self.lora_cfg.rank) if self.lora_cfg is not None else 0.0

        def layer(carry, xs):
            x, kc, vc = carry
            p, i = xs
            x, kc, vc = decoder_layer(c, p, x, rope, plan, kc, vc, i, lora_scale=lora_scale, dtype=self.dtype)
            return (with_logical_constraint(x, ("batch", "seq", "embed"), mesh, rules), kc, vc), None

        if c.remat == "full":
            layer = jax.checkpoint(layer)
        elif c.remat == "dots":
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

        kc = None if cache is None else cache.k
        vc = None if cache is None else cache.v
        if c.decode_unroll and plan.kind == "decode":  # one traced layer per layer: static weight/cache slices
            params = self.layer_params()
            for i in range(c.num_layers):
                (x, kc, vc), _ = layer((x, kc, vc), ({k: w[i] for k, w in params.items()}, i))
        else:
            (x, kc, vc), _ = jax.lax.scan(layer, (x, kc, vc), (self.layer_params(), jnp.arange(c.num_layers)))
        x = rms_norm(x, self.final_norm[...].astype(self.dtype), c.rms_norm_eps)
        if cache is not None:
            cache = KVCache(k=kc, v=vc, valid=plan.valid, index=cache.index + T)
        return x, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits for hidden states [..., hidden]. Call on small chunks only at full vocabulary."""
        w = self.head_weight().astype(self.dtype)
        return jnp.einsum("...d,dv->...v", hidden.astype(self.dtype), w, preferred_element_type=jnp.float32)


# ---- the decoder layer -------------------------------------------------------------------------------
def project(name: str, h: jax.Array, p: dict[str, jax.Array], lora_scale: float) -> jax.Array:
    """h @ W for the matrix weight `name` (its einsum in the weight table), plus the LoRA path h @ A @ B * scale
    when `p` holds that matrix's adapters."""
    eq = LAYER_WEIGHTS[name].einsum
    out = jnp.einsum(eq, h, p[name])
    if f"lora_{name}_a" in p:
        a, b = p[f"lora_{name}_a"], p[f"lora_{name}_b"]
        in_sub = eq.split(",")[0][2:]  # contracted input letters, e.g. "d" or "hk"
        out_sub = eq.split("->")[1][2:]
        low = jnp.einsum(f"bt{in_sub},{in_sub}r->btr", h, a)
        out = out + lora_scale * jnp.einsum(f"btr,r{out_sub}->bt{out_sub}", low, b)
    return out


def decoder_layer(cfg: ModelConfig, p: dict[str, jax.Array], x: jax.Array, rope: tuple[jax.Array, jax.Array],
                  plan: AttentionPlan, kc: jax.Array | None, vc: jax.Array | None, layer: jax.Array, *,
                  lora_scale: float = 0.0, dtype=jnp.float32) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """One Qwen3 block, pre-norm: x + o(attention(rope(q_norm(q(n))), rope(k_norm(k(n))), v(n))), n = norm(x), then
    x + down(silu(gate(n)) * up(n)). p: this layer's weights (a slice of the stacked table, LoRA adapters
    included); x: [B, T, hidden]; rope: (cos, sin) [B, T, head_dim]; kc/vc: the stacked KV cache or None (this
    layer's keys and values are written at `plan.index` of layer `layer`). Returns (x, kc, vc)."""
    eps = cfg.rms_norm_eps
    p = {k: v.astype(dtype) for k, v in p.items()}
    h = rms_norm(x, p["attn_norm"], eps)
    q = apply_rope(rms_norm(project("q", h, p, lora_scale), p["q_norm"], eps), *rope)
    k = apply_rope(rms_norm(project("k", h, p, lora_scale), p["k_norm"], eps), *rope)
    v = project("v", h, p, lora_scale)
    o, kc, vc = attend(plan, q, k, v, kc, vc, layer)
    x = x + project("o", o, p, lora_scale)
    h = rms_norm(x, p["mlp_norm"], eps)
    return x + project("down", jax.nn.silu(project("gate", h, p, lora_scale)) * project("up", h, p, lora_scale),
                       p, lora_scale), kc, vc


# ---- building blocks ---------------------------------------------------------------------------------
def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * x32.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, heads, head_dim], rotate-half convention (as in HF Qwen3)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def positions_from_mask(mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """RoPE positions from a (left-)pad mask: pads do not advance the position."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0) + offset


def model_axes(state: nnx.State) -> dict:
    """Nested dict of logical axes matching `nnx.to_pure_dict(state)`."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(var.get_metadata()["logical_axes"])
    return out


def param_count(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def build_model(cfg: ModelConfig, seed: int = 0, lora: LoRAConfig | None = None) -> Qwen3:
    return Qwen3(cfg, rngs=nnx.Rngs(params=seed), lora=lora)


def abstract_model(cfg: ModelConfig, lora: LoRAConfig | None = None) -> Qwen3:
    """A model whose arrays are ShapeDtypeStructs: no memory, for AOT compilation and sharded loading."""
    return nnx.eval_shape(lambda: build_model(cfg, 0, lora))


__all__: Sequence[str] = [
    "Qwen3", "decoder_layer", "project", "build_model", "abstract_model", "model_axes", "positions_from_mask",
    "param_count", "rms_norm", "rope_tables", "apply_rope",
]
