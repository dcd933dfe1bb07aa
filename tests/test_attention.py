"""Chunked (flash-style) attention equals dense attention, values and gradients, and needs far less memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opd_jax.models import attention as attention_module
from opd_jax.models.attention import attention, chunked_attention, multi_token_attention


def inputs(B=2, T=12, S=16, H=4, KV=2, D=8, seed=0, dtype=jnp.float32):
    rng = np.random.RandomState(seed)
    q, k, v = (jnp.asarray(rng.randn(*shape), dtype) for shape in ((B, T, H, D), (B, S, KV, D), (B, S, KV, D)))
    mask = rng.rand(B, T, S) > 0.4
    mask[0, 3] = False  # a query with no valid key (a left pad): both average every value
    mask[1, :, :5] = False  # padded keys
    return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("H,KV", [(4, 4), (4, 2), (6, 2), (4, 1)])
@pytest.mark.parametrize("chunk", [4, 8, 6])  # 6: keys padded to 18, the padding never attended
def test_chunked_equals_dense_values_and_gradients(H, KV, chunk):
    q, k, v, mask = inputs(H=H, KV=KV)
    np.testing.assert_allclose(chunked_attention(q, k, v, mask, chunk), attention(q, k, v, mask), atol=2e-6)
    w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32)

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v)), argnums=(0, 1, 2))(q, k, v)

    dense = grads(lambda q, k, v: attention(q, k, v, mask))
    chunked = grads(lambda q, k, v: chunked_attention(q, k, v, mask, chunk))
    for name, a, b in zip("qkv", chunked, dense, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"d{name}")


def causal_inputs(B=2, T=16, H=4, KV=2, D=8, seed=0):
    """Self-attention inputs whose mask is causal over slots, with left pads and holes, as in training."""
    q, k, v, _ = inputs(B=B, T=T, S=T, H=H, KV=KV, D=D, seed=seed)
    rng = np.random.RandomState(seed + 1)
    valid = rng.rand(B, T) > 0.2
    valid[1, :5] = False  # a left-padded row
    mask = np.tril(np.ones((T, T), bool))[None] & valid[:, None, :]
    return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("H,KV", [(4, 4), (4, 2), (6, 2)])
@pytest.mark.parametrize("chunk", [4, 8, 6])  # 6: queries and keys padded to 18
def test_causal_chunked_equals_dense_values_and_gradients(H, KV, chunk):
    """Causal tiling skips the key chunks after each query tile and still equals dense attention at every query
    that has a valid key (the only outputs anything reads), in values and in all three gradients."""
    q, k, v, mask = causal_inputs(H=H, KV=KV)
    seen = np.asarray(mask.any(-1))  # [B, T]: queries with at least one valid key
    assert not seen.all()
    got = chunked_attention(q, k, v, mask, chunk, causal=True)
    np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(attention(q, k, v, mask))[seen], atol=2e-6)
    w = np.random.RandomState(1).randn(*q.shape) * seen[:, :, None, None]  # the loss reads only seen queries
    w = jnp.asarray(w, jnp.float32)

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v)), argnums=(0, 1, 2))(q, k, v)

    dense = grads(lambda q, k, v: attention(q, k, v, mask))
    causal = grads(lambda q, k, v: chunked_attention(q, k, v, mask, chunk, causal=True))
    for name, a, b in zip("qkv", causal, dense, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"d{name}")


def test_causal_tiling_skips_the_chunks_after_each_tile(monkeypatch):
    """Blocks scored, counted at run time: causal tiling visits n(n+1)/2 (tile, chunk) blocks in the forward and
    as many again in the backward's recompute, where the non-causal path scores all n chunks for every query."""
    q, k, v, mask = causal_inputs(T=32)
    n = 32 // 4
    visits = []
    scores = attention_module._scores

    def counted(*args):
        jax.debug.callback(lambda: visits.append(1))
        return scores(*args)

    monkeypatch.setattr(attention_module, "_scores", counted)
    jax.block_until_ready(chunked_attention(q, k, v, mask, 4, causal=True))
    assert len(visits) == n * (n + 1) // 2
    visits.clear()
    jax.block_until_ready(jax.grad(lambda q: chunked_attention(q, k, v, mask, 4, causal=True).sum())(q))
    assert len(visits) == 2 * n * (n + 1) // 2
    visits.clear()
    jax.block_until_ready(chunked_attention(q, k, v, mask, 4))
    assert len(visits) == n


def test_causal_chunked_sharded_equals_unsharded():
    """Batch over one mesh axis and KV heads over another: values and gradients as on one device."""
    q, k, v, mask = causal_inputs(B=2, H=4, KV=2)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tensor"))
    heads, rows = NamedSharding(mesh, P("fsdp", None, "tensor", None)), NamedSharding(mesh, P("fsdp"))
    w = jnp.asarray(np.random.RandomState(2).randn(*q.shape) * np.asarray(mask.any(-1))[:, :, None, None],
                    jnp.float32)

    def loss(q, k, v, mask, w):
        return jnp.sum(w * chunked_attention(q, k, v, mask, 4, causal=True))

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2))
    want = jax.jit(fn)(q, k, v, mask, w)
    got = jax.jit(fn, in_shardings=(heads, heads, heads, rows, heads))(q, k, v, mask, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_causal_needs_aligned_queries_and_keys():
    q, k, v, mask = inputs(T=12, S=16)
    with pytest.raises(ValueError, match="as many queries as keys"):
        chunked_attention(q, k, v, mask, 4, causal=True)


def test_chunked_bf16_close_to_dense_fp32():
    q, k, v, mask = inputs(T=32, S=64, dtype=jnp.bfloat16)
    got = chunked_attention(q, k, v, mask, 16).astype(jnp.float32)
    want = attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
    assert float(jnp.max(jnp.abs(got - want))) < 3e-2


def test_dispatch_is_dense_unless_the_keys_span_more_than_one_chunk():
    q, k, v, mask = inputs(S=16)

    def traced(chunk: int) -> str:
        return str(jax.make_jaxpr(lambda q, k, v: multi_token_attention(q, k, v, mask, chunk))(q, k, v))

    for chunk in (0, 16, 32):  # off, one chunk, longer than the keys
        assert "custom_vjp" not in traced(chunk), chunk
    for chunk in (8, 6):
        assert "custom_vjp" in traced(chunk), chunk
    with pytest.raises(ValueError, match="attention_chunk must be >= 0"):
        traced(-1)


def test_chunked_gradient_needs_a_fraction_of_the_dense_memory():
    """The compiled backward's temporaries: dense holds [heads, T, S] fp32 scores, probabilities and their
    gradient; chunked holds one [heads, T, chunk] block at a time (XLA's own accounting, at compile time)."""
    B, T, H, D, chunk = 1, 2048, 4, 32, 256
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    mask = jax.ShapeDtypeStruct((B, T, T), jnp.bool_)

    def temp_bytes(fn) -> int:
        loss = lambda q, k, v, m: jnp.sum(fn(q, k, v, m) ** 2)  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    dense = temp_bytes(attention)
    chunked = temp_bytes(lambda q, k, v, m: chunked_attention(q, k, v, m, chunk))
    causal = temp_bytes(lambda q, k, v, m: chunked_attention(q, k, v, m, chunk, causal=True))
    scores = B * H * T * T * 4
    assert dense >= scores, (dense, scores)  # at least one full score tensor
    assert chunked < dense / 4, (chunked, dense)
    assert causal < dense / 4, (causal, dense)  # query tiles: [heads, chunk, chunk] blocks
