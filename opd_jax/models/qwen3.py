"""Qwen3 dense decoder in Flax NNX.

Layers are stored stacked (leading `layers` axis) and run under `lax.scan`, so compile time is flat in
depth. Every weight carries `logical_axes` metadata; `opd_jax.mesh.RULES` maps those to mesh axes.
The forward pass returns final hidden states; logits are a separate `lm_head` step so callers can compute
logprobs in sequence chunks without ever holding [batch, seq, vocab] fp32 logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import Mesh

from opd_jax.config.schema import LoRAConfig, ModelConfig
from opd_jax.kernels import cpu as cpu_kernels
from opd_jax.mesh import with_logical_constraint
from opd_jax.models.attention import multi_token_attention, online_softmax_step

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# name -> (shape builder, logical axes) for the stacked per-layer weights.
_LAYER_WEIGHTS = {
    "attn_norm": (lambda c: (c.hidden_size,), ("norm",)),
    "q": (lambda c: (c.hidden_size, c.num_heads, c.head_dim), ("embed", "heads", "head_dim")),
    "k": (lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim")),
    "v": (lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim")),
    "q_norm": (lambda c: (c.head_dim,), ("head_dim",)),
    "k_norm": (lambda c: (c.head_dim,), ("head_dim",)),
    "o": (lambda c: (c.num_heads, c.head_dim, c.hidden_size), ("heads", "head_dim", "embed")),
    "mlp_norm": (lambda c: (c.hidden_size,), ("norm",)),
    "gate": (lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp")),
    "up": (lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp")),
    "down": (lambda c: (c.intermediate_size, c.hidden_size), ("mlp", "embed")),
}
_NORMS = ("attn_norm", "q_norm", "k_norm", "mlp_norm")
# einsum for each projection, and how many leading input dims the LoRA "A" matrix contracts.
_PROJ = {
    "q": ("btd,dhk->bthk", 1),
    "k": ("btd,dhk->bthk", 1),
    "v": ("btd,dhk->bthk", 1),
    "o": ("bthk,hkd->btd", 2),
    "gate": ("btd,df->btf", 1),
    "up": ("btd,df->btf", 1),
    "down": ("btf,fd->btd", 1),
}


@struct.dataclass
class KVCache:
    """Preallocated attention cache. Rows are left-padded, so every row writes the same slot each step.
    K is stored transposed within each DECODE_BLOCK of slots (head_dim before slots) and V slots-major, so
    both one-token attention products over a block are plain row-major matrix products, and a block of either
    is one contiguous run per (row, kv head), which is what a backend copies when it materializes the slice."""

    k: jax.Array  # [layers, batch, kv_heads, blocks, head_dim, DECODE_BLOCK]
    v: jax.Array  # [layers, batch, kv_heads, slots, head_dim]
    valid: jax.Array  # [batch, slots] bool: slot holds a real (non-pad) token
    index: jax.Array  # int32 scalar: next slot to write

    @property
    def max_len(self) -> int:
        return self.v.shape[3]


CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")  # the V cache; K uses K_CACHE_AXES
K_CACHE_AXES = ("layers", "batch", "kv_heads", "cache_blocks", "head_dim", "cache_seq")
DECODE_BLOCK = 64  # cache slots per block of one-token decode attention; the cache length is a multiple of it


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
        for name, (shape_fn, axes) in _LAYER_WEIGHTS.items():
            shape, axes = (L, *shape_fn(cfg)), ("layers", *axes)
            setattr(self, name, ones(shape, axes) if name in _NORMS else param(shape, axes))
        self.final_norm = ones((cfg.hidden_size,), ("norm",))
        self.lm_head = None if cfg.tie_embeddings else param((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

        if self.lora_cfg is not None:
            r = self.lora_cfg.rank
            for name in self.lora_cfg.targets:
                if name not in _PROJ:
                    raise ValueError(f"lora.targets: unknown module {name!r}; valid: {sorted(_PROJ)}")
                shape_fn, axes = _LAYER_WEIGHTS[name]
                n_in = _PROJ[name][1]
                shape, axes = shape_fn(cfg), tuple(axes)
                a = param((L, *shape[:n_in], r), ("layers", *axes[:n_in], "lora_rank"),
                          std=1.0 / math.sqrt(math.prod(shape[:n_in])), kind=nnx.LoRAParam)
                # B starts at zero, so a fresh adapter leaves the model unchanged.
                b = nnx.LoRAParam(jnp.zeros((L, r, *shape[n_in:]), pdtype),
                                  logical_axes=("layers", "lora_rank", *axes[n_in:]))
                setattr(self, f"lora_{name}_a", a)
                setattr(self, f"lora_{name}_b", b)

    # ---- weights -------------------------------------------------------------------------------------
    def layer_params(self) -> dict[str, jax.Array]:
        p = {name: getattr(self, name)[...] for name in _LAYER_WEIGHTS}
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

    # ---- cache ---------------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, mesh: Mesh | None = None, rules=None) -> KVCache:
        c = self.cfg
        max_len = -(-max_len // DECODE_BLOCK) * DECODE_BLOCK  # extra slots are never valid
        shape = (c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim)
        k_shape = (*shape[:3], max_len // DECODE_BLOCK, c.head_dim, DECODE_BLOCK)
        k = with_logical_constraint(jnp.zeros(k_shape, self.dtype), K_CACHE_AXES, mesh, rules)
        v = with_logical_constraint(jnp.zeros(shape, self.dtype), CACHE_AXES, mesh, rules)
        valid = with_logical_constraint(jnp.zeros((batch, max_len), bool), ("batch", "cache_seq"), mesh, rules)
        return KVCache(k=k, v=v, valid=valid, index=jnp.zeros((), jnp.int32))

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
    ) -> tuple[jax.Array, KVCache | None]:
        """tokens, positions, token_mask: [batch, T]. Returns final-normed hidden states [batch, T, hidden]
        and the updated cache. A masked-out token (padding) is never attended to by any other token.

        `cache_empty=True` (static) promises the cache holds nothing yet (a prefill): the tokens then attend
        to each other only, a [T, T] problem, instead of to every slot of the cache ([T, prompt + new tokens]
        scores, which at long generation budgets dwarfs the prompt's own activations)."""
        c = self.cfg
        B, T = tokens.shape
        if token_mask is None:
            token_mask = jnp.ones((B, T), bool)
        token_mask = token_mask.astype(bool)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        x = with_logical_constraint(x, ("batch", "seq", "embed"), mesh, rules)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)

        if cache is not None:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache.index))
        local = cache is None or (cache_empty and T > 1)  # attend among this call's tokens only
        if local:
            q_slot = k_slot = jnp.arange(T)
            attn_valid = token_mask
        else:
            q_slot = cache.index + jnp.arange(T)
            k_slot = jnp.arange(cache.max_len)
            attn_valid = key_valid
        # [batch, T, keys]: causal over slots, and never attend to a pad slot.
        mask = (k_slot[None, None, :] <= q_slot[None, :, None]) & attn_valid[:, None, :]

        lora_scale = (self.lora_cfg.alpha / self.lora_cfg.rank) if self.lora_cfg is not None else 0.0
        dtype = self.dtype

        def layer(carry, xs):
            x, kc, vc = carry
            p, i = xs
            p = {k: v.astype(dtype) for k, v in p.items()}

            def proj(name, h):
                eq, n_in = _PROJ[name]
                out = jnp.einsum(eq, h, p[name])
                if f"lora_{name}_a" in p:
                    a, b = p[f"lora_{name}_a"], p[f"lora_{name}_b"]
                    in_sub = eq.split(",")[0][2:]  # contracted input letters, e.g. "d" or "hk"
                    low = jnp.einsum(f"bt{in_sub},{in_sub}r->btr", h, a)
                    out_sub = eq.split("->")[1][2:]
                    out = out + lora_scale * jnp.einsum(f"btr,r{out_sub}->bt{out_sub}", low, b)
                return out

            h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
            q = rms_norm(proj("q", h), p["q_norm"], c.rms_norm_eps)
            k = rms_norm(proj("k", h), p["k_norm"], c.rms_norm_eps)
            v = proj("v", h)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if kc is not None:
                kc = write_keys(kc, i, k, cache.index)
                vc = jax.lax.dynamic_update_slice(
                    vc, jnp.swapaxes(v, 1, 2)[None].astype(vc.dtype), (i, 0, 0, cache.index, 0))
            if local:  # no cache, or a prefill into an empty one: slot-aligned and causal
                o = multi_token_attention(q, k, v, mask, c.attention_chunk, causal=True)
            elif T == 1:  # decode: only the filled blocks, straight from the stacked cache
                o = one_token_attention(q, kc, vc, i, key_valid, cache.index + 1,
                                        cpu_kernel=c.cpu_decode_kernel and (mesh is None or mesh.size == 1))
            else:  # a chunk appended to a filled cache
                o = multi_token_attention(q, untile_keys(kc[i]), jnp.swapaxes(vc[i], 1, 2), mask, c.attention_chunk)
            x = x + proj("o", o)
            h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
            x = x + proj("down", jax.nn.silu(proj("gate", h)) * proj("up", h))
            x = with_logical_constraint(x, ("batch", "seq", "embed"), mesh, rules)
            return (x, kc, vc), None

        if c.remat == "full":
            layer = jax.checkpoint(layer)
        elif c.remat == "dots":
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

        kc = None if cache is None else cache.k
        vc = None if cache is None else cache.v
        (x, kc, vc), _ = jax.lax.scan(layer, (x, kc, vc), (self.layer_params(), jnp.arange(c.num_layers)))
        x = rms_norm(x, self.final_norm[...].astype(dtype), c.rms_norm_eps)
        if cache is not None:
            cache = KVCache(k=kc, v=vc, valid=key_valid, index=cache.index + T)
        return x, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits for hidden states [..., hidden]. Call on small chunks only at full vocabulary."""
        w = self.head_weight().astype(self.dtype)
        return jnp.einsum("...d,dv->...v", hidden.astype(self.dtype), w, preferred_element_type=jnp.float32)


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


def untile_keys(k: jax.Array) -> jax.Array:
    """One layer's K cache [B, KV, blocks, D, block] -> [B, slots, KV, D]."""
    B, KV, NB, D, BLK = k.shape
    return jnp.transpose(k, (0, 2, 4, 1, 3)).reshape(B, NB * BLK, KV, D)


