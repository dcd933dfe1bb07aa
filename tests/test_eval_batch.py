"""The eval's batch (issue #25): the largest batch that fits, found by compiling; an explicit batch wins; results that
do not depend on the batch; padding rows that finish at once and are spread over the batch shards; the roofline
projection; and `opd-jax compile` checking the eval program beside the training step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import aot, roofline
from opd_jax.config import load_config
from opd_jax.data.task import EvalProblem
from opd_jax.eval.batch import EvalFit, eval_batch_size, largest_batch
from opd_jax.eval.evaluate import evaluate
from opd_jax.mesh import make_mesh
from opd_jax.sampling import SampleOutput, SamplingParams, make_sampler
from opd_jax.train_state import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small model with a large KV cache per token (8 KV heads x 128, 4 layers, fp32: 32 KB) and a 4096-token eval of
# 64 problems x 16 samples: on 4 v5e chips (16 GiB) the eval fits only part of its 1024 rows at once. The step is
# tiny and fits.
LONG_EVAL = """
algorithm: opd
groups_per_batch: 4
group_size: 2
topology: v5e-4
student: {vocab_size: 1024, hidden_size: 128, intermediate_size: 256, num_layers: 4, num_heads: 8, num_kv_heads: 8,
          head_dim: 128}
teachers:
  - name: teacher
    model: {vocab_size: 1024, hidden_size: 128, intermediate_size: 256, num_layers: 2, num_heads: 4, num_kv_heads: 2,
            head_dim: 32}
