"""One layer's one-token decode attention, every variant against one dense masked product, in one run.

Shapes (default, issue #16): batch 32, 16 query / 8 KV heads, head_dim 128, bf16, caches of 384 and 5,120 slots
(the 0.6B benchmark's 128 + 256, and the AIME budget 1,024 + 4,096), half and fully filled, left-padded rows.
The cache is stacked over `--layers` layers and the variant reads layer 1 at a traced index, as inside the
model's layer scan (so a variant that makes XLA copy the layer's slice pays for it here too).

Variants (each equal to dense within bf16 rounding; checked first):
- dense_ref:   one masked einsum over all slots of a single-layer [B, S, KV, D] array (the issue's reference);
- blocks:      the CPU path's pure-JAX loop over the filled 64-slot blocks (tiled K), a data-dependent loop;
- dense:       `dense_decode_attention` over the whole stacked cache's layer (GPU/TPU short caches);
- dense_prefix: the same over the static prefix that covers the fill (a decode segment, the TPU path);
- kernel:      the Triton flash-decoding kernel of opd_jax/kernels/gpu.py on the stacked cache (GPU; on a CPU it
               runs through the Pallas interpreter, so its CPU time means nothing);
- jax_gqa:     JAX's own `jax.experimental.pallas.ops.gpu.decode_attention.gqa` on a layer slice, with per-row
               [start, filled) windows, block_k 128 and k_splits = slots / (largest power of two <= 1024 dividing
               them) (GPU only).

Timing: each variant runs `--reps` times inside one jitted `lax.scan` (its output feeds the next query, so
nothing is hoisted), and the per-call time is the median over `--runs` calls divided by `--reps`: dispatch is
amortized. The read roofline is the filled K/V bytes over the chip's HBM bandwidth (`flops.chip_of`).

    python benchmarks/decode_attention.py                  # the issue's shapes (a GPU; on a CPU: slow)
    python benchmarks/decode_attention.py --smoke          # tiny shapes, every variant, any backend
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import flops
from opd_jax.kernels import gpu as gpu_kernels
from opd_jax.models.attention import attention, decode_attention, dense_decode_attention, tile_keys


def make_inputs(B: int, H: int, KV: int, D: int, S: int, L: int, dtype, seed: int = 0):
    """q [B, 1, H, D], stacked flat K and V [L, B, KV, S, D], valid [B, S] with left pads, the pads [B]."""
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.normal(size=(L, B, KV, S, D)), dtype)
    v = jnp.asarray(rng.normal(size=(L, B, KV, S, D)), dtype)
    q = jnp.asarray(rng.normal(size=(B, 1, H, D)), dtype)
    pads = rng.integers(0, 17, size=B)  # left pads of up to 16 slots
    valid = jnp.asarray(np.arange(S)[None, :] >= pads[:, None])
    return q, k, v, valid, jnp.asarray(pads, jnp.int32)


def variants(k, v, S: int, fill: int, platform: str) -> tuple[dict, dict]:
    """(name -> fn(q, data, n_filled), data): every variant reads its caches from `data` (passed to jit as an
    argument, never captured as a constant)."""
    data = dict(k=k, v=v, tiled=jnp.stack([tile_keys(jnp.swapaxes(k[i], 1, 2)) for i in range(k.shape[0])]),
                single_k=jnp.swapaxes(k[1], 1, 2), single_v=jnp.swapaxes(v[1], 1, 2))  # single: [B, S, KV, D]
    layer = 1
    limit = -(-fill // 64) * 64

    def dense_ref(q, d, n):
        mask = (d["valid"] & (jnp.arange(S) < n))[:, None, :]
        return attention(q, d["single_k"], d["single_v"], mask)

    out = {
        "dense_ref": dense_ref,
        "blocks": lambda q, d, n: decode_attention(q, d["tiled"], d["v"], d["layer"], d["valid"], n),
        "dense": lambda q, d, n: dense_decode_attention(q, d["k"], d["v"], d["layer"], d["valid"], n),
        "dense_prefix": lambda q, d, n: dense_decode_attention(q, d["k"], d["v"], d["layer"], d["valid"], n,
                                                               limit=limit),
    }
    if gpu_kernels.supported(k.shape[-1], S):
        interp = platform != "gpu"
        out["kernel"] = lambda q, d, n: gpu_kernels.decode_attention(q, d["k"], d["v"], d["layer"], d["valid"], n,
                                                                     interpret=interp)
    if platform == "gpu":
        from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode

        chunk = max(c for c in (16, 32, 64, 128, 256, 512, 1024) if S % c == 0)

        def jax_gqa(q, d, n):
            B = q.shape[0]
            kl, vl = jnp.swapaxes(d["k"][d["layer"]], 1, 2), jnp.swapaxes(d["v"][d["layer"]], 1, 2)  # [B, S, KV, D]
            o = jax_decode.gqa(q[:, 0], kl, vl, start_idx=d["pads"], kv_seq_len=jnp.full((B,), n, jnp.int32),
                               block_k=min(128, chunk), k_splits=S // chunk)
            return o[:, None]

        out["jax_gqa"] = jax_gqa
    data["layer"] = jnp.int32(layer)
    return out, data


def timed(fn, q, data, n, reps: int, runs: int) -> float:
    """Median seconds per call of fn, `reps` calls chained in one jitted scan."""

    @jax.jit
    def many(q, data, n):
        def body(q, _):
            o = fn(q, data, n)
            return (q + 1e-3 * o.astype(q.dtype)).astype(q.dtype), None
        return jax.lax.scan(body, q, None, length=reps)[0]

    jax.block_until_ready(many(q, data, n))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(many(q, data, n))
        times.append(time.perf_counter() - t)
    return statistics.median(times) / reps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--slots", type=int, nargs="+", default=[384, 5120])
    ap.add_argument("--layers", type=int, default=2, help="layers in the stacked cache (layer 1 is read)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (B 4, 4/2 heads, head_dim 16, 128/192 slots)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.heads, args.kv_heads, args.head_dim, args.slots = 4, 4, 2, 16, [128, 192]
        args.reps, args.runs = 2, 2
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    platform = "gpu" if dev.platform in ("gpu", "cuda", "rocm") else dev.platform
    chip = flops.chip_of(dev)
    bw = chip.hbm_bandwidth if chip is not None else float("nan")
    print(f"jax {jax.__version__} on {dev.device_kind} ({platform}); B {args.batch}, {args.heads}/{args.kv_heads} "
          f"heads, head_dim {args.head_dim}, {args.dtype}, stacked cache of {args.layers} layers, "
          f"{args.reps} calls per timed program")
    results: dict[tuple[int, str], dict[str, float]] = {}
    for S in args.slots:
        q, k, v, valid, pads = make_inputs(args.batch, args.heads, args.kv_heads, args.head_dim, S, args.layers, dtype)
        for label, fill in (("half", S // 2), ("full", S)):
            vs, data = variants(k, v, S, fill, platform)
            data.update(valid=valid, pads=pads)
            n = jnp.int32(fill)
            ref = np.asarray(jax.jit(vs["dense_ref"])(q, data, n), np.float32)
            row = {}
            for name, fn in vs.items():
                try:
                    got = np.asarray(jax.jit(fn)(q, data, n), np.float32)
                    err = float(np.abs(got - ref).max())
                    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
                    if err > tol:
                        print(f"  {S} {label} {name}: max |diff| vs dense {err:.2e} > {tol}: NOT EQUAL")
                    row[name] = timed(fn, q, data, n, args.reps, args.runs)
                except Exception as e:  # noqa: BLE001 - report and go on: one variant failing loses nothing else
                    print(f"  {S} {label} {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            results[S, label] = row
            read = 2 * args.batch * args.kv_heads * fill * args.head_dim * dtype.itemsize
            row["read_roofline"] = read / bw
            print(f"slots {S:>5} {label}: " + ", ".join(f"{n} " + (f"{1e6 * t:.1f} us" if t == t else "n/a")
                                                         for n, t in row.items()), flush=True)

    print()
    for (S, label), row in results.items():
        for name, t in row.items():
            print(f"decode_attention_{S}_{label}_{name}_us: " + (f"{1e6 * t:.1f}" if t == t else "n/a"))
        base = row.get("dense_ref")
        for name in ("kernel", "dense", "dense_prefix", "jax_gqa", "blocks"):
            if base and name in row:  # > 1: faster than the dense reference
                print(f"decode_attention_{S}_{label}_{name}_speedup_vs_dense_ref: {base / row[name]:.2f}x")
        if "kernel" in row and row["read_roofline"] == row["read_roofline"]:
            print(f"decode_attention_{S}_{label}_kernel_vs_read_roofline: {row['kernel'] / row['read_roofline']:.2f}x")


if __name__ == "__main__":
    main()