def tile_keys(k: jax.Array, block: int = DECODE_BLOCK) -> jax.Array:
    """[B, slots, KV, D] (slots a multiple of `block`) -> the cache's K layout [B, KV, blocks, D, block]."""
    B, S, KV, D = k.shape
    return jnp.transpose(k.reshape(B, S // block, block, KV, D), (0, 3, 1, 4, 2))


def write_keys(kc: jax.Array, layer: jax.Array, k: jax.Array, index: jax.Array) -> jax.Array:
    """Write new keys k [B, T, KV, D] at slots [index, index + T) of layer `layer` of the K cache."""
    B, T, KV, D = k.shape
    BLK = kc.shape[-1]
    k = k.astype(kc.dtype)
    if T == 1:  # decode: one slot of one block, in place
        at = (layer, 0, 0, index // BLK, 0, index % BLK)
        return jax.lax.dynamic_update_slice(kc, k[:, 0][None, :, :, None, :, None], at)
    # prefill or a chunk: the write may span blocks, so rewrite this layer through the flat layout (once)
    flat = jax.lax.dynamic_update_slice(untile_keys(kc[layer]), k, (0, index, 0, 0))
    return jax.lax.dynamic_update_slice(kc, tile_keys(flat, BLK)[None], (layer, 0, 0, 0, 0, 0))


def decode_attention(
    q: jax.Array, kc: jax.Array, vc: jax.Array, layer: jax.Array, valid: jax.Array, n_filled: jax.Array,
) -> jax.Array:
    """One-token attention over the filled cache slots [0, n_filled) only, a block at a time (online softmax),
    so a decode step costs O(current length), not O(cache length), and never copies a whole layer's K/V.
    q: [B, 1, H, D]; kc: [layers, B, KV, S // block, D, block]; vc: [layers, B, KV, S, D]; valid: [B, S]."""
    B, _, H, D = q.shape
    KV, block = kc.shape[2], kc.shape[-1]
    G = H // KV
    qg = (q.reshape(B, KV, G, D).astype(jnp.float32) / math.sqrt(D)).astype(kc.dtype)

    def body(j, carry):
        start = j * block
        kb = jax.lax.dynamic_slice(kc, (layer, 0, 0, j, 0, 0), (1, B, KV, 1, D, block))[0, :, :, 0]
        vb = jax.lax.dynamic_slice(vc, (layer, 0, 0, start, 0), (1, B, KV, block, D))[0]
        ok = jax.lax.dynamic_slice(valid, (0, start), (B, block)) & (start + jnp.arange(block) < n_filled)
        s = jnp.einsum("bkgd,bkds->bkgs", qg, kb, preferred_element_type=jnp.float32)
        s = jnp.where(ok[:, None, None], s, -jnp.inf)
        return online_softmax_step(*carry, s, vb, "bkgs,bksd->bkgd")

    init = (jnp.full((B, KV, G), -1e30, jnp.float32), jnp.zeros((B, KV, G), jnp.float32),
            jnp.zeros((B, KV, G, D), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, (n_filled + block - 1) // block, body, init)
    denom = jnp.where(denom > 0, denom, 1.0)  # a row with no valid key yields zeros, not NaN
    return (acc / denom[..., None]).reshape(B, 1, H, D).astype(vc.dtype)


def one_token_attention(
    q: jax.Array, kc: jax.Array, vc: jax.Array, layer: jax.Array, valid: jax.Array, n_filled: jax.Array, *,
    cpu_kernel: bool,
) -> jax.Array:
    """`decode_attention`, run by the CPU kernel (`opd_jax.kernels.cpu`) if `cpu_kernel` (the caller promises one
    device: the kernel reads whole buffers), the host's default backend is the CPU (a GPU or TPU host never
    builds it), the kernel is built, the cache is fp32 and the program is lowered for a CPU; the pure-JAX path
    everywhere else. A TPU or GPU lowering keeps only the pure-JAX branch."""
    args = (q, kc, vc, layer, valid, n_filled)
    if (cpu_kernel and jax.default_backend() == "cpu" and kc.dtype == jnp.float32 and vc.dtype == jnp.float32
            and cpu_kernels.available()):
        return jax.lax.platform_dependent(*args, cpu=cpu_kernels.decode_attention, default=decode_attention)
    return decode_attention(*args)


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
    "Qwen3", "KVCache", "CACHE_AXES", "K_CACHE_AXES", "build_model", "abstract_model", "model_axes",
    "positions_from_mask", "param_count", "rms_norm", "decode_attention", "tile_keys", "untile_keys",
]
