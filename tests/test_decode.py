"""One-token decode attention, per platform: every path equals dense masked attention (fp32, <= 1e-5) with holes
from left padding and fills at block edges; the choice per platform; and what GPU and TPU lowerings contain (the
intended path, and no data-dependent loop inside the decode loop)."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export
from jax.sharding import Mesh
from jaxpr_utils import walk

from opd_jax.config.schema import ModelConfig
from opd_jax.kernels import cpu as cpu_kernels
from opd_jax.kernels import gpu as gpu_kernels
from opd_jax.models.attention import (
    DECODE_BLOCK,
    GPU_DENSE_MAX_SLOTS,
    attention,
    decode_kind,
    dense_decode_attention,
    gpu_kernel_attention,
    one_token_attention,
    tile_keys,
)
from opd_jax.models.qwen3 import abstract_model
from opd_jax.sampling import SamplingParams, decode_segments, sample

L, B, KV, G, D = 2, 4, 2, 2, 16
S = 3 * DECODE_BLOCK  # three blocks
FILLS = [1, 5, DECODE_BLOCK - 1, DECODE_BLOCK, DECODE_BLOCK + 1, 2 * DECODE_BLOCK, 2 * DECODE_BLOCK + 3, S]


def cache(seed: int = 0):
    """A stacked cache in both layouts, a query, and valid slots as a left-padded batch leaves them: row 0 has
    no pad, row 1 a pad running past the first block edge (70 slots), row 2 a 5-slot pad, row 3 a 5-slot pad and
    random holes (pads inside a row, which any path must mask exactly)."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(L, B, KV, S, D)).astype(np.float32)  # flat layout [layers, B, KV, slots, D]
    v = rng.normal(size=(L, B, KV, S, D)).astype(np.float32)
    q = rng.normal(size=(B, 1, KV * G, D)).astype(np.float32)
    valid = np.ones((B, S), bool)
    valid[1, :70] = False
    valid[2:, :5] = False
    valid[3] &= rng.random(S) < 0.6
    tiled = jnp.stack([tile_keys(jnp.swapaxes(jnp.asarray(k[i]), 1, 2)) for i in range(L)])
    return jnp.asarray(q), jnp.asarray(k), tiled, jnp.asarray(v), jnp.asarray(valid)


def reference(q, k, v, valid, layer: int, n_filled: int) -> np.ndarray:
    """Dense masked attention over layer `layer`'s valid, filled slots; zeros for a row with none."""
    mask = (valid & (jnp.arange(S) < n_filled))[:, None, :]
    out = attention(q, jnp.swapaxes(k[layer], 1, 2), jnp.swapaxes(v[layer], 1, 2), mask)
    return np.where(np.asarray(mask.any(-1))[:, :, None, None], np.asarray(out), 0.0)


