"""AOT compilation for TPU slices (`opd_jax.aot`), the AIME'24 configs, and the analytic FLOP model vs XLA.

The TPU compile needs libtpu, which is kept out of the default site (plain JAX must stay on the CPU): CI installs
it with `pip install --target $VENV/tpu_site libtpu==0.0.42.1` and exports OPD_TPU_SITE. When `import libtpu`
already works the compile runs in this process; otherwise it runs `python -m opd_jax.aot` in a subprocess with
the TPU site on PYTHONPATH; without libtpu the test is skipped.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from opd_jax import aot, flops
from opd_jax.config import ModelConfig, load_config
from opd_jax.config.presets import resolve_model_config
from opd_jax.models.weights import num_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AIME_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "aime24", "*.yaml")))

# Real Qwen3-0.6B student / Qwen3-1.7B teacher dimensions, short sequences so the compile stays quick.
SMALL_OPD = """
algorithm: opd
groups_per_batch: 8
group_size: 2
topology: v5p-8
student: {preset: qwen3-0.6b, param_dtype: bfloat16, dtype: bfloat16, remat: full}
teachers:
  - name: teacher
    model: {preset: qwen3-1.7b, param_dtype: bfloat16, dtype: bfloat16}
mesh: {data: 1, fsdp: -1, tensor: 1}
sampling: {max_prompt_len: 128, max_new_tokens: 128, micro_batches: 2}
micro_batches: 2
"""


# ---- topology names (no libtpu needed) -----------------------------------------------------------------------
@pytest.mark.parametrize("name, libtpu_name, chips", [
    ("v5p-8", "v5p:2x2x1", 4),
    ("v5p-64", "v5p:2x4x4", 32),  # v5p-N counts TensorCores: 2 per chip
    ("v5p-128", "v5p:4x4x4", 64),
    ("v4-8", "v4:2x2x1", 4),
    ("v5e-8", "v5e:2x4", 8),  # v5e / v6e count chips
    ("v5litepod-256", "v5e:16x16", 256),
    ("v6e-64", "v6e:8x8", 64),
    ("v5p:4x4x8", "v5p:4x4x8", 128),
])
def test_parse_topology(name, libtpu_name, chips):
    t = aot.parse_topology(name)
    assert (t.topology_name, t.num_chips) == (libtpu_name, chips)
    assert t.chip in flops.CHIPS


@pytest.mark.parametrize("name", ["v5p-12", "h100-8", "v5p", "tpu"])
def test_parse_topology_rejects(name):
    with pytest.raises(ValueError, match="topology"):
        aot.parse_topology(name)


def test_accelerator_type_roundtrip():
    for name in ("v5p-64", "v4-8", "v6e-16"):
        assert aot.accelerator_type(aot.parse_topology(name)) == name
    assert aot.accelerator_type(aot.parse_topology("v5e-16")) == "v5litepod-16"


# ---- the AIME'24 configs -------------------------------------------------------------------------------------
def test_aime24_config_set_complete():
    names = {os.path.basename(p) for p in AIME_CONFIGS}
    assert {"stage1_sft_lora.yaml", "stage1_sft_full.yaml", "stage2_opd.yaml", "stage2_opd_lora.yaml",
            "stage2_opd_teacher8b.yaml", "rl_baseline.yaml", "eval_aime24.yaml"} <= names


@pytest.mark.parametrize("path", AIME_CONFIGS, ids=os.path.basename)
def test_aime24_configs_load_and_divide(path):
    cfg = load_config(path)
    assert cfg.topology, "every AIME'24 config names its topology"
    chips = aot.parse_topology(cfg.topology).num_chips
    m = cfg.mesh
    fixed = [v for v in (m.data, m.fsdp, m.tensor) if v != -1]
    assert chips % math.prod(fixed) == 0
    fsdp = m.fsdp if m.fsdp != -1 else chips // (m.data * m.tensor)
    rows_axis = m.data * fsdp  # the batch is sharded over data x fsdp
    assert resolve_model_config(cfg.student).hidden_size == 4096  # Qwen3-8B(-Base) dimensions from the preset
    if cfg.algorithm in ("opd", "rl", "sft") and os.path.basename(path) != "eval_aime24.yaml":
        B = cfg.batch_size
        assert B % cfg.micro_batches == 0 and (B // cfg.micro_batches) % rows_axis == 0
        if cfg.algorithm != "sft":
            assert B % cfg.sampling.micro_batches == 0 and (B // cfg.sampling.micro_batches) % rows_axis == 0
            assert cfg.sampling.max_new_tokens == 4096 and cfg.batch_size == 2048


# ---- TPU AOT compile -----------------------------------------------------------------------------------------
def _compile(tmp_path, yaml_text: str, overrides: tuple[str, ...] = ()) -> dict:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml_text)
    if aot.libtpu_importable():
        return aot.compile_step(load_config(str(path), list(overrides)), fast=True).to_dict()
    site = aot.find_tpu_site()
    if site is None:
        pytest.skip("libtpu is not installed (CI: pip install --target $VENV/tpu_site libtpu==0.0.42.1, "
                    "exported as OPD_TPU_SITE)")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, REPO, env.get("PYTHONPATH", "")) if p)
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "opd_jax.aot", str(path), *overrides, "--fast", "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode in (0, 3) and out.exists(), f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_aot_fused_opd_step_v5p8(tmp_path):
    rep = _compile(tmp_path, SMALL_OPD)
    assert not rep["error"], rep["error"]
    assert (rep["topology_name"], rep["num_chips"], rep["chip"]) == ("v5p:2x2x1", 4, "v5p")
    assert rep["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    for k in ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes", "alias_bytes"):
        assert rep[k] > 0, k
    # Analytic per-chip share: bf16 student weights + Adam mu and nu (optax keeps them in the param dtype),
    # bf16 teacher weights, all FSDP-sharded over the 4 chips.
    s, t = num_params(ModelConfig(preset="qwen3-0.6b")), num_params(ModelConfig(preset="qwen3-1.7b"))
    state, teacher = 3 * 2 * s / 4, 2 * t / 4
    assert rep["argument_bytes"] >= state + teacher
    assert rep["argument_bytes"] <= 1.1 * (state + teacher) + 1e6  # sharded, not replicated (+ the prompt batch)
    assert 0.95 * state <= rep["state_bytes"] <= 1.05 * state
    assert 0.95 * state <= rep["alias_bytes"] <= 1.05 * state  # the donated state is updated in place
    assert rep["total_bytes"] == (rep["argument_bytes"] + rep["output_bytes"] - rep["alias_bytes"]
                                  + rep["temp_bytes"] + rep["generated_code_bytes"])
    assert rep["total_bytes"] < 95 * 2**30 and rep["fits"]
    # XLA counts each loop body once, so its count is positive but below the analytic (dense) total.
    assert 0 < rep["compiled_flops"] < rep["analytic_flops"]["dense_total"]
    assert rep["analytic_flops"]["total"] <= rep["analytic_flops"]["dense_total"]


@pytest.mark.slow
def test_aot_reports_a_program_that_does_not_fit(tmp_path):
    """1024 sequences of 1K tokens in one micro-batch on 4 v5e chips (16 GiB): the TPU compiler refuses it."""
    rep = _compile(tmp_path, SMALL_OPD, ("topology=v5e-4", "groups_per_batch=256", "group_size=4",
                                         "sampling.max_prompt_len=512", "sampling.max_new_tokens=512",
                                         "micro_batches=1", "sampling.micro_batches=1"))
    assert rep["chip"] == "v5e" and rep["hbm_bytes"] == 16 * 2**30  # GiB, the compiler's unit
    assert not rep["fits"] and "RESOURCE_EXHAUSTED" in rep["error"]
    assert rep["temp_bytes"] > rep["hbm_bytes"]  # the compiler's figure, parsed from its message
    assert rep["argument_bytes"] == rep["state_bytes"] + rep["teacher_bytes"] > 0


# ---- analytic FLOPs vs XLA's count ---------------------------------------------------------------------------
def _xla_fused_step_flops(cfg) -> float:
    """cost_analysis() FLOPs of the real fused step (CPU, one device, abstract inputs)."""
    from opd_jax.models.qwen3 import abstract_model
    from opd_jax.sampling import SamplingParams
    from opd_jax.step import PromptBatch, StepBuilder
    from opd_jax.train_state import TrainState, make_optimizer, split_model

    sd, st, sf, _, _ = split_model(abstract_model(resolve_model_config(cfg.student)))
    td, tt, _, _, _ = split_model(abstract_model(resolve_model_config(cfg.teachers[0].model)))
    opt = make_optimizer(cfg.optim, cfg.steps)
    sds = jax.ShapeDtypeStruct
    state = TrainState(step=sds((), jnp.int32), trainable=st, frozen=sf, opt_state=jax.eval_shape(opt.init, st))
    G, P = cfg.groups_per_batch, cfg.sampling.max_prompt_len
    batch = PromptBatch(tokens=sds((G, P), jnp.int32), mask=sds((G, P), jnp.bool_),
                        teacher_tokens=sds((G, P), jnp.int32), teacher_mask=sds((G, P), jnp.bool_),
                        teacher_index=sds((), jnp.int32), answer=sds((G, 0), jnp.int32))
    key = jax.eval_shape(lambda: jax.random.key(0))
    sp = SamplingParams(sds((), jnp.float32), sds((), jnp.int32), sds((), jnp.float32))
    builder = StepBuilder(cfg, sd, [td], None, opt)
    compiled = jax.jit(builder.fused).lower(state, [tt], batch, key, sp).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


@pytest.mark.slow
@pytest.mark.parametrize("vocab", [None, 2048], ids=["real-vocab", "vocab-2048"])
def test_analytic_flops_match_xla(vocab):
    """flops.opd_step_flops (and its forward_flops pieces) vs XLA's count of the real fused step, apples to apples.

    XLA's cost_analysis() counts a while/scan body once (CPU and TPU, jax 0.10.2). So the comparison uses
    Qwen3-0.6B / 1.7B dimensions with ONE layer (the layer scan counts exactly), one micro-batch (no
    accumulation scan), one logprob chunk, and counts the decode `while_loop` as what XLA sees: the prefill
    plus one decode step. The model attends with a masked dense einsum (every key slot of its buffer), so the
    analytic side uses attention="dense"; the prefill attends over the whole P+N cache. With the real vocabulary
    the lm_head dominates; vocab 2048 makes the layers and attention dominate, so both are checked."""
    P, N, G, K = 64, 64, 2, 2
    ov = ["student.preset=qwen3-0.6b", "teachers.0.model.preset=qwen3-1.7b", "student.num_layers=1",
          "teachers.0.model.num_layers=1", "student.remat=none", f"groups_per_batch={G}", f"group_size={K}",
          f"sampling.max_prompt_len={P}", f"sampling.max_new_tokens={N}", f"loss.logprob_chunk={N}",
          "micro_batches=1", "sampling.micro_batches=1", "lora.rank=0"]
    if vocab:
        ov += [f"student.vocab_size={vocab}", f"teachers.0.model.vocab_size={vocab}"]
    cfg = load_config(None, ov)
    s, t = resolve_model_config(cfg.student), resolve_model_config(cfg.teachers[0].model)
    B = cfg.batch_size
    xla = _xla_fused_step_flops(cfg)

    step = flops.opd_step_flops(s, t, B, P, N, attention="dense", remat="none")
    # Sampling as XLA counts it: prefill of P tokens over the P+N-slot cache (logits at the last position),
    # plus ONE decode step (one token over P+N slots).
    sampling = (flops.forward_flops(s, B, P, context_len=P + N, lm_head_tokens=1)
                + flops.forward_flops(s, B, 1, context_len=P + N, lm_head_tokens=1))
    analytic = sampling + step["teacher_scoring"] + step["student_training"]
    assert abs(xla / analytic - 1.0) < 0.05, (xla, analytic, step)  # measured: 1.010 and 1.006


# ---- one decode step's HBM traffic (item 5 of issue #16) -----------------------------------------------------
DECODE_SCRIPT = """
import json, sys
from opd_jax import aot
aot._host_platform_cpu()
from opd_jax.config import load_config
cfg = load_config(None, sys.argv[1:])
rep = aot.decode_report(cfg, aot.topology_devices(aot.parse_topology(cfg.topology)))
print(json.dumps(dict(kind=rep.kind, weight=rep.weight_bytes, kv=rep.kv_bytes_per_slot, mean=rep.mean_ratio,
                      segs=[(g.limit, g.bytes_accessed, g.must_read_first, g.must_read_last) for g in rep.segments])))
