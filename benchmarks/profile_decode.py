"""Where a decode step's time goes: one sampler call traced with `jax.profiler`, its device ops summed by name.

Builds the sampler of `sampler.py --model` with random weights (as shipped: `decode_attention: auto`, weights cast
once), warms it up, traces one call of `--new-tokens` tokens and prints the ops that took the most device time,
per decode step (total / new tokens), with how many times each ran per step (kernel launches), so the cost after
attention (the layer scan's weight slices, the 152k-vocabulary sampling ops, launch overhead) can be read off one
run. The trace stays in `--trace-dir` (default: $OUT/trace, else a temporary folder) for TensorBoard / Perfetto.

    python benchmarks/profile_decode.py --model qwen3-0.6b        # a GPU
    python benchmarks/profile_decode.py --smoke                   # tiny, any backend (CPU: host thread events)
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from shapes import MODELS

from opd_jax.config.schema import ModelConfig
from opd_jax.models.qwen3 import build_model
from opd_jax.sampling import SamplingParams, make_sampler

BATCH = 32


def device_events(path: str) -> tuple[str, list[tuple[str, float]]]:
    """(where, [(op name, seconds)]) of the device ops in an xplane file: a GPU/TPU plane's "XLA Ops" line
    (else all its lines), or on a CPU the XLA client's threads."""
    data = jax.profiler.ProfileData.from_file(path)
    planes = [p for p in data.planes if "GPU" in p.name or "TPU" in p.name]
    out = []
    if planes:
        for plane in planes:
            lines = [ln for ln in plane.lines if "XLA Ops" in ln.name] or list(plane.lines)
            out += [(ev.name, ev.duration_ns * 1e-9) for ln in lines for ev in ln.events]
        return planes[0].name, out
    for plane in data.planes:
        for ln in plane.lines:
            if ln.name.startswith(("tf_XLAPjRtCpuClient", "tf_XLAEigen")):
                out += [(ev.name, ev.duration_ns * 1e-9) for ev in ln.events  # not the wrappers around the ops
                        if not ev.name.startswith(("Threadpool", "ThunkExecutor"))]
    return "host CPU threads", out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=list(MODELS))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 8 new tokens")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.new_tokens = "tiny", 8
    shapes = MODELS[args.model]
    cfg = ModelConfig(**shapes.student)
    graphdef, state = nnx.split(build_model(cfg, 0))
    params = nnx.to_pure_dict(state)
    fn = make_sampler(graphdef, max_new_tokens=args.new_tokens)
    prompts = np.random.RandomState(0).randint(1, cfg.vocab_size, (BATCH, shapes.prompt_len)).astype(np.int32)
    tokens, mask = jnp.asarray(prompts), jnp.ones(prompts.shape, bool)
    sp = SamplingParams.create(temperature=1.0)
    jax.block_until_ready(fn(params, tokens, mask, jax.random.key(0), sp))  # compile
    t = time.perf_counter()
    jax.block_until_ready(fn(params, tokens, mask, jax.random.key(1), sp))
    wall = time.perf_counter() - t
    trace_dir = args.trace_dir or (os.path.join(os.environ["OUT"], "trace") if os.environ.get("OUT") else
                                   tempfile.mkdtemp(prefix="opd_trace_"))
    with jax.profiler.trace(trace_dir):
        jax.block_until_ready(fn(params, tokens, mask, jax.random.key(2), sp))
    (path,) = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1:]
    where, events = device_events(path)
    total = collections.Counter()
    count = collections.Counter()
    for name, secs in events:
        total[name] += secs
        count[name] += 1
    n = args.new_tokens
    busy = sum(total.values())
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; model {args.model}, batch {BATCH}, prompt "
          f"{shapes.prompt_len}, {n} new tokens; untraced call {wall:.3f} s ({1e3 * wall / n:.2f} ms/token)")
    print(f"trace: {path}; events from {where}: {len(events)} ({len(events) / n:.0f} per token), busy "
          f"{busy:.3f} s ({1e3 * busy / n:.2f} ms/token)")
    print(f"{'op':<60} {'ms/token':>9} {'share':>6} {'runs/token':>10}")
    for name, secs in total.most_common(args.top):
        print(f"{name[:60]:<60} {1e3 * secs / n:>9.3f} {100 * secs / busy:>5.1f}% {count[name] / n:>10.1f}")
    print()
    print(f"profile_ms_per_token: {1e3 * wall / n:.2f}")
    print(f"profile_device_busy_ms_per_token: {1e3 * busy / n:.2f}")
    print(f"profile_ops_per_token: {len(events) / n:.0f}")


if __name__ == "__main__":
    main()
