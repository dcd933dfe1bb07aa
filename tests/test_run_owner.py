"""One owner per run directory (issue #23): the claim itself (a local fcntl lock, a lease for object stores) and
two real `opd-jax train` processes on one directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd_jax.run_owner import RunDirInUseError, RunDirOwner, owner_path

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from opd_jax.run_owner import RunDirOwner
RunDirOwner(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_the_claim_lives_beside_the_run_dir(tmp_path):
    assert owner_path(str(tmp_path / "runs" / "x")) == str(tmp_path / "runs" / ".x.owner")
    assert owner_path("gs://bkt/runs/x/") == "gs://bkt/runs/.x.owner"


def test_a_live_owner_refuses_a_second_and_a_dead_one_is_taken_over(tmp_path):
    run = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUseError, match=rf"in use by another job \(host .*, pid {holder.pid}, started "):
            RunDirOwner(run).acquire()
        assert not Path(run).exists()  # the claim is beside the run dir: refusing it touched nothing
    finally:
        holder.kill()  # SIGKILL: no release, the kernel drops the lock
        holder.wait()
    mine = RunDirOwner(run)
    note = mine.acquire()
    assert f"pid {holder.pid}" in note and "took over the claim of a job that is gone" in note
    again = RunDirOwner(run)  # another Trainer of this same process shares the claim
    assert again.acquire() == ""
    again.release()
    mine.release()
    assert RunDirOwner(run).acquire() == ""  # a released claim is taken without a word


def test_a_lease_refuses_while_renewed_and_is_taken_over_when_expired(tmp_path):
    """The object-store mode, on a local path: a renewed lease holds; one whose owner stopped renewing (died)
    expires and is taken over, and the log says whose it was."""
    run = str(tmp_path / "run")
    a = RunDirOwner(run, mode="lease", lease_s=0.6)
    assert a.acquire() == ""
    time.sleep(0.5)  # past a third of the lease: renewed in the background
    with pytest.raises(RunDirInUseError, match="its lease runs until"):
        RunDirOwner(run, mode="lease", lease_s=0.6).acquire()
    a._stop.set()  # the owner dies: no more renewals, the lease is left behind
    time.sleep(0.8)
    b = RunDirOwner(run, mode="lease", lease_s=0.6)
    assert "took over the expired lease" in b.acquire()
    b.release()
    assert not Path(owner_path(run)).exists()
    c = RunDirOwner(run, mode="lease", lease_s=0.6)
    assert c.acquire() == ""
    c.release()


def _train(run: Path, *overrides: str, wait: bool = True):
    cmd = [sys.executable, "-m", "opd_jax.cli", "train", str(REPO / "configs" / "base.yaml"), f"run_dir={run}",
           "logging.progress=false", "logging.tensorboard=false", "sampling.max_new_tokens=4", "groups_per_batch=2",
           "group_size=2", "checkpoint.every=50", "checkpoint.async_save=false", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for_claim(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    path = Path(owner_path(str(run)))
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and path.read_text().strip() and json.loads(path.read_text())["pid"] == proc.pid \
                and (run / "metrics.jsonl").exists():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("the first job never claimed the run dir")


@pytest.mark.slow
def test_two_jobs_one_run_dir(tmp_path):
    """Two `opd-jax train resume=true` on one run dir used to both run, both write checkpoints, and repeat steps
    in metrics.jsonl. Now the second exits 2 at once with one line naming the first (host, pid, start time), and
    the run holds each step once; a job killed with SIGKILL leaves a claim the next job takes over, saying so."""
    run = tmp_path / "run"
    first = _train(run, "steps=400", "resume=auto", wait=False)
    try:
        _wait_for_claim(run, first)
        second = _train(run, "steps=400", "resume=true")
        err = [ln for ln in second.stderr.splitlines() if ln.startswith("opd-jax: error:")]
        assert second.returncode == 2 and len(err) == 1, second.stderr[-2000:]
        assert f"run_dir {run} is in use by another job" in err[0] and f"pid {first.pid}" in err[0]
        assert first.wait(timeout=600) == 0, first.stdout.read()[-3000:]
    finally:
        first.kill()
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert steps == list(range(1, 401))
    # SIGKILL mid-run: the claim is stale; the next job takes it over and says whose it was
    killed = _train(run, "steps=2000", "resume=true", wait=False)
    try:
        _wait_for_claim(run, killed)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        killed.kill()
    third = _train(run, "steps=401", "resume=true")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "took over the claim of a job that is gone (host" in third.stdout and f"pid {killed.pid}" in third.stdout
