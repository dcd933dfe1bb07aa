"""Ahead-of-time compilation of the real fused OPD step for a TPU slice, on any machine (no TPU, no weights).

`opd-jax compile CONFIG [k=v ...] --topology v5p-64` builds abstract TPU devices with libtpu's topology API, the
config's mesh over them, abstract sharded parameters / optimizer state / prompt batch (`jax.ShapeDtypeStruct`s
carrying their `NamedSharding`s: nothing is allocated), then lowers and compiles exactly the program the trainer
runs (`step.build_opd_step`, the trainer's own builder; `algorithm: sft` compiles `baselines.sft.make_sft_step`).
It reports per-chip memory from `memory_analysis()` against the chip's HBM, the FLOPs XLA counts, the analytic
FLOPs of `opd_jax.flops`, and the compile time.

Topology names. Cloud TPU names count TensorCores for v4 and v5p (two per chip, fused into one "megacore" JAX
device) and chips for v5e / v6e:
    v5p-8 = 4 chips = v5p:2x2x1 ... v5p-64 = 32 chips = v5p:2x4x4, v5p-128 = 64 chips = v5p:4x4x4
    v4-8  = 4 chips = v4:2x2x1 (megacore)  ...  v4-128 = v4:4x4x4
    v5e-8 = 8 chips = v5e:2x4, v5e-256 = v5e:16x16; v6e likewise.
(The same table as Google's MaxText `accelerator_to_spec_map.py`.) A raw libtpu name such as `v5p:4x4x4` is
accepted as well.

libtpu. `jax[tpu]` must not become the default install (plain JAX would then try to start a TPU). The libtpu
wheel is kept in a separate directory (CI: `pip install --target $VENV/tpu_site libtpu==0.0.42.1`, exported as
`OPD_TPU_SITE`); `ensure_libtpu()` appends it to `sys.path` only when an AOT compile asks for it. libtpu loads
lazily at the first topology request, so the process's default backend stays the CPU. ALLOW_MULTIPLE_LIBTPU_LOAD
is set so that several compile-only processes do not fight over /tmp/libtpu_lockfile.

`fast=True` (`--fast`) compiles with `exec_time_optimization_effort=-1`: ~2.5x less compile CPU, memory within
~1% of the default compile (tests use it; reported numbers should not).

FLOPs caveat: XLA's `cost_analysis()` counts the body of a `while` / `scan` loop ONCE, and the step is made of
loops (layers, decode steps, sampling and gradient micro-batches, logprob chunks). Its number is therefore a
small fraction of the real work; the analytic count is the one to use for MFU. Both are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TPU_SITE_ENV = "OPD_TPU_SITE"
GiB = 2**30  # one unit for every memory figure: the TPU compiler reports GiB ("15.75G"), chips have GiB of HBM
GB = 1e9  # traffic (bytes read per step) is in decimal GB, as memory bandwidth is quoted (TB/s)

# Cloud TPU accelerator suffix -> physical topology (chips per axis).
_CORE_COUNTED = {  # v4-N / v5p-N: N TensorCores = N/2 chips
    8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8",
    1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16", 8192: "16x16x16",
}
_CHIP_COUNTED = {  # v5e-N / v6e-N: N chips
    1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16",
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}


# ---- libtpu --------------------------------------------------------------------------------------------------
def tpu_site_candidates() -> list[str]:
    """Directories that may hold a `--target`-installed libtpu: $OPD_TPU_SITE, then <venv>/tpu_site."""
    out = []
    if os.environ.get(TPU_SITE_ENV):
        out.append(os.environ[TPU_SITE_ENV])
    out.append(os.path.join(sys.prefix, "tpu_site"))
    return out


def libtpu_importable() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def find_tpu_site() -> str | None:
    """The first candidate directory that holds the libtpu package."""
    for d in tpu_site_candidates():
        if os.path.isfile(os.path.join(d, "libtpu", "__init__.py")):
            return os.path.abspath(d)
    return None


def ensure_libtpu() -> bool:
    """Make `import libtpu` work (appending a TPU site dir to sys.path); quiet libtpu's start-up. True if found."""
    if not libtpu_importable():
        site = find_tpu_site()
        if site is None:
            return False
        sys.path.append(site)
        importlib.invalidate_caches()
    return libtpu_importable()


# ---- topology ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. "v5p-64"
    chip: str  # key of flops.CHIPS: "v4" | "v5p" | "v5e" | "v6e"
    topology_name: str  # libtpu's name, e.g. "v5p:2x4x4"
    num_chips: int

    @property
    def chip_config_name(self) -> str:
        return "megacore" if self.chip in ("v4", "v5p") else "default"


def parse_topology(name: str) -> Topology:
    """`v5p-64` (Cloud TPU accelerator type) or `v5p:2x4x4` (libtpu topology) -> Topology."""
    s = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)(?:p?od)?[:]([0-9x]+)", s)
    if m:
        chip = _ALIASES.get(m.group(1), m.group(1))
        dims = m.group(2)
    else:
        m = re.fullmatch(r"([a-z0-9]+?)-([0-9]+)", s)
        if not m:
            raise ValueError(f"topology {name!r}: expected e.g. 'v5p-64' or 'v5p:2x4x4'")
        chip = _ALIASES.get(m.group(1), m.group(1))
        n = int(m.group(2))
        table = _CORE_COUNTED if chip in ("v4", "v5p") else _CHIP_COUNTED
        if chip not in ("v4", "v5p", "v5e", "v6e"):
            raise ValueError(f"topology {name!r}: unknown TPU generation {chip!r}; valid: v4, v5p, v5e, v6e")
        if n not in table:
            unit = "TensorCores (2 per chip)" if table is _CORE_COUNTED else "chips"
            raise ValueError(f"topology {name!r}: no standard {chip} slice with {n} {unit}; valid sizes: "
                             f"{sorted(table)} (or pass a libtpu name such as '{chip}:{table[max(table)]}')")
        dims = table[n]
    if chip not in ("v4", "v5p", "v5e", "v6e"):
        raise ValueError(f"topology {name!r}: unknown TPU generation {chip!r}; valid: v4, v5p, v5e, v6e")
    num_chips = math.prod(int(d) for d in dims.split("x"))
    return Topology(name=name, chip=chip, topology_name=f"{chip}:{dims}", num_chips=num_chips)