mesh: {data: 1, fsdp: -1, tensor: 1}
sampling: {max_prompt_len: 32, max_new_tokens: 16, decode_segments: 1}
data: {source: "synthetic:arithmetic"}
eval: {source: "synthetic:arithmetic", every: 10, num_problems: 64, k: 16, max_new_tokens: 4096}
"""


# ---- the search ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit, fixed, per_row, granule, cap", [
    (100, 10, 1.0, 4, 200), (100, 10, 1.0, 4, 40), (100, 200, 1.0, 4, 40), (1000, 10, 3.3, 8, 960),
    (1000, 10, 0.01, 8, 96), (50, 0, 7.0, 1, 1000)])
def test_largest_batch_is_the_largest_that_fits(limit, fixed, per_row, granule, cap):
    calls = []

    def fit(b):
        calls.append(b)
        used = fixed + per_row * b
        return EvalFit(b, used <= limit * 0.97, used, limit)

    batch, trials = largest_batch(fit, granule, cap)
    top = -(-cap // granule)
    want = max([m * granule for m in range(1, top + 1) if fixed + per_row * m * granule <= limit * 0.97] or [0])
    assert batch == want and len(trials) == len(set(calls)) <= 5, (batch, want, calls)


def test_explicit_batch_wins_and_cpu_auto(monkeypatch):
    mesh = make_mesh(load_config(None).mesh)  # 8 fake CPU devices: batch axes of 8
    cfg = load_config(None, ["eval.batch_size=20"])
    assert eval_batch_size(cfg, mesh, 1000) == 24  # as given, rounded up to the batch axes
    auto = load_config(None)
    assert eval_batch_size(auto, mesh, 1000) == 64 and eval_batch_size(auto, mesh, 10) == 16  # CPU: min(64, rows)


# ---- results independent of the batch; padding -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(None, ["mesh.fsdp=1", "mesh.data=-1"])
    mesh = make_mesh(cfg.mesh)
    model = load_model(cfg.student, seed=0, mesh=mesh)
    return cfg, mesh, model


def test_eval_samples_do_not_depend_on_the_batch(tiny):
    """Each row samples with its own key (fold_in(key, row)): batch 8 and batch 24 give the same completions (the
    numbers agree too: on this CPU the forward pass of a row does not depend on the batch beside it)."""
    cfg, mesh, model = tiny
    rng = np.random.RandomState(0)
    problems = [EvalProblem(list(rng.randint(3, 500, n)), "1", f"p{i}") for i, n in enumerate((5, 9, 7, 12, 6))]
    sampler = make_sampler(model.mdef, max_new_tokens=6, stop_token_ids=(7,), mesh=mesh)
    results = []
    for batch in (8, 24):
        results.append(evaluate(sampler, (model.trainable, model.frozen), problems, k=3,
                                grade_batch=lambda c, a: [len(x) % 2 == 0 for x in c], decode=str,
                                max_prompt_len=16, sampling=SamplingParams.create(1.0), key=jax.random.key(5),
                                batch_size=batch, shards=8))
    a, b = results
    assert [r["completions"] for r in a.rows] == [r["completions"] for r in b.rows]
    assert a.avg_at_k == b.avg_at_k and a.mean_length == b.mean_length
    assert len({c for r in a.rows for c in r["completions"]}) > 3  # the rows really sampled different things


def test_padding_rows_are_inactive_and_spread_over_the_shards():
    seen = []

    def sampler(params, tokens, mask, keys, sp, active):
        seen.append(np.asarray(active))
        B, N = tokens.shape[0], 2
        return SampleOutput(tokens=jnp.full((B, N), 2, jnp.int32), mask=jnp.asarray(active)[:, None] & True,
                            lengths=jnp.asarray(active, jnp.int32), logprobs=jnp.zeros((B, N)),
                            sampler_logprobs=jnp.zeros((B, N)), truncated=jnp.zeros((B,), bool))

    problems = [EvalProblem([3, 4], "1", f"p{i}") for i in range(13)]
    res = evaluate(sampler, None, problems, k=1, grade_batch=lambda c, a: [True] * len(c), decode=str,
                   max_prompt_len=4, sampling=SamplingParams.create(1.0), key=jax.random.key(0), batch_size=8,
                   shards=4)
    assert res.num_problems == 13 and all(r["mean_length"] == 1 for r in res.rows)
    last = seen[-1].reshape(4, 2)  # 5 real rows over 4 shards of 2 rows: no shard holds only padding
    assert last.sum() == 5 and (last.sum(axis=1) >= 1).all()


def test_inactive_rows_finish_at_once(tiny):
    cfg, mesh, model = tiny
    sampler = make_sampler(model.mdef, max_new_tokens=5, stop_token_ids=(), mesh=mesh)
    tok = jnp.tile(jnp.arange(3, 7, dtype=jnp.int32)[None], (8, 1))
    active = jnp.asarray([True, False] * 4)
    out = sampler((model.trainable, model.frozen), tok, jnp.ones_like(tok, bool),
                  jax.vmap(jax.random.key)(jnp.arange(8)), SamplingParams.create(1.0), active)
    assert np.asarray(out.lengths).tolist() == [5, 0] * 4
    assert np.asarray(out.truncated).tolist() == [True, False] * 4
    assert not np.asarray(out.mask)[1::2].any()


# ---- the roofline -----------------------------------------------------------------------------------------------
def test_roofline_floors():
    # 3 decode steps after a 2-token prompt: slots 3, 4, 5 filled; 10 bytes of weights, 1 per slot
    assert roofline.decode_bytes(10, 1, 2, 3) == 3 * 10 + (3 + 4 + 5)
    from opd_jax.flops import CHIPS

    chip = CHIPS["v5p"]
    assert roofline.floor_seconds(chip.hbm_bandwidth, 0, chip, 1) == pytest.approx(1.0)
    assert roofline.floor_seconds(0, chip.peak_flops * 4, chip, 4) == pytest.approx(1.0)
    assert roofline.eval_count(150, 10) == 16 and roofline.eval_count(10, 0) == 2
    p = roofline.Projection(step_s=2.0, step_sampling_s=1.0, eval_s=10.0, eval_batches=3, eval_batch=8, evals=4,
                            steps=20)
    assert p.run_s == 80.0 and p.eval_share == 0.5


# ---- opd-jax compile: the eval program beside the step ------------------------------------------------------------
def _compile(tmp_path, *overrides: str) -> tuple[int, dict, str]:
    site = aot.find_tpu_site() if not aot.libtpu_importable() else ""
    if site is None:
        pytest.skip("libtpu is not installed (CI: pip install --target $VENV/tpu_site libtpu==0.0.42.1, "
                    "exported as OPD_TPU_SITE)")
    path = tmp_path / "cfg.yaml"
    path.write_text(LONG_EVAL)
    out = tmp_path / f"report{len(overrides)}.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, REPO, env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-m", "opd_jax.aot", str(path), *overrides, "--fast", "--levers", "0",
                        "--json", str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode in (0, 3) and out.exists(), f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    return r.returncode, json.loads(out.read_text()), r.stdout


@pytest.mark.slow
def test_compile_plans_the_eval_batch_and_checks_a_fixed_one(tmp_path):
    """auto: the largest batch that fits (8 rows per chip at a time on a TPU); one step above it is compiled and
    refused. A fixed batch above it: the step fits, the eval does not, `opd-jax compile` says so (exit 3) and names
    the batch that fits."""
    rc, rep, out = _compile(tmp_path)
    ev = rep["eval"]
    assert rc == 0 and rep["fits"] and ev["fits"] and ev["setting"] == "auto", out
    assert 0 < ev["batch"] < ev["rows"] == 1024 and ev["batch"] % 32 == 0
    assert ev["bytes_per_chip"] <= 16 * 2**30 and ev["compiles"] <= 5
    assert "eval program" in out and "projected wall time" in out and rep["projection"]["eval_s"] > 0
    above = ev["batch"] + 32
    rc, rep2, out2 = _compile(tmp_path, f"eval.batch_size={above}")
    ev2 = rep2["eval"]
    assert rc == 3 and rep2["fits"] and not ev2["fits"] and ev2["batch"] == above, out2
    assert ev2["largest"] == ev["batch"] and f"lever: eval.batch_size={ev['batch']} fits" in out2
    assert rep2["projection"]["eval_batch"] == ev["batch"]  # the floor is the lever's: the fixed batch would not run
