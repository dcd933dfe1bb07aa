"""Top-k/top-p truncation cost per decode step at Qwen3's vocabulary: partial sort vs full sort, in one run.

`opd_jax.sampling.truncate_logits` keeps a traced top_k in [1, TOP_K_CAP] on a `lax.top_k` path (the kept set
lies inside the top-k); top-p alone, or a larger top_k, sorts the whole vocabulary. This times both paths on
the same [batch, vocab] logits with the AIME eval settings (top_k 20, top_p 0.95), jitted, compile excluded,
median of `--runs` interleaved calls, and checks they keep the same tokens.

    python benchmarks/truncation.py [--batch 32] [--vocab 151936] [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.sampling import TOP_K_CAP, truncate_logits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args(argv)

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, args.vocab)).astype(np.float32))
    k, p = jnp.int32(args.top_k), jnp.float32(args.top_p)
    fn = jax.jit(truncate_logits, static_argnames="cap")
    paths = {"partial": TOP_K_CAP, "full": 0}  # cap=0: always the full sort (the previous behaviour)
    outs = {name: jax.block_until_ready(fn(logits, k, p, cap=cap)) for name, cap in paths.items()}
    assert (np.isfinite(outs["partial"]) == np.isfinite(outs["full"])).all(), "the two paths keep different tokens"
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.runs):
        for name, cap in paths.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(logits, k, p, cap=cap))
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"jax {jax.__version__} backend={jax.default_backend()}; logits [{args.batch}, {args.vocab}], "
          f"top_k {args.top_k}, top_p {args.top_p}, cap {TOP_K_CAP}")
    print(f"partial_sort_ms: {1e3 * med['partial']:.2f}")
    print(f"full_sort_ms: {1e3 * med['full']:.2f}")
    print(f"speedup: {med['full'] / med['partial']:.1f}x")


if __name__ == "__main__":
    main()
