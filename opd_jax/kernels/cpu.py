"""Build, load and call the XLA:CPU FFI kernels in this folder.

The C++ is compiled on first use with the host's compiler for the host's CPU (`-march=native`), against the FFI
headers that ship with jaxlib, and cached by a hash of everything that goes into it. No compiler, a failed build,
or `OPD_JAX_CPU_KERNELS=0` leaves `available()` false, and callers keep their pure-JAX path. The kernels change
only how XLA:CPU runs a step, never what it computes; GPU and TPU programs never contain them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention_cpu.cc")
DECODE_ATTENTION = "opd_decode_attention_f32"
FLAGS = ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-w"]


def enabled_by_env() -> bool:
    return os.environ.get("OPD_JAX_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where built libraries are kept: $OPD_JAX_KERNEL_CACHE, else $XDG_CACHE_HOME/opd_jax/kernels."""
    if os.environ.get("OPD_JAX_KERNEL_CACHE"):
        return Path(os.environ["OPD_JAX_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "opd_jax" / "kernels"


def _cpu_signature() -> str:
    """-march=native code runs only where it was built: key the cache on the CPU as well."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("flags", "model name"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "|" + "|".join(lines)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def build(force: bool = False) -> Path:
    """Compile the kernel library (or find it in the cache) and return its path. Raises on failure."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    include = jax.ffi.include_dir()
    try:
        probe = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"C++ compiler {cxx!r} does not run: {e}") from e
    if probe.returncode != 0:
        raise RuntimeError(f"C++ compiler {cxx!r} does not run: {probe.stderr.strip()[:300]}")
    version = probe.stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), include, jax.__version__,
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"opd_cpu_kernels-{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place: concurrent processes never load a half-written library.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(tmp_out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp_out, out)
    return out


@functools.cache
def available() -> bool:
    """True once the kernels are built, loaded and registered with XLA:CPU (tried once per process)."""
    if not enabled_by_env():
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(DECODE_ATTENTION, jax.ffi.pycapsule(lib.OpdDecodeAttentionF32), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means: use the pure-JAX path
        log.warning("opd_jax CPU kernels unavailable, using the pure-JAX path: %s", e)
        return False
    return True


def decode_attention(q: jax.Array, kc: jax.Array, vc: jax.Array, layer: jax.Array, valid: jax.Array,
                     n_filled: jax.Array) -> jax.Array:
    """The kernel's twin of `models.attention.decode_attention` (same arguments; fp32 cache). q: [B, 1, H, D]."""
    if not available():
        raise RuntimeError("opd_jax CPU kernels are unavailable here (see the logged reason, or OPD_JAX_CPU_KERNELS); "
                           "use opd_jax.models.attention.decode_attention")
    B, _, H, D = q.shape
    KV = kc.shape[2]
    qg = q.reshape(B, KV, H // KV, D).astype(jnp.float32) / jnp.sqrt(jnp.float32(D))
    call = jax.ffi.ffi_call(DECODE_ATTENTION, jax.ShapeDtypeStruct(qg.shape, jnp.float32), vmap_method="sequential")
    out = call(qg, kc, vc, jnp.asarray(layer, jnp.int32), valid.astype(bool), jnp.asarray(n_filled, jnp.int32))
    return out.reshape(B, 1, H, D).astype(vc.dtype)
