"""How many sequences an evaluation samples at once (`eval.batch_size`), from the memory the chips have.

An AIME'24 eval is 30 problems x 32 samples of up to 32,768 tokens. Its KV cache grows with the batch (Qwen3-8B: 147
KB per token, 4.8 GB per full-length sequence), so the batch decides how many sequential decodes of the whole budget
an eval takes. `eval.batch_size: auto` asks the compiler: the eval program (the run's own sampler,
`make_eval_sampler`) is compiled at a few batch sizes, its per-chip memory (`memory_analysis()`) is read, and the
largest multiple of the batch axes that fits is kept:

- two compiles give the bytes as a + b x batch (weights and code are fixed, the cache and activations grow with the
  batch), which predicts the largest batch under the limit;
- that prediction and the batch one step above it are compiled to confirm it; a wrong prediction falls back to
  bisection, so the result is always the largest multiple that compiled within the limit.

The limit is what the chip has left beside the buffers that stay resident during the eval (the train state and the
teachers' weights in a training job): on a TPU or GPU at run time, the device's free memory
(`memory_stats()`); ahead of time (`opd-jax compile`), the chip's HBM less those buffers' shard bytes. On a CPU there
is no device memory to plan for: "auto" is min(64, rows), as before. An integer `eval.batch_size` is used as given,
rounded up to a multiple of the batch axes (data x fsdp), where the rows are spread (`evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from opd_jax.config.schema import ExperimentConfig
from opd_jax.mesh import batch_sharding, replicated
from opd_jax.sampling import SamplingParams

CPU_AUTO_BATCH = 64  # the CPU's "auto": the batch every eval used before issue #25
HEADROOM = 0.97  # a planned batch leaves 3% of the limit free (fragmentation, the runtime's own buffers)


@dataclass
class EvalFit:
    """One compile of the eval program at `batch` rows: its per-chip bytes and whether they fit the limit."""

    batch: int
    fits: bool
    bytes_per_chip: float  # arguments + outputs + temporaries + code (memory_analysis), or the compiler's OOM figure
    limit: float  # the bytes the eval may use per chip
    error: str = ""


TPU_ROWS_PER_CHIP = 8  # on a TPU, "auto" plans 8 rows per batch shard at a time (the sublane tiling)


def batch_granule(mesh, *, planned: bool = False) -> int:
    """Rows divide evenly over the batch axes (data x fsdp): an eval batch is a multiple of this. `planned` (the
    step of "auto"'s search): on a TPU, 8 rows per shard at a time. Other per-shard counts pad, and the compiled
    program's memory then stops growing monotonically with the batch (measured on v5e, 4096-token eval: 40 rows per
    chip 5.2 GiB, 41 rows 16.5 GiB, 50 rows 13.5 GiB, 80 rows 10.3 GiB; multiples of 8 are linear), which the
    search relies on."""
    shards = int(mesh.shape["data"] * mesh.shape["fsdp"])
    tpu = mesh.devices.flat[0].platform == "tpu"
    return shards * (TPU_ROWS_PER_CHIP if planned and tpu else 1)


def round_to_granule(batch: int, granule: int) -> int:
    return -(-int(batch) // granule) * granule


def abstract_eval_inputs(params, mesh, batch: int, prompt_len: int):
    """ShapeDtypeStructs of one eval call at `batch` rows: (params, tokens, mask, row keys, sampling params,
    active rows), the rows sharded over the batch axes. `params` may be arrays or ShapeDtypeStructs."""
    sds = jax.ShapeDtypeStruct
    abstract = jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), params)
    rows = batch_sharding(mesh, (batch,))
    key = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.arange(batch)))
    rep = replicated(mesh)
    f32 = sds((), jnp.float32, sharding=rep)
    return (abstract, sds((batch, prompt_len), jnp.int32, sharding=batch_sharding(mesh, (batch, prompt_len))),
            sds((batch, prompt_len), jnp.bool_, sharding=batch_sharding(mesh, (batch, prompt_len))),
            sds(key.shape, key.dtype, sharding=rows),
            SamplingParams(f32, sds((), jnp.int32, sharding=rep), f32), sds((batch,), jnp.bool_, sharding=rows))


def compile_fit(eval_fn, params, mesh, batch: int, prompt_len: int, limit: float, *, resident_args: bool,
                fast: bool = False) -> EvalFit:
    """Compile `eval_fn` (a `make_sampler` jit) at `batch` rows and compare its per-chip bytes with `limit`.
    resident_args: the arguments (the student's weights) are already in the memory `limit` leaves free, so only
    outputs, temporaries and code count (at run time); else everything counts (ahead of time). A program the
    compiler refuses (out of HBM) does not fit."""
    import re

    args = abstract_eval_inputs(params, mesh, batch, prompt_len)
    try:
        compiled = eval_fn.lower(*args).compile({"exec_time_optimization_effort": -1.0} if fast else None)
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs that exceed HBM
        msg = str(e)
        m = re.search(r"temporaries \(([0-9.]+)([KMGT]?)\)", msg)
        units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        need = float(m.group(1)) * units[m.group(2)] if m else float("inf")
        return EvalFit(batch, False, need, limit, msg.splitlines()[0][:500] if msg else type(e).__name__)
    mem = compiled.memory_analysis()
    if mem is None:  # a backend without memory analysis: trust that it compiled
        return EvalFit(batch, True, float("nan"), limit)
    used = mem.output_size_in_bytes + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes
    if not resident_args:
        used += mem.argument_size_in_bytes - mem.alias_size_in_bytes
    return EvalFit(batch, used <= limit * HEADROOM, float(used), limit)


def largest_batch(fit: Callable[[int], EvalFit], granule: int, cap: int) -> tuple[int, list[EvalFit]]:
    """The largest multiple of `granule` up to `cap` (rounded up to the granule) for which `fit` holds, and every
    compile made to find it; (0, trials) when not even one granule fits. `fit(b)` must be monotone in b: compiles
    at 1 and 2 granules give the bytes per granule, the line predicts the answer, the prediction and the step above
    it are compiled, and bisection covers a wrong prediction."""
    trials: dict[int, EvalFit] = {}

    def at(m: int) -> bool:
        if m not in trials:
            trials[m] = fit(m * granule)
        return trials[m].fits

    top = max(1, -(-cap // granule))
    if not at(1):
        return 0, list(trials.values())
    lo, hi = 1, top + 1  # at(lo) holds; at(hi) does not (top + 1 is past the cap: never compiled)
    guess = top
    if top >= 2:
        if at(2):
            lo = 2
            a, b = trials[1].bytes_per_chip, trials[2].bytes_per_chip
            if b > a:  # bytes(m) = a + (b - a) (m - 1) <= limit x HEADROOM
                guess = min(top, 1 + int((trials[1].limit * HEADROOM - a) / (b - a)))
        else:
            hi = 2
    for m in (guess, guess + 1):  # confirm the prediction: it fits, the step above does not
        if lo < m < hi:
            if at(m):
                lo = m
            else:
                hi = m
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid):
            lo = mid
        else:
            hi = mid
    return lo * granule, list(trials.values())


def free_device_bytes() -> float | None:
    """The least free memory over this process's devices (`memory_stats()`), or None where it is unknown."""
    free = []
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return float(min(free)) if free else None


_CHOSEN: dict[tuple, int] = {}  # (eval program, rows, prompt length) -> the batch "auto" chose: searched once per run


def eval_batch_size(cfg: ExperimentConfig, mesh, rows: int, *, eval_fn=None, params=None) -> int:
    """The batch an eval of `rows` sequences samples at once: `eval.batch_size` rounded up to the batch axes, or
    "auto" (module docstring): on a CPU (or without `eval_fn`/`params`) min(64, rows), else the largest batch the
    compiler fits in the devices' free memory. Raises ValueError when not even one row per batch shard fits."""
    g = batch_granule(mesh)
    if cfg.eval.batch_size != "auto":
        return round_to_granule(cfg.eval.batch_size, g)
    g = batch_granule(mesh, planned=True)
    platform = mesh.devices.flat[0].platform
    free = free_device_bytes() if platform != "cpu" else None
    if eval_fn is None or params is None or free is None:
        return round_to_granule(max(1, min(CPU_AUTO_BATCH, rows)), g)
    P = cfg.sampling.max_prompt_len
    key = (id(eval_fn), rows, P)
    if key not in _CHOSEN:
        batch, trials = largest_batch(lambda b: compile_fit(eval_fn, params, mesh, b, P, free, resident_args=True),
                                      g, rows)
        if batch == 0:
            raise ValueError(f"eval: not even {g} rows ({cfg.eval.max_new_tokens} new tokens) fit beside the run's "
                             f"buffers ({trials[0].bytes_per_chip / 2**30:.2f} GiB per chip needed, "
                             f"{free / 2**30:.2f} GiB free): lower eval.max_new_tokens or free memory")
        _CHOSEN[key] = batch
        if jax.process_index() == 0:
            print(f"eval.batch_size auto: {batch} rows at once ({len(trials)} compiles; "
                  f"{max(t.bytes_per_chip for t in trials if t.fits) / 2**30:.2f} GiB per chip)")
    return _CHOSEN[key]


__all__ = ["EvalFit", "batch_granule", "compile_fit", "largest_batch", "eval_batch_size", "round_to_granule",
           "abstract_eval_inputs", "free_device_bytes"]