def accelerator_type(topo: Topology) -> str:
    """The Cloud TPU accelerator type string libtpu expects in TPU_ACCELERATOR_TYPE."""
    n = topo.num_chips * (2 if topo.chip in ("v4", "v5p") else 1)
    return f"{'v5litepod' if topo.chip == 'v5e' else topo.chip}-{n}"


def topology_devices(topo: Topology) -> list:
    """Compile-only (abstract) TPU devices for `topo`; needs libtpu, never a TPU."""
    if not ensure_libtpu():
        from opd_jax.errors import UserError

        raise UserError(
            f"compiling for a TPU topology ({topo.name}) needs libtpu (no TPU: its compiler), and it is not installed",
            hint=f"pip install --no-deps --target {os.path.join(sys.prefix, 'tpu_site')} libtpu==0.0.42.1 (outside "
                 f"the default site, so plain JAX stays on the CPU), or point ${TPU_SITE_ENV} at such a directory")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(topo))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu holds /tmp/libtpu_lockfile per process by default; compile-only use needs no exclusive TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.topology_name,
                                        chip_config_name=topo.chip_config_name)
    devices = list(desc.devices)
    if len(devices) != topo.num_chips:
        raise RuntimeError(f"topology {topo.topology_name}: libtpu returned {len(devices)} devices, expected "
                           f"{topo.num_chips} (one per chip)")
    return devices


# ---- one decode step: bytes accessed against the bytes it must read ----------------------------------------------
@dataclass
class DecodeSegment:
    """One decode segment's step, compiled on its own: XLA's bytes accessed against what the step must read."""

    limit: int  # cache slots the step's attention reads (the segment's static prefix, or the whole cache)
    first_fill: int  # filled slots at the segment's first and last step
    last_fill: int
    steps: int  # decode steps in the segment
    bytes_accessed: float  # cost_analysis()["bytes accessed"] per chip, every layer counted (layers unrolled)
    must_read_first: float  # weights + the filled K/V per chip, at the first and last step
    must_read_last: float


@dataclass
class DecodeReport:
    """Per-chip HBM traffic of one decode step of the student (prefill excluded), as XLA's `cost_analysis()`
    counts it for the compiled TPU program, against the bytes the step cannot avoid reading: every weight once
    (in the decode layout and compute dtype) plus the K and V of the filled cache slots. The step is the
    sampler's: one token through every layer with the KV cache (`decode_attention` and the segment's prefix as
    the program picks them), logits at the full vocabulary and the token choice (T=1: Gumbel-max over the
    vocabulary; top-k/top-p run only when asked, under a `lax.cond`)."""

    kind: str  # decode attention ("dense" on a TPU)
    layout: str  # sampling.layout
    batch: int  # sequences per sampling micro-batch (global)
    batch_per_chip: int
    cache_slots: int
    prompt_len: int
    new_tokens: int
    weight_bytes: float  # per chip, as decode reads them
    kv_bytes_per_slot: float  # per chip: K and V of one slot, all layers and local rows
    cast_bytes: float  # per chip: the compute-dtype copy of the weights made once per sampling call (0: none)
    segments: list[DecodeSegment] = field(default_factory=list)
    scanned_bytes_accessed: float = float("nan")  # the layer-scan program (its body counted once), last segment
    compile_seconds: float = 0.0

    @property
    def mean_ratio(self) -> float:
        """Bytes accessed over bytes that must be read, summed over every decode step of the call."""
        acc = sum(g.bytes_accessed * g.steps for g in self.segments)
        must = sum((g.must_read_first + g.must_read_last) / 2 * g.steps for g in self.segments)
        return acc / must if must else float("nan")

    @property
    def worst_ratio(self) -> float:
        return max((g.bytes_accessed / g.must_read_first for g in self.segments), default=float("nan"))

    def lines(self) -> list[str]:
        out = [f"decode step (student, per chip; cost_analysis() of each segment's step compiled with its layers "
               f"unrolled, so every layer counts): {self.kind} attention, layout {self.layout}, "
               f"{self.batch_per_chip} of {self.batch} sequences per chip, cache {self.cache_slots} slots",
               f"  must read: weights {self.weight_bytes / GB:.2f} GB (the untied embedding is gathered, not read) "
               f"+ K/V {self.kv_bytes_per_slot / 1e6:.3f} MB per filled slot (filled: {self.prompt_len + 1} .. "
               f"{self.prompt_len + self.new_tokens - 1})"]
        for g in self.segments:
            out.append(f"  steps filling {g.first_fill:>6}..{g.last_fill:<6} (prefix {g.limit:>6} slots): "
                       f"{g.bytes_accessed / GB:7.2f} GB accessed vs "
                       f"{g.must_read_first / GB:6.2f}..{g.must_read_last / GB:.2f} GB must-read "
                       f"({g.bytes_accessed / g.must_read_last:.2f}x..{g.bytes_accessed / g.must_read_first:.2f}x)")
        out.append(f"  over all {sum(g.steps for g in self.segments)} decode steps: {self.mean_ratio:.2f}x the bytes "
                   f"that must be read (worst step {self.worst_ratio:.2f}x); {len(self.segments)} compiles, "
                   f"{self.compile_seconds:.0f} s")
        if not math.isnan(self.scanned_bytes_accessed):
            out.append(f"  the same step with the layer scan (as run): {self.scanned_bytes_accessed / GB:.2f} GB, "
                       "its body counted once by XLA")
        if self.cast_bytes:
            out.append(f"  sampling.cast_weights: a {self.cast_bytes / GiB:.2f} GiB per-chip copy of the weights in "
                       "the compute dtype, made once per sampling call (in the temporaries above)")
        return out