PATHS = {
    # name: (uses the tiled K layout, fn(q, kc, vc, layer, valid, n_filled) with n_filled's static value as `n`)
    "blocks": (True, lambda *a, n: one_token_attention(*a, cpu_kernel=False, kind="blocks")),
    "cpu-kernel": (True, lambda *a, n: cpu_kernels.decode_attention(*a)),
    "dense": (False, lambda *a, n: dense_decode_attention(*a)),
    "dense-prefix": (False, lambda *a, n: dense_decode_attention(*a, limit=n)),  # a decode segment's prefix
    "gpu-kernel": (False, lambda *a, n: gpu_kernels.decode_attention(*a, interpret=True)),
    "gpu-kernel-1-split": (False, lambda *a, n: gpu_kernels.decode_attention(*a, interpret=True, splits=1)),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_decode_attention_equals_dense_reference(path):
    """Every decode path (the CPU ones on their tiled cache, the accelerator ones on the flat cache; the GPU
    kernel through the Pallas interpreter) against dense attention, at fills on both sides of every block edge,
    for both layers of the stacked cache."""
    if path == "cpu-kernel" and not cpu_kernels.available():
        pytest.skip("CPU kernels not built here")
    tiled_layout, fn = PATHS[path]
    q, k, tiled, v, valid = cache()
    kc = tiled if tiled_layout else k
    compiled = {}  # a static prefix compiles once per fill; every other path once
    for n in FILLS:
        static = n if path == "dense-prefix" else 0
        run = compiled.setdefault(static, jax.jit(partial(fn, n=static)))
        for layer in range(L):
            got = np.asarray(run(q, kc, v, jnp.int32(layer), valid, jnp.int32(n)))
            np.testing.assert_allclose(got, reference(q, k, v, valid, layer, n), atol=1e-5, rtol=0,
                                       err_msg=f"{path}: layer {layer}, {n} slots filled")
            if n <= 70:  # row 1 has no valid slot yet: zeros on every path
                assert not got[1].any()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: the compiled Triton kernel")
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_compiled_gpu_kernel_equals_dense_reference(dtype, atol):
    """On a GPU: the kernel compiled by Triton (not interpreted), directly and as the model's "pallas" decode
    attention picks it, against dense attention at every fill."""
    q, k, _, v, valid = cache(2)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    direct = jax.jit(gpu_kernels.decode_attention)
    picked = jax.jit(lambda *a: one_token_attention(*a, cpu_kernel=False, kind="pallas"))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    for n in FILLS:
        want = reference(f32(q), f32(k), f32(v), valid, 1, n)
        for fn in (direct, picked):
            got = np.asarray(fn(q, k, v, jnp.int32(1), valid, jnp.int32(n)), np.float32)
            np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=f"{n} slots filled")


def test_gpu_kernel_under_a_mesh_equals_one_device():
    """Batch over one mesh axis and KV heads over another: the kernel runs per shard (shard_map)."""
    q, k, _, v, valid = cache(1)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tensor"))
    rules = {"layers": None, "batch": "fsdp", "kv_heads": "tensor", "cache_seq": None, "head_dim": None}
    got = jax.jit(lambda *a: gpu_kernel_attention(*a, mesh=mesh, rules=rules))(q, k, v, jnp.int32(1), valid,
                                                                                 jnp.int32(100))
    np.testing.assert_allclose(np.asarray(got), reference(q, k, v, valid, 1, 100), atol=1e-5, rtol=0)


def test_decode_kind_per_platform():
    assert decode_kind("auto", "cpu", 128, 5120) == "blocks"
    assert decode_kind("auto", "tpu", 128, 5120) == "dense"
    assert decode_kind("auto", "gpu", 128, 5120) == "pallas"
    assert decode_kind("auto", "gpu", 128, 384) == "pallas"
    assert decode_kind("auto", "gpu", 128, GPU_DENSE_MAX_SLOTS) == "dense"  # a short cache: fixed-shape dense
    assert decode_kind("pallas", "gpu", 12, 5120) == "dense"  # the kernel needs a power-of-two head_dim
    assert decode_kind("blocks", "gpu", 128, 5120) == "blocks"  # forced
    with pytest.raises(ValueError, match="decode_attention"):
        decode_kind("flash", "gpu", 128, 384)


def test_decode_segments_cover_every_step_with_a_static_prefix():
    """Segments tile the decode steps 1..N-1 in order; each one's prefix holds every slot its steps fill."""
    for P, N, k in [(1024, 4096, 0), (8, 140, 3), (128, 256, 0), (100, 1000, 4), (1024, 32768, 0)]:
        segs = decode_segments(P, N, "dense", k)
        assert segs[-1] == (N, None)
        ends = [e for e, _ in segs]
        assert ends == sorted(set(ends)) and ends[0] > 1
        start = 1
        for end, limit in segs[:-1]:
            assert limit % DECODE_BLOCK == 0 and P + (end - 1) <= limit  # step end-1 fills slots [0, P+end-1)
            start = end
        assert start < N
    assert len(decode_segments(1024, 4096, "dense")) == 4
    assert decode_segments(1024, 4096, "pallas") == [(4096, None)]  # O(filled) by itself: one loop
    assert decode_segments(1024, 4096, "blocks") == [(4096, None)]


