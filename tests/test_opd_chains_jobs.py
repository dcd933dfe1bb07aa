"""`experiments.opd_chains.jobs`: the worker pool `run_all` hands its training runs to, and the records that keep a
resumed stage from reusing a run of another design."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.opd_chains.jobs import Jobs, wait_all


def _square(x: int) -> int:
    return x * x


def _pid(_: int) -> int:
    import os
    import time

    time.sleep(0.2)  # long enough for the second worker to take the other job
    return os.getpid()


def _fail(x: int) -> int:
    raise ValueError(f"job {x} failed")


@pytest.mark.parametrize("workers", [1, 2])
def test_jobs_return_results_in_order_and_raise_a_jobs_error(workers):
    """Inline (1) and with worker processes (2): `call` returns what the job returned; a chain started with `start`
    returns its calls' results; a failing job's error reaches the caller, after the other chains finished."""
    import os

    with Jobs(workers) as jobs:
        assert jobs.call(_square, 7) == 49
        chains = [jobs.start(lambda k: [jobs.call(_square, k), jobs.call(_square, k + 1)], k) for k in range(4)]
        assert wait_all(chains) == [[k * k, (k + 1) ** 2] for k in range(4)]
        pids = set(wait_all([jobs.start(jobs.call, _pid, k) for k in range(4)]))
        assert (pids == {os.getpid()}) == (workers == 1)  # the pool's jobs run in other processes
        ok = jobs.start(jobs.call, _square, 3)
        with pytest.raises(ValueError, match="job 5 failed"):
            wait_all([jobs.start(jobs.call, _fail, 5), ok])
        assert ok.result() == 9


def test_run_all_refuses_zero_workers(capsys):
    from experiments.opd_chains.run_all import main

    with pytest.raises(SystemExit) as e:
        main(["--workers", "0"])
    assert e.value.code == 2 and "--workers 0: must be at least 1" in capsys.readouterr().err


def test_sft_curve_reruns_a_record_of_another_pool(tmp_path, monkeypatch):
    """A 12-step curve's pool keeps only samples with every step right (`pool_reward='steps'`): a record trained on
    a pool graded by the answer alone is neither reused nor reported."""
    from experiments.opd_chains import sft_curve

    monkeypatch.setattr(sft_curve, "RESULTS", tmp_path / "sft_curve")
    plan = sft_curve.CurvePlan(sizes=(16,), seeds=(0,), steps=10, every=5, length=12, pool_reward="steps")
    runs = plan.results / "runs"
    runs.mkdir(parents=True)
    curve = [{"step": 0, "val": {"accuracy": 0.2}, "test": {"accuracy": 0.2}},
             {"step": 5, "val": {"accuracy": 0.5}, "test": {"accuracy": 0.4}}]
    old = {"name": "sft_n16_s0", "size": 16, "seed": 0, "steps": 10, "wall_s": 1.0, "curve": curve, "best_step": 5,
           "test_at_best": 0.4, "val_at_best": 0.5}  # written before pools had a grading: the answer's
    (runs / "sft_n16_s0.json").write_text(json.dumps(old))
    assert not sft_curve.all_recorded(plan)
    assert sft_curve.report(plan)["sizes"] == {}
    (runs / "sft_n16_s0.json").write_text(json.dumps({**old, "pool_reward": "steps"}))
    assert sft_curve.all_recorded(plan)
    assert sft_curve.run_one(plan, None, [], 16, 0, tmp_path)["pool_reward"] == "steps"  # reused, not rerun
    assert sft_curve.report(plan)["sizes"]["16"]["values"] == [0.4]


def test_a_lengths_record_names_its_teachers_weights(tmp_path):
    """Two exports with different weights get different digests (an OPD record of a retrained RL teacher is not
    reused); the same bytes, the same digest."""
    from experiments.opd_chains.lengths import weights_digest

    for name, data in (("a", b"weights-1"), ("b", b"weights-1"), ("c", b"weights-2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(data)
    assert weights_digest(tmp_path / "a") == weights_digest(tmp_path / "b") != weights_digest(tmp_path / "c")
    assert len(weights_digest(Path(tmp_path / "a"))) == 12
