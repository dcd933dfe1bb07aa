"""All of the model's attention: multi-token grouped-query attention (dense, chunked with a flash-style backward,
causal tiling), the KV cache and its layout, one-token decode attention, and the plan that picks among them.

How a forward call attends is decided once per call (`plan_attention`) and applied by every layer (`attend`):
self-attention among the call's tokens (training, teacher scoring, a prefill into an empty cache), one-token
decode against the filled cache slots, or a chunk appended to a filled cache.

Dense attention holds [batch, heads, T, S] fp32 scores (and probabilities, and their gradient in the backward):
at a 5k-token OPD sequence that is ~3.4 GB per sequence per layer for Qwen3-8B, and twice that for a 64-head
teacher. `chunked_attention` walks the keys `chunk` at a time with an online softmax, so the forward keeps only
[batch, heads, T] running statistics plus one [T, chunk] block of scores; its custom VJP saves just the output
and the softmax statistics and recomputes each block's probabilities in the backward (the FlashAttention recurrences,
written in plain JAX so every backend compiles it). Both take the same boolean mask and give the same result:
a query row with no valid key averages every value, exactly as a softmax over `finfo.min` scores does.
With `causal=True` (self-attention over the same slots, as in training, teacher scoring and prefill) the queries
go a tile at a time and each tile skips the key chunks after it: about half the blocks, forward and backward.

One-token decode attention is chosen per program when it is traced (`decode_kind`, from `model.decode_attention`
and the platform of the mesh's devices, so an AOT lowering for a TPU pod on a CPU host gets the TPU path), and the
KV cache is laid out for it (`KVCache`):
- CPU: the stacked cache is read where it lies, a DECODE_BLOCK of slots at a time and only up to the filled length
  (`decode_attention`, a loop whose trip count is the filled length); on a single-device fp32 program the XLA:CPU
  FFI kernel of `opd_jax.kernels.cpu` does the same work. K is tiled per block.
- TPU: one fixed-shape masked attention over a static prefix of the cache (`dense_decode_attention`): no loop
  inside the decode step, and the sampler runs its decode loop in segments (`sampling.decode_segments`), each
  attending over the prefix that covers it, so a step reads O(filled) slots up to the segment size. XLA fuses
  the layer's slice of the stacked cache into the products that read it.
- GPU: the same dense attention for caches of up to GPU_DENSE_MAX_SLOTS slots; above, the Triton flash-decoding
  kernel of `opd_jax.kernels.gpu`, which reads only the filled slots of the layer, in place in the stacked cache.
A data-dependent loop inside the decode step is what GPU and TPU programs must not have: on a GPU its predicate
goes to the host at every iteration, once per layer per token (issue #16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from opd_jax.kernels import cpu as cpu_kernels
from opd_jax.kernels import gpu as gpu_kernels
from opd_jax.mesh import logical_to_spec, with_logical_constraint

_NEG = jnp.finfo(jnp.float32).min  # a masked score: exp underflows to 0 unless the whole row is masked


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Dense grouped-query attention. q: [B, T, H, D]; k, v: [B, S, KV, D]; mask: [B, T, S] bool."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    q = q.reshape(B, T, KV, H // KV, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    scores = jnp.where(mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, H, D)


def multi_token_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunk: int = 0,
                          causal: bool = False) -> jax.Array:
    """`chunked_attention` when there are more than `chunk` > 0 keys, else dense. `causal`: see there."""
    if chunk < 0:
        raise ValueError(f"model.attention_chunk must be >= 0 (0 = dense attention), got {chunk}")
    if 0 < chunk < k.shape[1]:
        return chunked_attention(q, k, v, mask, chunk, causal)
    return attention(q, k, v, mask)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunk: int,
                      causal: bool = False) -> jax.Array:
    """Same result as `attention`, holding O(T * chunk) scores per head instead of O(T * S). Keys are padded to
    a multiple of `chunk`; a padded key scores -inf, below even a masked one, so it never takes part.

    `causal=True` promises that queries and keys are the same slots (T == S) and that `mask` never lets a query
    see a later slot. Queries are then taken a tile of `chunk` at a time and each tile visits only the key chunks
    at or before it, about half the work at long lengths, forward and backward. The one difference from dense:
    a query with no valid key at all (a pad) averages the values of the chunks its tile visits, not of every
    key; such an output is never attended to, so valid positions see identical results."""
    S = k.shape[1]
    pad = -S % chunk
    if causal and q.shape[1] != S:
        raise ValueError(f"causal chunked attention needs as many queries as keys, got {q.shape[1]} and {S}")
    if pad:
        k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
        mask = jnp.pad(mask, ((0, 0), (0, pad if causal else 0), (0, pad)))
    if not causal:
        return _chunked_attention(q, k, v, mask, chunk, S if pad else None)
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else q
    return _causal_chunked_attention(q, k, v, mask, chunk, S if pad else None)[:, :S]


def _chunks(x: jax.Array, axis: int, chunk: int) -> jax.Array:
    """Split `axis` into [n_chunks, ...] leading chunks of `chunk`: the scan's xs."""
    n = x.shape[axis] // chunk
    x = x.reshape(*x.shape[:axis], n, chunk, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _scores(qg: jax.Array, kc: jax.Array, mc: jax.Array, j: jax.Array, n_keys: int | None) -> jax.Array:
    """qg [B, T, KV, G, D] (pre-scaled), chunk j's kc [B, C, KV, D] and mc [B, T, C] -> masked fp32 scores
    [B, KV, G, T, C]; a padding key (index >= n_keys; None: no padding) scores -inf."""
    C = kc.shape[1]
    s = jnp.einsum("btkgd,bckd->bkgtc", qg, kc, preferred_element_type=jnp.float32)
    s = jnp.where(mc[:, None, None], s, _NEG)
    if n_keys is None:
        return s
    return jnp.where(j * C + jnp.arange(C) < n_keys, s, -jnp.inf)


def online_softmax_step(m, denom, acc, s: jax.Array, v: jax.Array, pv: str):
    """Fold one block of scores s [..., C] and its values into the running max m, denominator and weighted sum
    acc of an online softmax; `pv` is the einsum of probabilities with values."""
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    denom = denom * corr + p.sum(-1)
    acc = acc * corr[..., None] + jnp.einsum(pv, p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, denom, acc


def _forward(q, k, v, mask, chunk, n_keys):
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    qg = (q.reshape(B, T, KV, G, D).astype(jnp.float32) / math.sqrt(D)).astype(q.dtype)

    def body(carry, xs):
        j, kc, vc, mc = xs
        return online_softmax_step(*carry, _scores(qg, kc, mc, j, n_keys), vc, "bkgtc,bckd->bkgtd"), None

    init = (jnp.full((B, KV, G, T), -jnp.inf, jnp.float32), jnp.zeros((B, KV, G, T), jnp.float32),
            jnp.zeros((B, KV, G, T, D), jnp.float32))
    (m, denom, acc), _ = jax.lax.scan(body, init, _chunked_xs(k, v, mask, chunk))
    inv_denom = 1.0 / denom  # denom >= 1: the row maximum contributes exp(0)
    out = jnp.moveaxis(acc * inv_denom[..., None], 3, 1).reshape(B, T, H, D).astype(v.dtype)
    # (m, 1/denom) rather than a log-sum-exp: m + log(denom) rounds to m when every key is masked (m = finfo.min)
    return out, (m, inv_denom)


def _chunked_xs(k, v, mask, chunk):
    """The scan's per-chunk inputs: (chunk index, keys, values, mask columns)."""
    return jnp.arange(k.shape[1] // chunk), _chunks(k, 1, chunk), _chunks(v, 1, chunk), _chunks(mask, 2, chunk)


def _block_grads(qg, kc, vc, mc, j, n_keys, m, inv_denom, do, delta):
    """One (query tile, key chunk j) block of the backward: probabilities recomputed from the saved (m, 1/denom),
    then (dq for the tile [B, T, KV, G, D], dk and dv for the chunk [B, C, KV, D]), all fp32."""
    p = jnp.exp(_scores(qg, kc, mc, j, n_keys) - m[..., None]) * inv_denom[..., None]  # [B, KV, G, T, C]
    dv = jnp.einsum("bkgtc,bkgtd->bckd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgtd,bckd->bkgtc", do, vc, preferred_element_type=jnp.float32)
    ds = jnp.where(mc[:, None, None], p * (dp - delta[..., None]), 0.0)  # no gradient through a masked score
    dq = jnp.einsum("bkgtc,bckd->btkgd", ds.astype(kc.dtype), kc, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgtc,btkgd->bckd", ds.astype(qg.dtype), qg, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _bwd_inputs(q, k, out, d_out):
    """(pre-scaled grouped queries [B, T, KV, G, D], dO [B, KV, G, T, D], delta [B, KV, G, T], scale)."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    scale = 1.0 / math.sqrt(D)
    qg = (q.reshape(B, T, KV, G, D).astype(jnp.float32) * scale).astype(q.dtype)
    do = jnp.moveaxis(d_out.reshape(B, T, KV, G, D), 1, 3)
    # sum_d dO * O: the softmax Jacobian's correction term, per query
    delta = jnp.sum(do.astype(jnp.float32) * jnp.moveaxis(out.reshape(B, T, KV, G, D), 1, 3), axis=-1)
    return qg, do, delta, scale


def _bwd(chunk, n_keys, res, d_out):
    q, k, v, mask, out, (m, inv_denom) = res
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    qg, do, delta, scale = _bwd_inputs(q, k, out, d_out)

    def body(dq, xs):
        j, kc, vc, mc = xs
        dq_j, dk, dv = _block_grads(qg, kc, vc, mc, j, n_keys, m, inv_denom, do, delta)
        return dq + dq_j, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros((B, T, KV, G, D), jnp.float32), _chunked_xs(k, v, mask, chunk))
    dq = (dq * scale).reshape(B, T, H, D).astype(q.dtype)
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)  # noqa: E731  [n, B, C, KV, D] -> [B, S, KV, D]
    return dq, unchunk(dk), unchunk(dv), None




# ---- causal: query tiles visit only the key chunks at or before them ----------------------------------------------
def _causal_forward(q, k, v, mask, chunk, n_keys):
    B, T, H, D = q.shape  # T == S, a multiple of chunk
    KV = k.shape[2]
    G = H // KV
    C = chunk
    qg = (q.reshape(B, T, KV, G, D).astype(jnp.float32) / math.sqrt(D)).astype(q.dtype)

    def tile(xs):
        i, qi, mi = xs  # qi [B, C, KV, G, D]; mi [B, C, S]: this tile's rows of the mask

        def body(j, carry):
            kc, vc = (jax.lax.dynamic_slice_in_dim(x, j * C, C, axis=1) for x in (k, v))
            mc = jax.lax.dynamic_slice_in_dim(mi, j * C, C, axis=2)
            return online_softmax_step(*carry, _scores(qi, kc, mc, j, n_keys), vc, "bkgtc,bckd->bkgtd")

        init = (jnp.full((B, KV, G, C), -jnp.inf, jnp.float32), jnp.zeros((B, KV, G, C), jnp.float32),
                jnp.zeros((B, KV, G, C, D), jnp.float32))
        m, denom, acc = jax.lax.fori_loop(0, i + 1, body, init)  # chunks j <= i only
        inv_denom = 1.0 / denom
        return jnp.moveaxis(acc * inv_denom[..., None], 3, 1), m, inv_denom  # [B, C, KV, G, D]

    outs, m, inv_denom = jax.lax.map(tile, (jnp.arange(T // C), _chunks(qg, 1, C), _chunks(mask, 1, C)))
    out = jnp.moveaxis(outs, 0, 1).reshape(B, T, H, D).astype(v.dtype)
    untile = lambda x: jnp.moveaxis(x, 0, 3).reshape(B, KV, G, T)  # noqa: E731  [n, B, KV, G, C] -> [B, KV, G, T]
    return out, (untile(m), untile(inv_denom))


def _causal_bwd(chunk, n_keys, res, d_out):
    """Key chunk j collects dk, dv from the query tiles i >= j; each tile's dq accumulates in place."""
    q, k, v, mask, out, (m, inv_denom) = res
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    C = chunk
    qg, do, delta, scale = _bwd_inputs(q, k, out, d_out)
    rows = lambda x, i: jax.lax.dynamic_slice_in_dim(x, i * C, C, axis=3)  # noqa: E731  query tile of [B,KV,G,T..]

    def key_chunk(dq, xs):
        j, kc, vc = xs

        def body(i, carry):
            dq, dk, dv = carry
            qi = jax.lax.dynamic_slice_in_dim(qg, i * C, C, axis=1)
            mc = jax.lax.dynamic_slice(mask, (0, i * C, j * C), (B, C, C))
            dq_i, dk_i, dv_i = _block_grads(qi, kc, vc, mc, j, n_keys, rows(m, i), rows(inv_denom, i), rows(do, i),
                                            rows(delta, i))
            dq = jax.lax.dynamic_update_slice_in_dim(dq, jax.lax.dynamic_slice_in_dim(dq, i * C, C, 1) + dq_i,
                                                     i * C, axis=1)
            return dq, dk + dk_i, dv + dv_i

        zeros = jnp.zeros((B, C, KV, D), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(j, T // C, body, (dq, zeros, zeros))  # tiles i >= j only
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(key_chunk, jnp.zeros((B, T, KV, G, D), jnp.float32),
                                (jnp.arange(T // C), _chunks(k, 1, C), _chunks(v, 1, C)))
    dq = (dq * scale).reshape(B, T, H, D).astype(q.dtype)
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)  # noqa: E731  [n, B, C, KV, D] -> [B, S, KV, D]
    return dq, unchunk(dk), unchunk(dv), None


def _flash(forward, backward):
    """A custom-VJP attention(q, k, v, mask, chunk, n_keys) from `forward` -> (out, softmax stats) and
    `backward(chunk, n_keys, residuals, d_out)`: the residuals are the inputs, the output and the stats only."""

    @partial(jax.custom_vjp, nondiff_argnums=(4, 5))
    def fn(q, k, v, mask, chunk: int, n_keys: int | None):
        return forward(q, k, v, mask, chunk, n_keys)[0]

    def fwd(q, k, v, mask, chunk, n_keys):
        out, stats = forward(q, k, v, mask, chunk, n_keys)
        return out, (q, k, v, mask, out, stats)

    fn.defvjp(fwd, backward)
    return fn


_chunked_attention = _flash(_forward, _bwd)
_causal_chunked_attention = _flash(_causal_forward, _causal_bwd)


# ---- the KV cache and one-token decode attention ---------------------------------------------------------------
@struct.dataclass
class KVCache:
    """Preallocated attention cache. Rows are left-padded, so every row writes the same slot each step.

    Two layouts of K, fixed when the cache is made (`init_cache`) by the decode attention that will read it
    (`decode_kind`):
    - "tiled" (CPU: the block loop and the XLA:CPU kernel): K stored transposed within each DECODE_BLOCK of slots
      (head_dim before slots), so both one-token products over a block are plain row-major matrix products and a
      block is one contiguous run per (row, kv head), which is what XLA:CPU copies when it materializes a slice.
    - "flat" (GPU and TPU: dense attention over a static prefix, the GPU kernel): K slots-major like V, which is
      what a fixed-shape einsum over a prefix of slots and the kernel's [block, head_dim] loads want (a 64-slot
      minor dimension would also be padded to 128 lanes on a TPU).
    V is slots-major in both."""

    k: jax.Array  # tiled: [layers, batch, kv_heads, blocks, head_dim, DECODE_BLOCK]; flat: as v
    v: jax.Array  # [layers, batch, kv_heads, slots, head_dim]
    valid: jax.Array  # [batch, slots] bool: slot holds a real (non-pad) token
    index: jax.Array  # int32 scalar: next slot to write

    @property
    def max_len(self) -> int:
        return self.v.shape[3]

    @property
    def layout(self) -> str:
        return "tiled" if self.k.ndim == 6 else "flat"


CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")  # V, and K in the flat layout
K_CACHE_AXES = ("layers", "batch", "kv_heads", "cache_blocks", "head_dim", "cache_seq")  # K, tiled layout
DECODE_BLOCK = 64  # cache slots per block of one-token decode attention; the cache length is a multiple of it

# One-token decode attention, per program (`decode_kind`): "blocks" (the pure-JAX block loop over the filled
# blocks, tiled K; on a one-device fp32 CPU program the XLA:CPU kernel), "dense" (one fixed-shape masked attention
# over a static prefix of the cache: the whole cache, or a decode segment's prefix), "pallas" (the Triton
# flash-decoding kernel of `opd_jax.kernels.gpu` on a GPU; the Pallas interpreter elsewhere, for tests).
DECODE_KINDS = ("auto", "blocks", "dense", "pallas")
# "auto" on a GPU: dense attention up to this many cache slots, the kernel above. Dense reads every slot and at
# 384 slots measured 5x the time to read them on an H200 (issue #16: 54 us vs ~11 us); the kernel reads the
# filled slots once. Until the GPU benchmark (`benchmarks/gpu.sh`) says otherwise, only tiny caches stay dense.
GPU_DENSE_MAX_SLOTS = 256


def target_platform(mesh: Mesh | None = None) -> str:
    """The platform a program is being built for: that of the mesh's devices (abstract TPU devices when
    `opd-jax compile` lowers for a pod from a CPU host), else the default backend. "cpu", "gpu" or "tpu"."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def decode_kind(requested: str, platform: str, head_dim: int, cache_len: int) -> str:
    """The decode attention a program uses: `requested` (model.decode_attention) unless "auto", which is
    "blocks" on a CPU, "dense" on a TPU, and on a GPU "dense" for caches of up to GPU_DENSE_MAX_SLOTS slots and
    "pallas" above (when the kernel takes the shapes: `kernels.gpu.supported`). "pallas" where the kernel does
    not take the shapes falls back to "dense". ValueError for an unknown kind."""
    if requested not in DECODE_KINDS:
        raise ValueError(f"model.decode_attention must be one of {DECODE_KINDS}, got {requested!r}")
    kind = requested
    if kind == "auto":
        kind = {"cpu": "blocks", "tpu": "dense"}.get(platform, "pallas")
        if kind == "pallas" and cache_len <= GPU_DENSE_MAX_SLOTS:
            kind = "dense"
    if kind == "pallas" and not gpu_kernels.supported(head_dim, _round_up(cache_len, DECODE_BLOCK)):
        kind = "dense"
    return kind


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def init_cache(num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int, dtype,
               mesh: Mesh | None = None, rules=None, layout: str = "tiled") -> KVCache:
    """An empty cache of at least `max_len` slots (rounded up to a multiple of DECODE_BLOCK; extra slots are never
    valid) in `layout` ("tiled" or "flat", see `KVCache`), sharded by the logical axes CACHE_AXES / K_CACHE_AXES
    when a mesh is given."""
    if layout not in ("tiled", "flat"):
        raise ValueError(f"cache layout must be 'tiled' or 'flat', got {layout!r}")
    max_len = _round_up(max_len, DECODE_BLOCK)
    shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
    if layout == "tiled":
        k_shape = (*shape[:3], max_len // DECODE_BLOCK, head_dim, DECODE_BLOCK)
        k = with_logical_constraint(jnp.zeros(k_shape, dtype), K_CACHE_AXES, mesh, rules)
    else:
        k = with_logical_constraint(jnp.zeros(shape, dtype), CACHE_AXES, mesh, rules)
    v = with_logical_constraint(jnp.zeros(shape, dtype), CACHE_AXES, mesh, rules)
    valid = with_logical_constraint(jnp.zeros((batch, max_len), bool), ("batch", "cache_seq"), mesh, rules)
    return KVCache(k=k, v=v, valid=valid, index=jnp.zeros((), jnp.int32))


def untile_keys(k: jax.Array) -> jax.Array:
    """One layer's K cache [B, KV, blocks, D, block] -> [B, slots, KV, D]."""
    B, KV, NB, D, BLK = k.shape
    return jnp.transpose(k, (0, 2, 4, 1, 3)).reshape(B, NB * BLK, KV, D)


def tile_keys(k: jax.Array, block: int = DECODE_BLOCK) -> jax.Array:
    """[B, slots, KV, D] (slots a multiple of `block`) -> the cache's K layout [B, KV, blocks, D, block]."""
    B, S, KV, D = k.shape
    return jnp.transpose(k.reshape(B, S // block, block, KV, D), (0, 3, 1, 4, 2))


def layer_keys(kc: jax.Array, layer: jax.Array) -> jax.Array:
    """Layer `layer` of a stacked K cache (either layout) as [B, slots, KV, D]."""
    return untile_keys(kc[layer]) if kc.ndim == 6 else jnp.swapaxes(kc[layer], 1, 2)


def write_keys(kc: jax.Array, layer: jax.Array, k: jax.Array, index: jax.Array) -> jax.Array:
    """Write new keys k [B, T, KV, D] at slots [index, index + T) of layer `layer` of the K cache (either
    layout)."""
    B, T, KV, D = k.shape
    k = k.astype(kc.dtype)
    if kc.ndim == 5:  # flat: slots-major, like V
        return jax.lax.dynamic_update_slice(kc, jnp.swapaxes(k, 1, 2)[None], (layer, 0, 0, index, 0))
    BLK = kc.shape[-1]
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
    q: [B, 1, H, D]; kc: [layers, B, KV, S // block, D, block] (tiled); vc: [layers, B, KV, S, D]; valid: [B, S].

    The loop's trip count depends on n_filled, a traced value: XLA:CPU runs it as a plain loop, but on a GPU
    such a while loop sends its predicate to the host every iteration (issue #16: 6.86 ms per decode step
    against 3.61 ms for dense attention on an H200), so GPU and TPU programs use `dense_decode_attention` or
    the GPU kernel instead (`decode_kind`)."""
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


def dense_decode_attention(
    q: jax.Array, kc: jax.Array, vc: jax.Array, layer: jax.Array, valid: jax.Array, n_filled: jax.Array,
    limit: int | None = None,
) -> jax.Array:
    """One-token attention as one fixed-shape masked product over the first `limit` slots of layer `layer`
    (default: the whole cache): no loop, so nothing in it waits on a traced trip count. The caller promises that
    no slot at or past `limit` is filled (the sampler's decode segments: `sampling.decode_segments`), so the
    work is O(limit) and tracks the filled length up to the segment size. q: [B, 1, H, D]; kc, vc: [layers, B,
    KV, S, D] (flat layout); valid: [B, S]; slots at or past n_filled are masked. Returns [B, 1, H, D], zeros
    for a row with no valid key (as `decode_attention`). fp32 scores and softmax."""
    B, _, H, D = q.shape
    L, _, KV, S, _ = kc.shape
    G = H // KV
    n = S if limit is None else min(_round_up(limit, DECODE_BLOCK), S)
    k = jax.lax.dynamic_slice(kc, (layer, 0, 0, 0, 0), (1, B, KV, n, D))[0]
    v = jax.lax.dynamic_slice(vc, (layer, 0, 0, 0, 0), (1, B, KV, n, D))[0]
    qg = (q.reshape(B, KV, G, D).astype(jnp.float32) / math.sqrt(D)).astype(kc.dtype)
    ok = valid[:, :n] & (jnp.arange(n) < n_filled)
    s = jnp.einsum("bkgd,bksd->bkgs", qg, k, preferred_element_type=jnp.float32)
    s = jnp.where(ok[:, None, None], s, -jnp.inf)
    m = jnp.maximum(s.max(-1, keepdims=True), -1e30)  # finite even for a row with no valid key
    p = jnp.exp(s - m)
    denom = p.sum(-1)
    out = jnp.einsum("bkgs,bksd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.reshape(B, 1, H, D).astype(vc.dtype)


def gpu_kernel_attention(
    q: jax.Array, kc: jax.Array, vc: jax.Array, layer: jax.Array, valid: jax.Array, n_filled: jax.Array,
    mesh: Mesh | None = None, rules=None,
) -> jax.Array:
    """`dense_decode_attention`'s result by the Triton flash-decoding kernel (`opd_jax.kernels.gpu`), which
    reads only the filled slots of layer `layer`, in place in the stacked cache: the kernel on a CUDA or ROCm
    lowering, the same kernel body through the Pallas interpreter on any other (tests). Under a mesh it runs per
    shard (`shard_map`) over the cache's batch and KV-head shardings, since GSPMD cannot split a custom call."""

    def run(q, kc, vc, layer, valid, n_filled):
        gpu = partial(gpu_kernels.decode_attention, interpret=False)
        interp = partial(gpu_kernels.decode_attention, interpret=True)
        return jax.lax.platform_dependent(q, kc, vc, layer, valid, n_filled, cuda=gpu, rocm=gpu, default=interp)

    if mesh is None or mesh.size == 1:
        return run(q, kc, vc, layer, valid, n_filled)
    from jax.sharding import PartitionSpec

    cache = logical_to_spec(CACHE_AXES, kc.shape, mesh, rules)
    rows, heads = cache[1], cache[2]
    return jax.shard_map(
        run, mesh=mesh,
        in_specs=(PartitionSpec(rows, None, heads, None), cache, cache, PartitionSpec(), PartitionSpec(rows, None),
                  PartitionSpec()),
        out_specs=PartitionSpec(rows, None, heads, None), check_vma=False,
    )(q, kc, vc, layer, valid, n_filled)


def one_token_attention(
    q: jax.Array, kc: jax.Array, vc: jax.Array, layer: jax.Array, valid: jax.Array, n_filled: jax.Array, *,
    cpu_kernel: bool, kind: str = "blocks", limit: int | None = None, mesh: Mesh | None = None, rules=None,
) -> jax.Array:
    """Decode attention of kind `kind` (see `decode_kind`; the cache layout must match: "blocks" reads a tiled
    K, the others a flat one). "blocks": `decode_attention`, run by the CPU kernel (`opd_jax.kernels.cpu`) if
    `cpu_kernel` (the caller promises one device: the kernel reads whole buffers), the host's default backend is
    the CPU (a GPU or TPU host never builds it), the kernel is built, the cache is fp32 and the program is lowered
    for a CPU; the pure-JAX block loop everywhere else (a TPU or GPU lowering keeps only that branch). "dense":
    `dense_decode_attention` over the first `limit` slots. "pallas": `gpu_kernel_attention`."""
    args = (q, kc, vc, layer, valid, n_filled)
    if kind == "dense":
        return dense_decode_attention(*args, limit=limit)
    if kind == "pallas":
        return gpu_kernel_attention(*args, mesh=mesh, rules=rules)
    if kind != "blocks":
        raise ValueError(f"unknown decode attention {kind!r}")
    if (cpu_kernel and jax.default_backend() == "cpu" and kc.dtype == jnp.float32 and vc.dtype == jnp.float32
            and cpu_kernels.available()):
        return jax.lax.platform_dependent(*args, cpu=cpu_kernels.decode_attention, default=decode_attention)
    return decode_attention(*args)


# ---- how one forward call attends ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionPlan:
    """How every layer of one forward call attends, decided once per call by `plan_attention`.

    kind: "self" (no cache, or a prefill into an empty cache: the call's tokens attend to each other, causal and
    slot-aligned), "decode" (one token against the filled cache slots) or "append" (a chunk of tokens against
    a filled cache)."""

    kind: str
    mask: jax.Array | None  # [B, T, keys] bool ("self", "append"): causal over slots and never a pad slot
    valid: jax.Array | None  # [B, S] bool: the cache's valid slots after this call's writes (cache kinds)
    index: jax.Array | None  # int32: the first cache slot this call writes
    chunk: int = 0  # model.attention_chunk: chunked attention over more keys than this
    cpu_kernel: bool = False  # decode may use the XLA:CPU kernel (the caller promises one device)
    decode: str = "blocks"  # the decode attention ("blocks" | "dense" | "pallas"; see `decode_kind`)
    limit: int | None = None  # "dense" decode: no slot at or past this is filled (a decode segment's prefix)
    mesh: Mesh | None = None  # the program's mesh ("pallas" runs per shard)
    rules: dict | None = None  # its logical-axis rules


def plan_attention(token_mask: jax.Array, cache: KVCache | None, *, cache_empty: bool = False, chunk: int = 0,
                   cpu_kernel: bool = False, decode: str = "blocks", limit: int | None = None,
                   mesh: Mesh | None = None, rules=None) -> AttentionPlan:
    """The `AttentionPlan` of a call with tokens of `token_mask` [B, T] (False: a pad, never attended to).
    `decode`: the decode attention for a one-token call (`decode_kind`); a tiled cache is always read by
    "blocks" and a flat one never is ("dense" instead)."""
    T = token_mask.shape[1]
    if cache is not None:
        decode = "blocks" if cache.layout == "tiled" else ("dense" if decode == "blocks" else decode)
    extra = dict(chunk=chunk, cpu_kernel=cpu_kernel, decode=decode, limit=limit, mesh=mesh, rules=rules)
    if cache is None or (cache_empty and T > 1):  # attend among this call's tokens only
        slots = jnp.arange(T)
        mask = (slots[None, None, :] <= slots[None, :, None]) & token_mask[:, None, :]
        valid = None if cache is None else jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache.index))
        return AttentionPlan("self", mask, valid, None if cache is None else cache.index, **extra)
    valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache.index))
    if T == 1:
        return AttentionPlan("decode", None, valid, cache.index, **extra)
    q_slot, k_slot = cache.index + jnp.arange(T), jnp.arange(cache.max_len)
    mask = (k_slot[None, None, :] <= q_slot[None, :, None]) & valid[:, None, :]
    return AttentionPlan("append", mask, valid, cache.index, **extra)


def attend(plan: AttentionPlan, q: jax.Array, k: jax.Array, v: jax.Array, kc: jax.Array | None,
           vc: jax.Array | None, layer: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """One layer's attention under `plan`: q [B, T, H, D], k and v [B, T, KV, D]. With a cache (kc, vc: the
    stacked K and V caches), this call's keys and values are first written at slots [plan.index, plan.index + T)
    of layer `layer`. Returns (output [B, T, H, D], kc, vc)."""
    if kc is not None:
        kc = write_keys(kc, layer, k, plan.index)
        vc = jax.lax.dynamic_update_slice(vc, jnp.swapaxes(v, 1, 2)[None].astype(vc.dtype),
                                          (layer, 0, 0, plan.index, 0))
    if plan.kind == "self":
        return multi_token_attention(q, k, v, plan.mask, plan.chunk, causal=True), kc, vc
    if plan.kind == "decode":  # only the filled slots (or a static prefix covering them), from the stacked cache
        out = one_token_attention(q, kc, vc, layer, plan.valid, plan.index + 1, cpu_kernel=plan.cpu_kernel,
                                  kind=plan.decode, limit=plan.limit, mesh=plan.mesh, rules=plan.rules)
        return out, kc, vc
    return multi_token_attention(q, layer_keys(kc, layer), jnp.swapaxes(vc[layer], 1, 2), plan.mask,
                                 plan.chunk), kc, vc
