"""Multi-token attention, forward + backward: dense vs chunked (flash-style) vs chunked with causal tiling.

The training forward, the teacher's scoring and the sampler's prefill all run `multi_token_attention` over a
causal, left-padded mask. Dense attention holds [heads, T, T] scores; `chunked_attention` walks the keys a chunk
at a time (O(T * chunk) memory) but still scores every (query, key) block; `causal=True` takes the queries a tile
at a time and visits only the key chunks at or before each tile, about half the blocks. For each length this
times `jax.grad` of a weighted sum of the output (all three gradients), interleaving the variants, and reads the
compiled program's temporary memory from XLA. fp32, one sequence, GQA 8 heads / 2 KV heads, head_dim 64.

    python benchmarks/attention.py                       # T = 1024, 2048; chunk 256; 5 runs
    python benchmarks/attention.py --lengths 4096 --runs 3

Headline lines: `causal_vs_chunked_{T}` and `causal_vs_dense_{T}` (time ratios, > 1 = causal tiling faster),
`temp_mib_{dense,chunked,causal}_{T}`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.models.attention import attention, chunked_attention

H, KV, D = 8, 2, 64


def inputs(T: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(1, T, H, D), jnp.float32)
    k, v = (jnp.asarray(rng.randn(1, T, KV, D), jnp.float32) for _ in range(2))
    valid = np.arange(T) >= T // 16  # a left pad
    mask = jnp.asarray(np.tril(np.ones((T, T), bool))[None] & valid[None, None, :])
    w = jnp.asarray(rng.randn(1, T, H, D) * valid[None, :, None, None], jnp.float32)  # a loss ignores pads
    return q, k, v, mask, w


def grad_fn(kind: str, chunk: int):
    fns = {
        "dense": lambda q, k, v, m: attention(q, k, v, m),
        "chunked": lambda q, k, v, m: chunked_attention(q, k, v, m, chunk),
        "causal": lambda q, k, v, m: chunked_attention(q, k, v, m, chunk, causal=True),
    }
    fn = fns[kind]
    return jax.jit(jax.grad(lambda q, k, v, m, w: jnp.sum(w * fn(q, k, v, m)), argnums=(0, 1, 2)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__} backend={jax.default_backend()}; heads {H}/{KV}, head_dim {D}, chunk {args.chunk}")

    kinds = ("dense", "chunked", "causal")
    headline = []
    for T in args.lengths:
        q, k, v, mask, w = inputs(T)
        fns = {kind: grad_fn(kind, args.chunk) for kind in kinds}
        temp = {kind: fn.lower(q, k, v, mask, w).compile().memory_analysis().temp_size_in_bytes / 2**20
                for kind, fn in fns.items()}
        grads = {kind: jax.block_until_ready(fn(q, k, v, mask, w)) for kind, fn in fns.items()}  # warm-up
        for kind in ("chunked", "causal"):  # same gradients (the weights w skip the pad queries)
            for a, b in zip(grads[kind], grads["dense"], strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3, rtol=1e-3)
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(args.runs):
            for kind, fn in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(fn(q, k, v, mask, w))
                times[kind].append(time.perf_counter() - t)
        med = {kind: statistics.median(ts) for kind, ts in times.items()}
        for kind in kinds:
            print(f"T={T:<6} {kind:<8} {1e3 * med[kind]:9.1f} ms  temp {temp[kind]:8.1f} MiB")
        headline += [f"causal_vs_chunked_{T}: {med['chunked'] / med['causal']:.2f}x",
                     f"causal_vs_dense_{T}: {med['dense'] / med['causal']:.2f}x"]
        headline += [f"temp_mib_{kind}_{T}: {temp[kind]:.1f}" for kind in kinds]
    print()
    print("\n".join(headline))


if __name__ == "__main__":
    main()