# ---- report --------------------------------------------------------------------------------------------------
@dataclass
class AotReport:
    topology: str
    topology_name: str
    chip: str
    num_chips: int
    mesh: dict[str, int]
    hbm_bytes: float
    # compiled.memory_analysis(), per chip
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    generated_code_bytes: int = 0
    alias_bytes: int = 0
    # exact per-chip shard bytes of the inputs, from their shardings
    state_bytes: int = 0  # student train state (weights + optimizer moments)
    teacher_bytes: int = 0
    # FLOPs
    compiled_flops_per_chip: float = float("nan")  # cost_analysis(): every loop body counted once
    analytic_flops: dict[str, float] = field(default_factory=dict)  # flops.opd_step_flops, whole step
    lower_seconds: float = 0.0
    compile_seconds: float = 0.0
    error: str = ""  # the compiler's message when it refused the program (e.g. out of HBM)
    # sampling.cast_weights: the per-chip copy of the student's weights in its compute dtype that the sampler makes
    # once per sampling call (part of the temporaries; 0 when the weights are not cast)
    sampling_cast_bytes: float = 0.0
    decode: DecodeReport | None = None  # one decode step's HBM traffic (`decode_report`), when asked for

    @property
    def total_bytes(self) -> int:
        """Peak HBM per chip: inputs + outputs not aliased to (donated) inputs + scratch + program."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.generated_code_bytes

    @property
    def fits(self) -> bool:
        """The TPU compiler accepted the program. It refuses one that would not fit the chip's HBM (the limit it
        applies is a little under the chip's nominal GiB), so acceptance is the test, not our own sum."""
        return not self.error

    @property
    def compiled_flops(self) -> float:
        return self.compiled_flops_per_chip * self.num_chips

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits, compiled_flops=self.compiled_flops)
        return d

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        out = [f"topology: {self.topology} = {self.topology_name}, {self.num_chips} {self.chip} chips "
               f"({self.hbm_bytes / GiB:.0f} GiB HBM each); mesh {mesh}",
               f"lower: {self.lower_seconds:.1f} s, compile: {self.compile_seconds:.1f} s"]
        if self.error:
            out.append(f"COMPILE FAILED: {self.error}")
            out.append("  (below: the inputs from their shardings and the compiler's temporaries, if it said)")
        out += [
            "memory per chip (compiled.memory_analysis()):",
            f"  arguments      {g(self.argument_bytes)}   (student state {self.state_bytes / GiB:.2f} GiB, "
            f"teacher weights {self.teacher_bytes / GiB:.2f} GiB, batch)",
            f"  outputs        {g(self.output_bytes)}",
            f"  aliased        {g(self.alias_bytes)}   (donated train state reused for the new state)",
            f"  temporaries    {g(self.temp_bytes)}",
            f"  generated code {g(self.generated_code_bytes)}",
            f"  total          {g(self.total_bytes)}   of {self.hbm_bytes / GiB:.0f} GiB "
            f"({100 * self.total_bytes / self.hbm_bytes:.0f}%): "
            + ("FITS (the compiler accepted it)" if self.fits else "DOES NOT FIT (the compiler refused it)"),
        ]
        out.append(f"  of which: the student's weights cast to its compute dtype once per sampling call "
                   f"(sampling.cast_weights) {self.sampling_cast_bytes / GiB:.2f} GiB"
                   + ("" if self.sampling_cast_bytes else " (no copy: not cast, or already in the compute dtype)"))
        a = self.analytic_flops
        if a:
            out += [
                "FLOPs per step:",
                f"  analytic (opd_jax.flops, causal attention): {a.get('total', float('nan')):.3e}  "
                f"(student sampling {a.get('student_sampling', 0):.2e}, teacher scoring "
                f"{a.get('teacher_scoring', 0):.2e}, student training {a.get('student_training', 0):.2e})",
                f"  analytic, dense attention (einsum + mask over the whole static cache; decode reads only the "
                f"filled 64-slot blocks, so an upper bound): "
                f"{a.get('dense_total', float('nan')):.3e}",
            ]
        out.append(f"  XLA cost_analysis(): {self.compiled_flops_per_chip:.3e} per chip x {self.num_chips} = "
                   f"{self.compiled_flops:.3e}; XLA counts each scan/while body once (layers, decode steps, "
                   "micro-batches, logprob chunks), so this is far below the real work; use the analytic number")
        if self.decode is not None:
            out += self.decode.lines()
        return out


def lever_candidates(cfg) -> list[tuple[str, list[str]]]:
    """Changes that lower the step's per-chip memory without changing what it computes, as (why, overrides)."""
    c = cfg
    out = []
    for n in (2, 4):
        mb = c.micro_batches * n
        if mb <= c.batch_size and c.batch_size % mb == 0:
            out.append((f"gradient accumulation over {mb} micro-batches: 1/{n} of the training activations",
                        [f"micro_batches={mb}"]))
        smb = c.sampling.micro_batches * n
        if smb <= c.batch_size and c.batch_size % smb == 0:
            out.append((f"sampling in {smb} micro-batches: 1/{n} of the KV cache and prefill activations",
                        [f"sampling.micro_batches={smb}"]))
    for layout in ("train", "tensor", "replicated"):
        if layout != c.sampling.layout:
            out.append((f"decode with the {layout!r} weight layout (no per-step copy of gathered weights)"
                        if layout == "train" else f"decode with the {layout!r} weight layout",
                        [f"sampling.layout={layout}"]))
    if c.student.remat != "full":
        out.append(("store one activation per layer, recompute the rest", ["student.remat=full"]))
    models = [("student", c.student)] + [(f"teachers.{i}.model", t.model) for i, t in enumerate(c.teachers)]
    for name, m in models:
        if m.attention_chunk == 0:
            out.append((f"chunked attention for {name}: O(T x 512) scores instead of O(T^2)",
                        [f"{name}.attention_chunk=512"]))
    for name, m in models[1:]:  # the student's dtype changes training numerics: not a free lever
        if m.param_dtype != "bfloat16":
            out.append((f"{name} weights in bfloat16 (frozen: half the bytes)",
                        [f"{name}.param_dtype=bfloat16", f"{name}.dtype=bfloat16"]))
    return out


def required_bytes(report: AotReport) -> int:
    """Per-chip bytes the program needs: the compiled total, or for a refused program what the compiler said it
    needed (its temporaries plus the inputs)."""
    return report.total_bytes


