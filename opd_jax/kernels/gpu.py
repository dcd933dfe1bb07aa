"""One-token (decode) attention for NVIDIA GPUs: a Pallas/Triton flash-decoding kernel that reads the model's
stacked KV cache where it lies.

Why not JAX's own `jax.experimental.pallas.ops.gpu.decode_attention.gqa`: the algorithm here is the same
(FlashDecoding: the filled slots are split across programs, each runs an online softmax over `block_k`-slot blocks,
and the partial results are merged with their log-sum-exp weights; Dao et al., "Flash-Decoding for long-context
inference", 2023; the shipped kernel's `attn_forward_kernel` and its final merge), but the shipped kernel takes one
layer's cache `[B, S, KV, D]`. Inside the model's layer scan that is a slice of the stacked cache `[layers, B, KV,
S, D]` at a traced layer, which XLA can be expected to materialize as a copy before a custom call (an operand must
be a buffer of its own; not checked on a GPU: `benchmarks/decode_attention.py` times the shipped kernel on such a
slice): a read and a write of the whole layer (all S slots, filled or not) before the kernel reads it again. At the
AIME budget (5,120 slots, B=32, 8 KV heads, head_dim 128, bf16) that copy alone moves 1.34 GB per layer: 280 us at
an H200's 4.8 TB/s, the whole time issue #16 allows one layer's decode attention. This kernel takes the stacked
cache and the layer index instead and indexes it inside the kernel, so it reads only the filled slots of one layer,
once. It also masks by the cache's `valid` slots rather than a per-row [start, end) window, so it is exact for any
pad pattern, not only left padding. Its other constraints are Triton's: power-of-two block shapes (so `head_dim`
must be a power of two >= 16; query heads per KV head are padded to 16 rows, the smallest `tl.dot` tile) and a
cache length that is a multiple of `block_k` (the cache is allocated in multiples of 64 slots).

`interpret=True` runs the same kernel body through Pallas's interpreter on any backend: the tests use it to
prove the kernel equals dense attention on a CPU. On a GPU the kernel is lowered to Triton by `jax.jit`; here
`jax.export(..., platforms=["cuda"])` checks that it lowers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_K = 64  # cache slots per block: the cache length is a multiple of 64 (attention.DECODE_BLOCK)
MIN_ROWS = 16  # tl.dot needs at least 16 rows: the query heads of one KV head are padded to this
TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call a Pallas/Triton kernel lowers to
TARGET_PROGRAMS = 1024  # split the filled slots until about this many programs run (the H200 has 132 SMs)


def supported(head_dim: int, cache_len: int, block_k: int = BLOCK_K) -> bool:
    """Whether the kernel handles these shapes: a power-of-two head_dim >= 16, a cache length that is a multiple
    of `block_k`."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and cache_len % block_k == 0


