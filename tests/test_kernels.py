"""The XLA:CPU FFI kernels (opd_jax/kernels) against their pure-JAX twins, and where they may appear."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from opd_jax.kernels import cpu
from opd_jax.models.attention import decode_attention, one_token_attention, tile_keys


def cache_and_query(L=2, B=3, KV=2, G=2, D=8, block=4, blocks=4, seed=0):
    """A random stacked cache in the model's layout (K tiled per block), a query, and a pad mask with holes;
    row 1 has no valid slot in the first 6, so short fills exercise the no-valid-key row."""
    rng = np.random.default_rng(seed)
    S = block * blocks
    k = rng.normal(size=(L, B, S, KV, D)).astype(np.float32)
    kc = jnp.stack([tile_keys(jnp.asarray(k[i]), block) for i in range(L)])
    vc = jnp.asarray(rng.normal(size=(L, B, KV, S, D)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(B, 1, KV * G, D)), jnp.float32)
    valid = rng.random((B, S)) < 0.7
    valid[1, :6] = False
    return q, kc, vc, jnp.asarray(valid)


def test_kernels_build_and_register_here():
    if not cpu.enabled_by_env() or cpu._compiler() is None:
        pytest.skip("no C++ compiler, or OPD_JAX_CPU_KERNELS=0: the pure-JAX path is used")
    assert cpu.available()


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("n_filled", [1, 4, 5, 9, 16])
def test_decode_attention_kernel_equals_jax_path(n_filled, G):
    if not cpu.available():
        pytest.skip("CPU kernels not built here")
    q, kc, vc, valid = cache_and_query(G=G)
    for layer in (0, 1):
        want = jax.jit(decode_attention)(q, kc, vc, jnp.int32(layer), valid, jnp.int32(n_filled))
        got = jax.jit(cpu.decode_attention)(q, kc, vc, jnp.int32(layer), valid, jnp.int32(n_filled))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
        if n_filled <= 6:  # row 1 has no valid key yet: zeros, on both paths
            assert not np.asarray(got)[1].any()


def test_kernel_only_in_cpu_single_device_programs():
    if not cpu.available():
        pytest.skip("CPU kernels not built here")
    q, kc, vc, valid = cache_and_query()
    args = (q, kc, vc, jnp.int32(1), valid, jnp.int32(7))

    def text(cpu_kernel, platform=None):
        fn = jax.jit(lambda *a: one_token_attention(*a, cpu_kernel=cpu_kernel))
        if platform is None:
            return fn.lower(*args).compile().as_text()
        return export.export(fn, platforms=[platform])(*args).mlir_module()

    assert cpu.DECODE_ATTENTION in text(True)
    assert cpu.DECODE_ATTENTION not in text(False)
    for platform in ("tpu", "cuda"):  # lowered for an accelerator: only the pure-JAX branch exists
        lowered = text(True, platform)
        assert cpu.DECODE_ATTENTION not in lowered and "stablehlo.while" in lowered
    # a bf16 cache is not the kernel's business
    bf16 = (q.astype(jnp.bfloat16), kc.astype(jnp.bfloat16), vc.astype(jnp.bfloat16), *args[3:])
    hlo = jax.jit(lambda *a: one_token_attention(*a, cpu_kernel=True)).lower(*bf16).as_text()
    assert cpu.DECODE_ATTENTION not in hlo


def test_build_is_cached_and_a_bad_compiler_is_an_error(tmp_path, monkeypatch):
    if cpu._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("OPD_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    first = cpu.build()
    assert first.parent == tmp_path / "cache" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu.build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no stray temporaries
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler|failed"):
        cpu.build(force=True)
    assert first.exists()  # a failed rebuild never removes the library already built


def test_env_switch_turns_kernels_off():
    code = "from opd_jax.kernels import cpu; print(cpu.available())"
    env = {**os.environ, "OPD_JAX_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