def search_levers(cfg, topology: str, report: AotReport, *, budget: int = 12, fast: bool = True,
                  log=print) -> list[tuple[list[str], AotReport]]:
    """Find overrides that make a refused program fit, by compiling on the same topology: first every single
    change of `lever_candidates` alone, then the ones that lowered the memory stacked, the most helpful first,
    each kept only if the stack needs less than before. Stops when the compiler accepts the program or after
    `budget` compiles. So every suggestion is measured, and none points the wrong way. Returns
    [(overrides so far, report)] for each step that lowered the memory; the last one fits if a fit was found."""
    from opd_jax.config import apply_overrides

    compiles = 0

    def trial(over: list[str], why: str) -> AotReport | None:
        nonlocal compiles
        try:
            trial_cfg = apply_overrides(cfg, over)
        except Exception:  # noqa: BLE001 - a change the config rejects is no lever
            return None
        compiles += 1
        r = compile_step(trial_cfg, topology, fast=fast)
        log(f"  tried {' '.join(over)}: {required_bytes(r) / GiB:.2f} GiB, {'fits' if r.fits else 'refused'}"
            + (f"  ({why})" if why else ""))
        return r

    singles: list[tuple[list[str], AotReport]] = []
    for why, over in lever_candidates(cfg):
        if compiles >= budget:
            break
        r = trial(over, why)
        if r is not None and required_bytes(r) < required_bytes(report):
            singles.append((over, r))
            if r.fits:
                return [(over, r)]
    singles.sort(key=lambda x: required_bytes(x[1]))
    if not singles:
        return []
    applied, best = list(singles[0][0]), singles[0][1]
    path = [(list(applied), best)]
    keys = lambda over: {o.split("=", 1)[0] for o in over}  # noqa: E731
    for over, _ in singles[1:]:
        if compiles >= budget or best.fits:
            break
        if keys(over) & keys(applied):  # another value of a setting already chosen
            continue
        r = trial(applied + over, "")
        if r is not None and required_bytes(r) < required_bytes(best):
            applied, best = applied + over, r
            path.append((list(applied), best))
    return path


# ---- abstract inputs -----------------------------------------------------------------------------------------
def shard_bytes(tree) -> int:
    """Bytes of one device's shard of every ShapeDtypeStruct (with sharding) in `tree`."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def model_for_aot(mcfg):
    """Model dimensions without loading weights: the preset (else the explicit fields); an `hf_path` whose
    config.json is readable here fills the rest (`train_state.resolve_model`), a placeholder path keeps the
    explicit fields."""
    from opd_jax.config.presets import resolve_model_config
    from opd_jax.train_state import resolve_model

    cfg = resolve_model_config(mcfg)
    if cfg.preset is None and cfg.hf_path:
        try:
            cfg = resolve_model(cfg)
        except Exception as e:  # placeholder path: keep the explicit fields
            if cfg.hf_path not in _NOTED:  # said once per path, not at every compile
                _NOTED.add(cfg.hf_path)
                print(f"note: could not read {cfg.hf_path}/config.json ({e}); using the explicit model fields")
    return cfg


_NOTED: set[str] = set()


def _zero_reward(tokens, mask, answer):
    import jax.numpy as jnp

    return jnp.zeros((tokens.shape[0],), jnp.float32)


def lower_step(cfg, devices: Sequence):
    """Lower the config's step on `devices` with abstract inputs -> (lowered, info dict).

    opd / rl: the fused step the trainer runs, built by the same `step.build_opd_step` with the same teacher rule;
    rl: the real run grades on the host between the sample and update halves; here an in-graph placeholder reward
    keeps the program's shapes (so its memory and FLOPs) the same. sft: the SFT baseline's step
    (`baselines.sft.make_sft_step`) at the length cap `sampling.max_prompt_len + sampling.max_new_tokens`."""
    import jax
    import jax.numpy as jnp

    from opd_jax.mesh import make_mesh, replicated
    from opd_jax.train_state import abstract_train_state, make_optimizer, model_spec, state_shardings

    mesh = make_mesh(cfg.mesh, devices)
    rep = replicated(mesh)
    lora = cfg.lora if cfg.lora.rank > 0 else None
    student = model_spec(model_for_aot(cfg.student), mesh, lora)
    optimizer = make_optimizer(cfg.optim, cfg.steps)
    shardings = state_shardings(optimizer, student.trainable, student.frozen, student.t_axes, student.f_axes, mesh)
    state = abstract_train_state(optimizer, student.trainable, student.frozen, shardings)
    info = dict(mesh={k: int(v) for k, v in mesh.shape.items()}, state_bytes=shard_bytes(state), teacher_bytes=0,
                student_cfg=student.cfg, teacher_cfg=None)

    if cfg.algorithm == "sft":
        from opd_jax.baselines.sft import SFTBatch, make_sft_step

        B, S = cfg.batch_size, cfg.sampling.max_prompt_len + cfg.sampling.max_new_tokens
        step = make_sft_step(student.mdef, optimizer, mesh, logprob_chunk=cfg.loss.logprob_chunk,
                             micro_batches=cfg.micro_batches, shardings=shardings, batch_size=B)
        batch = SFTBatch(tokens=jax.ShapeDtypeStruct((B, S), jnp.int32), mask=jax.ShapeDtypeStruct((B, S), jnp.bool_),
                         loss_mask=jax.ShapeDtypeStruct((B, S), jnp.float32))
        return step.lower(state, batch), info
    if cfg.algorithm not in ("opd", "rl"):
        raise ValueError(f"algorithm {cfg.algorithm!r}: expected opd, rl or sft")

    from opd_jax.sampling import SamplingParams
    from opd_jax.step import PromptBatch, build_opd_step

    teachers = [model_spec(model_for_aot(t.model), mesh) for t in cfg.teachers] if cfg.scores_with_teachers else []
    t_params = [t.trainable for t in teachers]
    G, P = cfg.groups_per_batch, cfg.sampling.max_prompt_len
    sds = jax.ShapeDtypeStruct
    example = PromptBatch(tokens=sds((G, P), jnp.int32), mask=sds((G, P), jnp.bool_),
                          teacher_tokens=sds((G, P), jnp.int32), teacher_mask=sds((G, P), jnp.bool_),
                          teacher_index=sds((), jnp.int32), answer=sds((G, 0), jnp.int32))
    _, step = build_opd_step(cfg, mesh, student.mdef, [t.mdef for t in teachers], optimizer,
                             state_shardings=shardings, teacher_shardings=[t.shardings(mesh)[0] for t in teachers],
                             example_batch=example, reward_fn=_zero_reward if cfg.algorithm == "rl" else None,
                             stop_token_ids=cfg.sampling.stop_token_ids)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = sds(key.shape, key.dtype, sharding=rep)
    sp = SamplingParams(temperature=sds((), jnp.float32), top_k=sds((), jnp.int32), top_p=sds((), jnp.float32))
    info.update(teacher_bytes=shard_bytes(t_params), teacher_cfg=teachers[0].cfg if teachers else None)
    return step.lower(state, t_params, example, key, sp), info


def _analytic(cfg, info) -> dict[str, float]:
    from opd_jax import flops

    s, t = info["student_cfg"], info["teacher_cfg"]
    P, N, B = cfg.sampling.max_prompt_len, cfg.sampling.max_new_tokens, cfg.batch_size
    rank = cfg.lora.rank
    if cfg.algorithm == "sft":
        causal = flops.sft_flops(s, B, P + N, lora_rank=rank, lora_targets=tuple(cfg.lora.targets))
        dense = flops.sft_flops(s, B, P + N, lora_rank=rank, lora_targets=tuple(cfg.lora.targets), attention="dense")
    elif t is None:
        causal = flops.rl_step_flops(s, B, P, N, rank, lora_targets=tuple(cfg.lora.targets))
        dense = flops.rl_step_flops(s, B, P, N, rank, lora_targets=tuple(cfg.lora.targets), attention="dense")
    else:
        causal = flops.opd_step_flops(s, t, B, P, N, rank, lora_targets=tuple(cfg.lora.targets))
        dense = flops.opd_step_flops(s, t, B, P, N, rank, lora_targets=tuple(cfg.lora.targets), attention="dense")
    return {**causal, "dense_total": dense["total"]}


def _decode_step_cost(cfg, mesh, limit: int | None, unroll: bool) -> tuple[float, float]:
    """(bytes accessed per chip, compile seconds) of one compiled decode step of the student on `mesh`."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.layout import Format, Layout

    from opd_jax.mesh import SAMPLING_RULES, named_sharding
    from opd_jax.models.attention import CACHE_AXES, K_CACHE_AXES
    from opd_jax.sampling import SamplingParams, casts_weights, choose_tokens
    from opd_jax.train_state import model_spec, tree_shardings

    rules = SAMPLING_RULES[cfg.sampling.layout]
    lora = cfg.lora if cfg.lora.rank > 0 else None
    scfg = dataclasses.replace(model_for_aot(cfg.student), decode_unroll=unroll)
    spec = model_spec(scfg, mesh, lora)
    model0 = spec.mdef.merge(spec.trainable, spec.frozen)
    dtype = model0.dtype if casts_weights(model0, mesh, cfg.sampling.cast_weights) else None

    def sampling_layout(tree, axes):  # the decode layout and dtype the sampler holds the weights in
        sh = tree_shardings(mesh, axes, tree, rules)
        # Layout.AUTO: inside the sampler the weights are loop-invariant operands of the decode loop, laid out once
        # per call where they are resharded (and cast); a standalone step with row-major inputs would instead
        # re-lay out the q/k/v weights at every call, which the sampler never does
        sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), tree)
        return sds, jax.tree.map(lambda s: Format(Layout.AUTO, s), sh)

    (trainable, t_sh), (frozen, f_sh) = (sampling_layout(spec.trainable, spec.t_axes),
                                         sampling_layout(spec.frozen, spec.f_axes))
    B = cfg.batch_size // cfg.sampling.micro_batches
    P, N = cfg.sampling.max_prompt_len, cfg.sampling.max_new_tokens
    cache = jax.eval_shape(lambda: model0.init_cache(B, P + N, mesh, rules))
    axes = dict(k=K_CACHE_AXES if cache.k.ndim == 6 else CACHE_AXES, v=CACHE_AXES, valid=("batch", "cache_seq"))
    cache = cache.replace(**{n: jax.ShapeDtypeStruct(getattr(cache, n).shape, getattr(cache, n).dtype,
                                                     sharding=named_sharding(mesh, a, getattr(cache, n).shape, rules))
                             for n, a in axes.items()})
    rep = named_sharding(mesh, (), ())
    cache = cache.replace(index=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
    rows = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=named_sharding(mesh, ("batch",), (B,), rules))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
    f32 = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    sp = SamplingParams(f32, jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), f32)

    def step(trainable, frozen, cache, last, positions, key, sp):
        model = spec.mdef.merge(trainable, frozen)
        hidden, cache = model(last[:, None], positions[:, None], jnp.ones((B, 1), bool), cache=cache, mesh=mesh,
                              rules=rules, decode_limit=limit)
        tok, lp, _ = choose_tokens(model.logits(hidden[:, 0]), key, sp, truncation=truncation)
        return tok, lp, cache

    truncation = cfg.sampling.top_k > 0 or cfg.sampling.top_p < 1.0  # else the un-taken branch would count
    t0 = time.perf_counter()
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    in_sh = (t_sh, f_sh, shardings(cache), rows.sharding, rows.sharding, rep, shardings(sp))
    compiled = jax.jit(step, in_shardings=in_sh, donate_argnums=(2,)).lower(
        trainable, frozen, cache, rows, rows, key, sp).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["bytes accessed"]), time.perf_counter() - t0