def num_splits(batch: int, kv_heads: int, cache_len: int, block_k: int = BLOCK_K) -> int:
    """Splits of the slot axis: enough (batch x kv_heads x splits) programs to fill the GPU, each with at least
    one block."""
    return max(1, min(cache_len // block_k, math.ceil(TARGET_PROGRAMS / (batch * kv_heads))))


def _kernel(layer_ref, n_ref, q_ref, k_ref, v_ref, valid_ref, o_ref, m_ref, l_ref, *, block_k: int,
            split_len: int, groups: int, precision):
    """One program: (row b, KV head h, split j). q_ref [rows, D]: a block over the `groups` query heads of KV
    head h, padded to `rows` (Triton does not bound a block to its array: rows past `groups` are masked on load
    and store); k_ref, v_ref: the whole stacked cache [layers, B, KV, S, D]; valid_ref: [B, S] int8. Writes the
    split's unnormalized output [rows, D], its running max and denominator [rows]."""
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, n = layer_ref[()], n_ref[()]
    rows = q_ref.shape[0]
    real = jnp.arange(rows) < groups
    q = plgpu.load(q_ref, mask=real[:, None], other=0.0)
    start = j * split_len
    end = jnp.minimum(start + split_len, n)
    offsets = jnp.arange(block_k)

    def body(i, carry):
        m, den, acc = carry
        s0 = start + i * block_k
        k = k_ref[layer, b, h, pl.ds(s0, block_k), :]
        v = v_ref[layer, b, h, pl.ds(s0, block_k), :]
        ok = (valid_ref[b, pl.ds(s0, block_k)] != 0) & (s0 + offsets < end)
        s = plgpu.dot(q, k, trans_b=True, precision=precision)  # [rows, block_k] fp32
        s = jnp.where(ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        corr = jnp.exp(m - m_new)
        den = den * corr + p.sum(axis=-1)
        acc = acc * corr[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return m_new, den, acc

    d = q_ref.shape[1]
    init = (jnp.full((rows,), -1e30, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))
    trips = jnp.maximum(0, (end - start + block_k - 1) // block_k)  # 0 for a split past the filled slots
    m, den, acc = jax.lax.fori_loop(0, trips, body, init)
    plgpu.store(o_ref, acc, mask=real[:, None])
    plgpu.store(m_ref, m, mask=real)
    plgpu.store(l_ref, den, mask=real)


@functools.partial(jax.jit, static_argnames=("interpret", "block_k", "splits"))
def decode_attention(q: jax.Array, kc: jax.Array, vc: jax.Array, layer: jax.Array, valid: jax.Array,
                     n_filled: jax.Array, *, interpret: bool = False, block_k: int = BLOCK_K,
                     splits: int | None = None) -> jax.Array:
    """One-token attention over the filled, valid slots of layer `layer` of a stacked cache.

    q: [B, 1, H, D] (any float dtype); kc, vc: [layers, B, KV, S, D], the model's accelerator cache layout
    (slots-major K and V; fp32 or bf16); layer, n_filled: int32 scalars (slots [0, n_filled) are filled);
    valid: [B, S] bool. Returns [B, 1, H, D] in the cache dtype: softmax(q.k / sqrt(D)) over the slots that are
    valid and filled, zeros for a row with none. Scores and the softmax are fp32; the products read the cache
    in its own dtype (fp32 caches use IEEE fp32 products, not TF32).

    Raises ValueError for shapes the kernel does not take (`supported`). `interpret=True` runs it through the
    Pallas interpreter (any backend; slow: tests only)."""
    B, _, H, D = q.shape
    L, _, KV, S, _ = kc.shape
    if not supported(D, S, block_k):
        raise ValueError(f"GPU decode kernel: head_dim {D} must be a power of two >= 16 and the cache length {S} "
                         f"a multiple of {block_k}")
    G = H // KV
    rows = max(MIN_ROWS, pl.next_power_of_2(G))
    splits = num_splits(B, KV, S, block_k) if splits is None else splits
    split_len = -(-(S // block_k) // splits) * block_k
    scale = 1.0 / math.sqrt(D)
    qg = (q.reshape(B, KV, G, D).astype(jnp.float32) * scale).astype(kc.dtype)
    precision = jax.lax.Precision.HIGHEST if kc.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, block_k=block_k, split_len=split_len, groups=G, precision=precision)
    params = {}
    if not interpret:
        params["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
    scalar = pl.BlockSpec((), lambda b, h, j: ())
    full = lambda shape: pl.BlockSpec(shape, lambda b, h, j: (0,) * len(shape))  # noqa: E731  the whole array
    o, m, den = pl.pallas_call(
        kernel,
        grid=(B, KV, splits),
        in_specs=[
            scalar, scalar,
            pl.BlockSpec((None, None, rows, D), lambda b, h, j: (b, h, 0, 0)),  # rows >= G: padded, masked
            full(kc.shape), full(vc.shape), full(valid.shape),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, D), lambda b, h, j: (b, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, KV, splits, G, D), jnp.float32),
            jax.ShapeDtypeStruct((B, KV, splits, G), jnp.float32),
            jax.ShapeDtypeStruct((B, KV, splits, G), jnp.float32),
        ],
        interpret=interpret,
        name="opd_decode_attention",
        **params,
    )(jnp.asarray(layer, jnp.int32), jnp.asarray(n_filled, jnp.int32), qg, kc, vc, valid.astype(jnp.int8))
    # merge the splits (FlashDecoding's last step): weights exp(m_j - max_j m_j); a split that saw no valid slot
    # has l = 0 and adds nothing
    m_all = m.max(axis=2, keepdims=True)
    w = jnp.exp(m - m_all)
    denom = jnp.sum(w * den, axis=2)
    out = jnp.sum(w[..., None] * o, axis=2)
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.reshape(B, 1, H, D).astype(vc.dtype)
