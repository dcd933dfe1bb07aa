"""Top-k/top-p truncation cost per decode step at Qwen3's vocabulary: the shortcuts vs the full sort, in one run.

`opd_jax.sampling.truncate_logits` keeps a traced top_k in [1, TOP_K_CAP] on a `lax.top_k` path (the kept set
lies inside the top-k), and top-p alone first looks for its nucleus among the TOP_P_CANDIDATES largest logits
(falling back to the full sort if they hold less than top_p of the mass); anything else sorts the whole
vocabulary. This times each shortcut against the full sort on the same [batch, vocab] logits, jitted, compile
excluded, median of `--runs` interleaved calls, and checks they keep the same tokens:
  * top-k 20 + top-p 0.95 (the AIME eval settings) on standard-normal logits;
  * top-p 0.95 alone on logits scaled by `--peak` (5: a nucleus of tens of tokens, as a trained LM's usually is).

    python benchmarks/truncation.py [--batch 32] [--vocab 151936] [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.sampling import TOP_K_CAP, TOP_P_CANDIDATES, truncate_logits


def time_paths(fn, runs: int, paths: dict[str, dict], *args) -> dict[str, float]:
    """Median seconds per call of each path (keyword arguments of `fn`); checks they keep the same tokens."""
    outs = {name: np.isfinite(jax.block_until_ready(fn(*args, **kw))) for name, kw in paths.items()}
    first, *rest = outs.values()
    assert all((first == o).all() for o in rest), "the paths keep different tokens"
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(runs):
        for name, kw in paths.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args, **kw))
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--peak", type=float, default=5.0, help="logit scale for the top-p-alone setting")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(args.batch, args.vocab)).astype(np.float32))
    k, p = jnp.int32(args.top_k), jnp.float32(args.top_p)
    fn = jax.jit(truncate_logits, static_argnames=("cap", "p_cap"))
    full = dict(cap=0, p_cap=0)  # always the full sort (the behaviour before the shortcuts)
    top_k = time_paths(fn, args.runs, {"partial": dict(cap=TOP_K_CAP), "full": full}, logits, k, p)

    peaky = logits * args.peak
    kept = np.isfinite(np.asarray(fn(peaky, jnp.int32(0), p))).sum(-1)
    top_p = time_paths(fn, args.runs, {"candidates": dict(p_cap=TOP_P_CANDIDATES), "full": full},
                       peaky, jnp.int32(0), p)

    print(f"jax {jax.__version__} backend={jax.default_backend()}; logits [{args.batch}, {args.vocab}]")
    print(f"top-k {args.top_k} + top-p {args.top_p}: cap {TOP_K_CAP}")
    print(f"top-p {args.top_p} alone, logits x{args.peak}: {TOP_P_CANDIDATES} candidates, nucleus sizes "
          f"{int(kept.min())}-{int(kept.max())} tokens")
    print(f"partial_sort_ms: {1e3 * top_k['partial']:.2f}")
    print(f"full_sort_ms: {1e3 * top_k['full']:.2f}")
    print(f"speedup: {top_k['full'] / top_k['partial']:.1f}x")
    print(f"top_p_candidates_ms: {1e3 * top_p['candidates']:.2f}")
    print(f"top_p_full_sort_ms: {1e3 * top_p['full']:.2f}")
    print(f"top_p_speedup: {top_p['full'] / top_p['candidates']:.1f}x")


if __name__ == "__main__":
    main()