@dataclass
class MustRead:
    """What one decode step of the student must read per chip: its weights (in the decode layout and compute dtype;
    an untied embedding is gathered, not read) and the K/V of each filled cache slot of its local rows."""

    kind: str  # decode attention the program picks
    weight_bytes: float
    kv_bytes_per_slot: float
    batch_per_chip: int
    cache_slots: int
    cast: bool  # the sampler casts the weights to the compute dtype once per call


def must_read(cfg, mesh, batch: int, prompt_len: int, new_tokens: int) -> MustRead:
    """`MustRead` of the config's student decoding `batch` rows of `prompt_len + new_tokens` slots on `mesh`."""
    import jax.numpy as jnp

    from opd_jax.mesh import SAMPLING_RULES, logical_to_spec
    from opd_jax.models.attention import CACHE_AXES
    from opd_jax.sampling import casts_weights
    from opd_jax.train_state import model_spec, tree_shardings

    rules = SAMPLING_RULES[cfg.sampling.layout]
    lora = cfg.lora if cfg.lora.rank > 0 else None
    scfg = model_for_aot(cfg.student)
    spec = model_spec(scfg, mesh, lora)
    model = spec.mdef.merge(spec.trainable, spec.frozen)
    P, N = prompt_len, new_tokens
    cast = casts_weights(model, mesh, cfg.sampling.cast_weights)
    compute = jnp.dtype(model.dtype).itemsize
    weight_bytes = 0.0
    for tree, axes in ((spec.trainable, spec.t_axes), (spec.frozen, spec.f_axes)):
        shardings = tree_shardings(mesh, axes, tree, rules)
        for (path, x), sh in zip(_leaves_with_path(tree), _leaves(shardings), strict=True):
            if path == "embed" and not scfg.tie_embeddings:
                continue  # an untied embedding is gathered (one row per sequence), not read
            n = math.prod(sh.shard_shape(x.shape))
            floating = jnp.issubdtype(x.dtype, jnp.floating)
            weight_bytes += n * (compute if cast and floating else x.dtype.itemsize)
    slots = -(-(P + N) // 64) * 64
    shape = (scfg.num_layers, batch, scfg.num_kv_heads, slots, scfg.head_dim)
    spec_kv = logical_to_spec(CACHE_AXES, shape, mesh, rules)
    local = [d // math.prod(mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax or ()))
             for d, ax in zip(shape, spec_kv, strict=False)] + list(shape[len(spec_kv):])
    return MustRead(kind=model.decode_kind(P + N, mesh), weight_bytes=weight_bytes,
                    kv_bytes_per_slot=2 * local[0] * local[1] * local[2] * local[4] * compute,
                    batch_per_chip=local[1], cache_slots=slots, cast=cast)


def decode_report(cfg, devices: Sequence, *, scanned: bool = False) -> DecodeReport:
    """Compile the student's decode step for `devices` once per decode segment (its cache prefix; layers
    unrolled, so XLA's `cost_analysis()` counts every layer; plus, if `scanned`, the step as run, with the layer
    scan) and compare each with the bytes it must read (`must_read`): the weights in the decode layout and compute
    dtype, and the K/V of the filled slots, per chip. As inside the sampler, the weights' layouts are the
    compiler's choice (they are laid out once per sampling call), and sampling is as the config asks: without
    top-k/top-p the step is compiled without the truncation branch, which would otherwise be counted although it
    never runs."""
    from opd_jax.mesh import make_mesh
    from opd_jax.sampling import decode_segments

    mesh = make_mesh(cfg.mesh, devices)
    B = cfg.batch_size // cfg.sampling.micro_batches
    P, N = cfg.sampling.max_prompt_len, cfg.sampling.max_new_tokens
    m = must_read(cfg, mesh, B, P, N)
    kind, weight_bytes, kv_per_slot, slots = m.kind, m.weight_bytes, m.kv_bytes_per_slot, m.cache_slots
    rep = DecodeReport(kind=kind, layout=cfg.sampling.layout, batch=B, batch_per_chip=m.batch_per_chip,
                       cache_slots=slots, prompt_len=P, new_tokens=N, weight_bytes=weight_bytes,
                       kv_bytes_per_slot=kv_per_slot, cast_bytes=weight_bytes if m.cast else 0.0)
    start = 1
    for end, limit in decode_segments(P, N, kind, cfg.sampling.decode_segments):
        acc, secs = _decode_step_cost(cfg, mesh, limit, unroll=True)  # one compile per segment: XLA's fusion
        rep.compile_seconds += secs  # choices change with the prefix length, so bytes are not affine in it
        first, last = P + start, P + end - 1
        rep.segments.append(DecodeSegment(limit=limit or slots, first_fill=first, last_fill=last, steps=end - start,
                                          bytes_accessed=acc, must_read_first=weight_bytes + first * kv_per_slot,
                                          must_read_last=weight_bytes + last * kv_per_slot))
        start = end
    if scanned:
        acc, secs = _decode_step_cost(cfg, mesh, None, unroll=False)
        rep.scanned_bytes_accessed, rep.compile_seconds = acc, rep.compile_seconds + secs
    return rep


def _leaves(tree) -> list:
    import jax

    return jax.tree.leaves(tree)


def _leaves_with_path(tree) -> list[tuple[str, Any]]:
    """(the leaf's last key, leaf) for every leaf."""
    import jax

    return [(str(getattr(p[-1], "key", p[-1])), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


# libtpu 0.0.42: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries
# (54.87G) exceeds available HBM (15.75G)."; older: "Used 54.87G of 15.75G hbm".
_OOM_RES = (re.compile(r"temporaries \(([0-9.]+)([KMGT]?)\)"),
            re.compile(r"[Uu]sed ([0-9.]+)([KMGT]?) of [0-9.]+[KMGT]? hbm"))
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def sampling_cast_bytes(cfg, mesh) -> float:
    """Per-chip bytes of the compute-dtype copy of the student's weights that `sample` makes once per call when
    it casts them (`sampling.casts_weights`), in the decode layout; 0 when it does not."""
    import jax.numpy as jnp

    from opd_jax.mesh import SAMPLING_RULES
    from opd_jax.sampling import casts_weights
    from opd_jax.train_state import model_spec, tree_shardings

    lora = cfg.lora if cfg.lora.rank > 0 else None
    spec = model_spec(model_for_aot(cfg.student), mesh, lora)
    model = spec.mdef.merge(spec.trainable, spec.frozen)
    if not casts_weights(model, mesh, cfg.sampling.cast_weights):
        return 0.0
    rules, total = SAMPLING_RULES[cfg.sampling.layout], 0.0
    for tree, axes in ((spec.trainable, spec.t_axes), (spec.frozen, spec.f_axes)):
        for x, sh in zip(_leaves(tree), _leaves(tree_shardings(mesh, axes, tree, rules)), strict=True):
            if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > jnp.dtype(model.dtype).itemsize:
                total += math.prod(sh.shard_shape(x.shape)) * jnp.dtype(model.dtype).itemsize
    return total


def compile_step(cfg, topology: str | None = None, *, fast: bool = False, decode: bool = False) -> AotReport:
    """AOT-compile the config's fused step for `topology` (default `cfg.topology`) and measure it.

    fast: ask XLA for the least execution-time optimization effort (`exec_time_optimization_effort=-1`): several
    times quicker to compile, for tests; the memory figures stay meaningful but the schedule is not the one a
    real run gets. decode: also compile the student's decode step alone and report its HBM traffic against the
    bytes it must read (`decode_report`; two more compiles, opd/rl only)."""
    from opd_jax import flops

    topology = topology or cfg.topology
    if not topology:
        raise ValueError("no topology: pass --topology (e.g. v5p-64) or set `topology:` in the config")
    topo = parse_topology(topology)
    devices = topology_devices(topo)
    chip = flops.CHIPS[topo.chip]
    t0 = time.perf_counter()
    lowered, info = lower_step(cfg, devices)
    t1 = time.perf_counter()
    report = AotReport(topology=topology, topology_name=topo.topology_name, chip=topo.chip, num_chips=topo.num_chips,
                       mesh=info["mesh"], hbm_bytes=chip.hbm_gb * GiB, state_bytes=info["state_bytes"],
                       teacher_bytes=info["teacher_bytes"], lower_seconds=t1 - t0)
    report.analytic_flops = _analytic(cfg, info)
    if cfg.algorithm in ("opd", "rl"):
        from opd_jax.mesh import make_mesh

        report.sampling_cast_bytes = sampling_cast_bytes(cfg, make_mesh(cfg.mesh, devices))
    try:
        compiled = lowered.compile({"exec_time_optimization_effort": -1.0} if fast else None)
    except Exception as e:  # the TPU compiler refuses programs that exceed HBM
        report.compile_seconds = time.perf_counter() - t1
        msg = str(e)
        report.error = msg.splitlines()[0][:2000] if msg else type(e).__name__
        for pattern in _OOM_RES:
            m = pattern.search(msg)
            if m:  # what the compiler asked for; the inputs are known from their shardings
                report.temp_bytes = int(float(m.group(1)) * _UNITS[m.group(2)])
                report.argument_bytes = report.state_bytes + report.teacher_bytes
                break
        return report
    report.compile_seconds = time.perf_counter() - t1
    mem = compiled.memory_analysis()
    if mem is not None:
        report.argument_bytes = int(mem.argument_size_in_bytes)
        report.output_bytes = int(mem.output_size_in_bytes)
        report.temp_bytes = int(mem.temp_size_in_bytes)
        report.generated_code_bytes = int(mem.generated_code_size_in_bytes)
        report.alias_bytes = int(mem.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    if cost:
        report.compiled_flops_per_chip = float(cost.get("flops", float("nan")))
    if decode and cfg.algorithm in ("opd", "rl"):
        report.decode = decode_report(cfg, devices)  # its own compiles, timed in report.decode.compile_seconds
    return report


# ---- the in-loop eval program -----------------------------------------------------------------------------------
@dataclass
class EvalReport:
    """The eval program a run executes (the run's own sampler at `eval.max_new_tokens`), compiled for the slice:
    the batch it will sample at, whether that fits the chip beside the buffers that stay resident during an eval
    (the train state and the teachers' weights), and, when a fixed `eval.batch_size` does not fit, the largest that
    does (`opd_jax.eval.batch`)."""

    setting: str  # eval.batch_size as configured ("auto" or an integer)
    batch: int  # what the run samples at once: auto's choice, or the fixed batch rounded to the batch axes
    rows: int | None  # problems x k of one eval (None: the eval set is not readable here)
    prompt_len: int
    new_tokens: int
    fits: bool
    bytes_per_chip: float  # the eval program's outputs + temporaries + code at `batch` (its weights are resident)
    resident_bytes: float  # per chip: train state + teachers, in HBM throughout
    hbm_bytes: float
    largest: int = 0  # the largest batch that fits (auto: = batch; a fixed batch that does not fit: the lever)
    compiles: int = 0
    compile_seconds: float = 0.0
    error: str = ""

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        rows = f"{self.rows} rows ({-(-self.rows // self.batch)} batches)" if self.rows and self.batch else \
            "rows unknown here"
        out = [f"eval program (the run's sampler, prompt {self.prompt_len} + {self.new_tokens} new tokens; "
               f"eval.batch_size {self.setting}): batch {self.batch}, {rows}"]
        if self.batch:
            out.append(f"  memory per chip: {g(self.bytes_per_chip)} for the eval + {g(self.resident_bytes)} resident "
                       f"(train state, teachers) = {g(self.bytes_per_chip + self.resident_bytes)} of "
                       f"{self.hbm_bytes / GiB:.0f} GiB: " + ("FITS" if self.fits else "DOES NOT FIT"))
        if not self.fits:
            out.append(f"  lever: eval.batch_size={self.largest} fits" if self.largest else
                       "  not even one row per batch shard fits: shorten eval.max_new_tokens, or a larger slice")
            if self.error:
                out.append(f"  the compiler: {self.error[:300]}")
        out.append(f"  ({self.compiles} compiles of the eval program, {self.compile_seconds:.0f} s)")
        return out


def eval_rows(cfg) -> int | None:
    """problems x k of one eval, from `eval.num_problems` or the eval set's size (None when it cannot be read)."""
    if cfg.eval.num_problems:
        return cfg.eval.num_problems * cfg.eval.k
    try:
        if cfg.eval.source:
            from opd_jax.data.sources import open_source

            n = open_source(cfg.eval.source, split=cfg.eval.split, prompt_field=cfg.eval.prompt_field,
                            answer_field=cfg.eval.answer_field).num_records
        else:
            from opd_jax.data import build_task

            n = len(build_task(cfg).eval_problems())
    except Exception:  # noqa: BLE001 - a hub dataset, no network, a generated task without eval problems
        return None
    return None if n is None else n * cfg.eval.k


def compile_eval(cfg, topology: str, *, resident_bytes: float, fast: bool = False) -> EvalReport:
    """Compile the run's eval program for `topology` and plan its batch (`opd_jax.eval.batch`): with "auto", the
    largest batch that fits beside `resident_bytes` per chip (the train state and teachers: `AotReport.state_bytes
    + teacher_bytes`); with a fixed batch, that batch (and, if it does not fit, the largest that does)."""
    from opd_jax import flops
    from opd_jax.eval.batch import batch_granule, compile_fit, largest_batch, round_to_granule
    from opd_jax.eval.evaluate import make_eval_sampler
    from opd_jax.mesh import make_mesh
    from opd_jax.train_state import model_spec

    topo = parse_topology(topology)
    mesh = make_mesh(cfg.mesh, topology_devices(topo))
    hbm = flops.CHIPS[topo.chip].hbm_gb * GiB
    spec = model_spec(model_for_aot(cfg.student), mesh, cfg.lora if cfg.lora.rank > 0 else None)
    eval_fn = make_eval_sampler(spec.mdef, mesh, cfg, cfg.sampling.stop_token_ids)
    params, P = (spec.trainable, spec.frozen), cfg.sampling.max_prompt_len
    limit = hbm - resident_bytes
    t0 = time.perf_counter()
    fits: dict[int, Any] = {}

    def fit(b: int):
        if b not in fits:
            fits[b] = compile_fit(eval_fn, params, mesh, b, P, limit, resident_args=True, fast=fast)
        return fits[b]

    g, rows = batch_granule(mesh, planned=True), eval_rows(cfg)
    cap = rows or 64 * g
    setting = str(cfg.eval.batch_size)
    if cfg.eval.batch_size == "auto":
        batch, _ = largest_batch(fit, g, cap)
        largest = batch
    else:
        batch = round_to_granule(cfg.eval.batch_size, batch_granule(mesh))
        largest = batch if fit(batch).fits else largest_batch(fit, g, min(cap, batch))[0]
    chosen = fit(batch) if batch else fit(g)
    return EvalReport(setting=setting, batch=batch, rows=rows, prompt_len=P, new_tokens=cfg.eval.max_new_tokens,
                      fits=bool(batch) and chosen.fits, bytes_per_chip=chosen.bytes_per_chip,
                      resident_bytes=resident_bytes, hbm_bytes=hbm, largest=largest, compiles=len(fits),
                      compile_seconds=time.perf_counter() - t0, error=chosen.error)


def project(cfg, report: AotReport, ev: EvalReport | None):
    """Roofline floors (`opd_jax.roofline`) of one step, one eval and the run, from the analytic FLOPs and the
    bytes decode must read (`must_read`)."""
    from opd_jax import flops, roofline
    from opd_jax.mesh import make_mesh

    chip, n = flops.CHIPS[report.chip], report.num_chips
    mesh = make_mesh(cfg.mesh, topology_devices(parse_topology(report.topology)))
    s = model_for_aot(cfg.student)
    P, N = cfg.sampling.max_prompt_len, cfg.sampling.max_new_tokens
    a = report.analytic_flops
    sampling_s = 0.0
    if cfg.algorithm in ("opd", "rl"):
        B = cfg.batch_size // cfg.sampling.micro_batches
        m = must_read(cfg, mesh, B, P, N)
        sampling_s = cfg.sampling.micro_batches * roofline.floor_seconds(
            roofline.decode_bytes(m.weight_bytes, m.kv_bytes_per_slot, P, N),
            a.get("student_sampling", 0.0) / cfg.sampling.micro_batches, chip, n)
    rest = a.get("total", 0.0) - a.get("student_sampling", 0.0)
    step_s = sampling_s + rest / (chip.peak_flops * n)
    eval_s, batches, batch = 0.0, 0, 0
    if ev is not None and ev.rows:
        batch = ev.batch if ev.fits else ev.largest  # a batch that does not fit would not run: project the lever
    if batch:
        Ne = cfg.eval.max_new_tokens
        m = must_read(cfg, mesh, batch, P, Ne)
        batches = -(-ev.rows // batch)
        eval_s = batches * roofline.floor_seconds(roofline.decode_bytes(m.weight_bytes, m.kv_bytes_per_slot, P, Ne),
                                                  flops.decode_flops(s, batch, P, Ne), chip, n)
    evals = roofline.eval_count(cfg.steps, cfg.eval.every) if ev is not None else 0
    return roofline.Projection(step_s=step_s, step_sampling_s=sampling_s, eval_s=eval_s, eval_batches=batches,
                               eval_batch=batch, evals=evals, steps=cfg.steps)


# ---- CLI -----------------------------------------------------------------------------------------------------
def _host_platform_cpu() -> None:
    """Tracing needs a host backend only: keep JAX off the (absent) TPU once libtpu is importable."""
    if os.environ.get("JAX_PLATFORMS"):
        return
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def compile_main(args) -> int:
    """`opd-jax compile CONFIG [k=v ...] [--topology T] [--json PATH] [--fast] [--levers N]`: the training step
    (SFT, RL or OPD), then the in-loop eval program beside the resident train state (`compile_eval`), then the
    roofline projection of a step, an eval and the run (`project`). 0 if both fit, 3 if not (a step that does
    not fit: up to N more compiles search for overrides that make it fit; an eval: the largest batch that fits)."""
    from opd_jax.config import load_config

    _host_platform_cpu()
    cfg = load_config(args.config, list(getattr(args, "overrides", []) or []))
    topology = getattr(args, "topology", None) or cfg.topology
    print(f"AOT-compiling the fused {cfg.algorithm} step of {args.config} for {topology} "
          f"({cfg.groups_per_batch} prompts x {cfg.group_size} samples, prompt {cfg.sampling.max_prompt_len} + "
          f"{cfg.sampling.max_new_tokens} new tokens, micro_batches={cfg.micro_batches}, "
          f"sampling.micro_batches={cfg.sampling.micro_batches})", flush=True)
    fast = bool(getattr(args, "fast", False))
    report = compile_step(cfg, topology, fast=fast)
    for line in report.lines():
        print(line)
    ev = None
    from opd_jax.eval.evaluate import runs_eval

    if runs_eval(cfg):  # the in-loop eval runs beside the resident train state: it must fit too
        print(f"AOT-compiling the in-loop eval program ({cfg.eval.max_new_tokens} new tokens, eval.batch_size "
              f"{cfg.eval.batch_size})", flush=True)
        ev = compile_eval(cfg, topology, resident_bytes=report.state_bytes + report.teacher_bytes, fast=fast)
        for line in ev.lines():
            print(line)
    projection = project(cfg, report, ev) if report.analytic_flops else None
    if projection is not None:
        for line in projection.lines():
            print(line)
    budget = int(getattr(args, "levers", 12) or 0)
    if not report.fits and budget:
        print(f"searching for levers (up to {budget} more compiles at the least optimization effort):", flush=True)
        path = search_levers(cfg, topology, report, budget=budget)
        if path and path[-1][1].fits:
            over, r = path[-1]
            print(f"fits with: {' '.join(over)}  ({r.total_bytes / GiB:.2f} GiB per chip of {r.hbm_bytes / GiB:.0f})")
        elif path:
            over, r = path[-1]
            print(f"closest: {' '.join(over)} needs {required_bytes(r) / GiB:.2f} GiB per chip; still refused. "
                  "Beyond these: a larger slice (--topology), a larger mesh.tensor, or shorter "
                  "sampling.max_prompt_len / max_new_tokens")
        else:
            print("no single change lowered the memory; try a larger slice (--topology) or shorter sequences")
    out = getattr(args, "json", None)
    if out:
        d = report.to_dict()
        d["eval"] = dataclasses.asdict(ev) if ev is not None else None
        d["projection"] = None if projection is None else {**dataclasses.asdict(projection),
                                                           "run_s": projection.run_s,
                                                           "eval_share": projection.eval_share}
        with open(out, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=1, default=str)
    return 0 if report.fits and (ev is None or ev.fits) else 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_jax.aot", description=compile_main.__doc__)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--topology", default=None)
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--fast", action="store_true", help="least XLA optimization effort: quicker compile (tests)")
    p.add_argument("--levers", type=int, default=12, help="compiles to spend searching for overrides that fit")
    return compile_main(p.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