"""


@pytest.mark.slow
def test_aot_decode_step_traffic_on_tpu():
    """The TPU decode step: dense attention over each segment's static prefix, so the bytes XLA says one step
    accesses grow with the prefix by about the K/V of the extra slots (a toy model with real head shapes; the
    stage-2 figure is in benchmarks/README.md)."""
    site = aot.find_tpu_site() if not aot.libtpu_importable() else None
    if site is None and not aot.libtpu_importable():
        pytest.skip("libtpu is not installed (OPD_TPU_SITE)")
    ov = ["topology=v5p-8", "student.vocab_size=4096", "teachers.0.model.vocab_size=4096",
          "student.hidden_size=512", "student.intermediate_size=1024",
          "student.num_layers=2", "student.num_heads=8", "student.num_kv_heads=4", "student.head_dim=128",
          "student.param_dtype=bfloat16", "student.dtype=bfloat16", "groups_per_batch=8", "group_size=4",
          "sampling.max_prompt_len=64", "sampling.max_new_tokens=448", "sampling.decode_segments=2",
          "sampling.layout=replicated", "mesh.fsdp=-1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, REPO, env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-c", DECODE_SCRIPT, *ov], env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["kind"] == "dense"
    (l1, b1, m1, _), (l2, b2, _, m2) = rep["segs"]
    assert l1 < l2 == 512  # a prefix, then the whole cache
    assert b1 >= rep["weight"] + 0.9 * l1 * rep["kv"]  # it reads the weights and the prefix's K/V at least
    assert 0.9 < (b2 - b1) / ((l2 - l1) * rep["kv"]) < 2.0  # the extra prefix costs about its K/V
    # (XLA also counts the copies of small weights into on-chip VMEM: at this toy size they dominate the rest)


def test_sampling_cast_bytes_in_the_report():
    """The compute-dtype copy of the student's weights that the sampler makes once per call: its per-chip size
    in the decode layout (replicated: every chip holds the whole copy), and none when nothing is cast."""
    from opd_jax.config.schema import MeshConfig
    from opd_jax.mesh import make_mesh
    from opd_jax.models.qwen3 import abstract_model, param_count

    ov = ["student.vocab_size=64", "teachers.0.model.vocab_size=64", "student.hidden_size=32",
          "student.intermediate_size=64", "student.num_layers=2", "student.num_heads=4", "student.num_kv_heads=2",
          "student.head_dim=16", "student.param_dtype=float32", "student.dtype=bfloat16", "sampling.layout=replicated"]
    mesh = make_mesh(MeshConfig(fsdp=8), jax.devices()[:8])
    n = param_count(nnx_state(abstract_model(load_config(None, ov).student)))
    assert aot.sampling_cast_bytes(load_config(None, [*ov, "sampling.cast_weights=always"]), mesh) == 2 * n
    assert aot.sampling_cast_bytes(load_config(None, ov), mesh) == 0  # auto: a CPU program keeps the per-layer cast
    assert aot.sampling_cast_bytes(load_config(None, [*ov, "student.param_dtype=bfloat16",
                                                      "sampling.cast_weights=always"]), mesh) == 0


def nnx_state(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.split(model)[1])
