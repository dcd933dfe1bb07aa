"""Multi-token grouped-query attention: dense, and chunked over keys with a flash-style backward.

Dense attention holds [batch, heads, T, S] fp32 scores (and probabilities, and their gradient in the backward):
at a 5k-token OPD sequence that is ~3.4 GB per sequence per layer for Qwen3-8B, and twice that for a 64-head
teacher. `chunked_attention` walks the keys `chunk` at a time with an online softmax, so the forward keeps only
[batch, heads, T] running statistics plus one [T, chunk] block of scores; its custom VJP saves just the output
and the softmax statistics and recomputes each block's probabilities in the backward (the FlashAttention recurrences,
written in plain JAX so every backend compiles it). Both take the same boolean mask and give the same result:
a query row with no valid key averages every value, exactly as a softmax over `finfo.min` scores does.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

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


def multi_token_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunk: int = 0) -> jax.Array:
    """`chunked_attention` when there are more than `chunk` > 0 keys, else dense."""
    if chunk < 0:
        raise ValueError(f"model.attention_chunk must be >= 0 (0 = dense attention), got {chunk}")
    if 0 < chunk < k.shape[1]:
        return chunked_attention(q, k, v, mask, chunk)
    return attention(q, k, v, mask)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunk: int) -> jax.Array:
    """Same result as `attention`, holding O(T * chunk) scores per head instead of O(T * S). Keys are padded to
    a multiple of `chunk`; a padded key scores -inf, below even a masked one, so it never takes part."""
    S = k.shape[1]
    pad = -S % chunk
    if pad:
        k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))
    return _chunked_attention(q, k, v, mask, chunk, S if pad else None)


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


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_attention(q, k, v, mask, chunk: int, n_keys: int | None):
    return _forward(q, k, v, mask, chunk, n_keys)[0]


def _fwd(q, k, v, mask, chunk, n_keys):
    out, stats = _forward(q, k, v, mask, chunk, n_keys)
    return out, (q, k, v, mask, out, stats)


def _bwd(chunk, n_keys, res, d_out):
    q, k, v, mask, out, (m, inv_denom) = res
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    scale = 1.0 / math.sqrt(D)
    qg = (q.reshape(B, T, KV, G, D).astype(jnp.float32) * scale).astype(q.dtype)
    do = jnp.moveaxis(d_out.reshape(B, T, KV, G, D), 1, 3)  # [B, KV, G, T, D]
    # sum_d dO * O: the softmax Jacobian's correction term, per query
    delta = jnp.sum(do.astype(jnp.float32) * jnp.moveaxis(out.reshape(B, T, KV, G, D), 1, 3), axis=-1)

    def body(dq, xs):
        j, kc, vc, mc = xs
        p = jnp.exp(_scores(qg, kc, mc, j, n_keys) - m[..., None]) * inv_denom[..., None]  # [B, KV, G, T, C]
        dv = jnp.einsum("bkgtc,bkgtd->bckd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgtd,bckd->bkgtc", do, vc, preferred_element_type=jnp.float32)
        ds = jnp.where(mc[:, None, None], p * (dp - delta[..., None]), 0.0)  # no gradient through a masked score
        dq = dq + jnp.einsum("bkgtc,bckd->btkgd", ds.astype(kc.dtype), kc, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkgtc,btkgd->bckd", ds.astype(qg.dtype), qg, preferred_element_type=jnp.float32)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros((B, T, KV, G, D), jnp.float32), _chunked_xs(k, v, mask, chunk))
    dq = (dq * scale).reshape(B, T, H, D).astype(q.dtype)
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)  # noqa: E731  [n, B, C, KV, D] -> [B, S, KV, D]
    return dq, unchunk(dk), unchunk(dv), None


_chunked_attention.defvjp(_fwd, _bwd)