# ---- what accelerator lowerings contain ------------------------------------------------------------------------
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16)
NP, NN = 8, 140  # prompt bucket, new tokens: a 192-slot cache, three blocks


def _sampler(kind: str, segments: int = 0, **cfg):
    graphdef, state = nnx.split(abstract_model(dataclasses.replace(CFG, decode_attention=kind, **cfg)))
    params = nnx.to_pure_dict(state)

    def fn(params, tokens, mask, key, sp):
        return sample(nnx.merge(graphdef, params), tokens, mask, key, sp, max_new_tokens=NN, segments=segments)

    sds = jax.ShapeDtypeStruct
    key = jax.eval_shape(lambda: jax.random.key(0))
    sp = SamplingParams(sds((), jnp.float32), sds((), jnp.int32), sds((), jnp.float32))
    args = (params, sds((2, NP), jnp.int32), sds((2, NP), jnp.bool_), sds(key.shape, key.dtype), sp)
    return fn, args


def decode_loops(fn, args) -> list[int]:
    """For each decode `while` loop of the traced sampler (the outermost whiles), how many `while` loops its
    body holds. Scans (the layer loop) have a static trip count and are not `while`s in a jaxpr."""
    eqns = list(walk(jax.make_jaxpr(fn)(*args).jaxpr))
    whiles = [e for e in eqns if e.primitive.name == "while"]
    nested = {id(e) for w in whiles for e in walk(w.params["body_jaxpr"].jaxpr) if e.primitive.name == "while"}
    return [sum(e.primitive.name == "while" for e in walk(w.params["body_jaxpr"].jaxpr))
            for w in whiles if id(w) not in nested]


@pytest.mark.parametrize("kind,segments,loops", [("blocks", 0, [1]), ("dense", 0, [0]), ("dense", 3, [0, 0, 0]),
                                                  ("pallas", 0, [0])])
def test_decode_loop_has_no_data_dependent_loop_inside(kind, segments, loops):
    """The CPU block loop is a data-dependent while loop inside every decode step (the positive control); dense
    attention and the GPU kernel have none, whatever the segmentation."""
    fn, args = _sampler(kind, segments)
    assert decode_loops(fn, args) == loops


def _export(fn, args, platform: str) -> str:
    checks = [export.DisabledSafetyCheck.custom_call(gpu_kernels.TRITON_CALL)]
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args).mlir_module()


def test_gpu_lowering_runs_the_triton_kernel():
    """A CUDA lowering of the sampler with the GPU kernel holds the Triton call (per layer, inside the layer
    scan) and neither the CPU kernel nor the interpreter's grid loop; a CPU lowering of the same program holds
    no Triton call."""
    fn, args = _sampler("pallas")
    cuda = _export(fn, args, "cuda")
    assert gpu_kernels.TRITON_CALL in cuda and "opd_decode_attention" in cuda
    assert cpu_kernels.DECODE_ATTENTION not in cuda
    cpu = _export(fn, args, "cpu")
    assert gpu_kernels.TRITON_CALL not in cpu


def test_tpu_lowering_is_dense_over_static_prefixes():
    """A TPU lowering with auto segments at a 4096-token budget: one decode loop per segment, each attending
    over its own static prefix of the cache (the score tensors' slot dimension), no custom call."""
    fn, args = _sampler("dense", 3)
    tpu = _export(fn, args, "tpu")
    assert "custom_call @" not in tpu.replace("custom_call @Sharding", "").replace("custom_call @SPMD", "")
    for n in (64, 128, 192):  # the segments' prefixes: [B, KV, G, n] fp32 scores
        assert f"tensor<2x2x2x{n}xf32>" in tpu, n
