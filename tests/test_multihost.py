"""Multi-host training, preemption and crash recovery, every run a real `opd-jax train` subprocess on CPU.

- 2 processes x 4 fake CPU devices (`jax.distributed` with a local coordinator) train on one 8-device mesh until
  one of them gets SIGTERM; both save, and a second launch resumes: metrics.jsonl (train steps and evals) equals a
  single-process 8-device run of the same config.
- SIGTERM: a single-process run saves at the step it reached and exits 75 (preempted, resumable); `resume=true`
  continues from there.
- SIGKILL: a run with `checkpoint.every=2` is killed (with a half-written checkpoint left behind); the resumed run
  repeats the steps after its last checkpoint exactly as an uninterrupted run did.

All runs share one reference run and one persistent compilation cache. Child processes run in their own process
groups and are always killed in a `finally`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd_jax.cli import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("multihost_worker.py")
REF_STEPS = 12
LAUNCH_TIMEOUT_S = 600.0
TIMING_KEYS = {"step", "step_time", "tokens_per_s", "mfu"}

# Tiny and deterministic: dims divisible by the (fsdp=4, tensor=2) mesh, 4 prompts x 2 samples, 8 new tokens.
CONFIG = f"""\
extends: {REPO / "configs" / "base.yaml"}
seed: 0
steps: {REF_STEPS}
groups_per_batch: 4
group_size: 2
student: {{vocab_size: 32, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 4, num_kv_heads: 2,
          head_dim: 8}}
teachers:
  - name: teacher
    model: {{vocab_size: 32, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 4, num_kv_heads: 2,
            head_dim: 8}}
mesh: {{data: 1, fsdp: 4, tensor: 2}}
sampling: {{max_prompt_len: 24, max_new_tokens: 8, temperature: 1.0}}
optim: {{learning_rate: 1e-3, schedule: constant, warmup_steps: 0}}
data: {{source: "synthetic:arithmetic:2", shuffle_seed: 0}}
eval: {{source: "synthetic:arithmetic:2", every: 1, num_problems: 4, k: 2, max_new_tokens: 8}}
checkpoint: {{every: 2, max_to_keep: 3, async_save: false}}
logging: {{progress: false, tensorboard: false, wandb: false}}
"""


# ---- subprocess plumbing -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "OMPI_",
                                "TPU_WORKER_HOSTNAMES", "MEGASCALE_"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", OPD_TEST_COMPILATION_CACHE=str(cache_dir),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
    return env


class Launch:
    """One `opd-jax train` launch of `num_processes` processes (each in its own process group)."""

    def __init__(self, config: Path, run_dir: Path, overrides: list[str], *, cache_dir: Path,
                 num_processes: int = 1, devices_per_process: int = 8, name: str = "run"):
        self.run_dir = run_dir
        self.logs: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        args = [str(config), f"run_dir={run_dir}", *overrides]
        if num_processes > 1:
            port = _free_port()
            args += [f"distributed.coordinator_address=localhost:{port}",
                     f"distributed.num_processes={num_processes}"]
        env = _env(devices_per_process, cache_dir)
        try:
            for i in range(num_processes):
                log = run_dir.parent / f"{name}.p{i}.log"
                self.logs.append(log)
                extra = [f"distributed.process_id={i}"] if num_processes > 1 else []
                with open(log, "wb") as f:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, str(WORKER), *args, *extra], cwd=REPO, env=env,
                        stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
        except BaseException:
            self.kill()
            raise

    def output(self) -> str:
        return "\n".join(f"---- {log.name} ----\n" + "\n".join(
            line for line in log.read_text(errors="replace").splitlines() if not line.startswith("[Gloo]"))[-6000:]
            for log in self.logs if log.exists())

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> list[int]:
        """Exit codes of all processes; a failed process takes the others down (they would hang in a collective)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                if all(c is not None for c in codes):
                    return codes  # type: ignore[return-value]
                if any(c not in (None, 0, EXIT_PREEMPTED) for c in codes):
                    self.kill()
                    pytest.fail(f"a process failed (exit codes {codes}):\n{self.output()}")
                if time.monotonic() > deadline:
                    self.kill()
                    pytest.fail(f"timed out after {timeout:.0f}s:\n{self.output()}")
                time.sleep(0.2)
        except BaseException:
            self.kill()
            raise

    def check(self, timeout: float = LAUNCH_TIMEOUT_S, expect: int = 0) -> None:
        codes = self.wait(timeout)
        assert codes == [expect] * len(codes), f"exit codes {codes}:\n{self.output()}"

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


# ---- metrics ---------------------------------------------------------------------------------------
def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by SIGKILL
            continue
    return out


def _by_step(rows: list[dict], key: str) -> dict[int, dict]:
    """The last row of each step that has `key` (a resumed run repeats the steps after its checkpoint)."""
    return {int(r["step"]): r for r in rows if key in r}


def _train_steps(run_dir: Path) -> list[int]:
    return sorted(_by_step(_rows(run_dir), "loss"))


def _assert_close(got: dict, want: dict, keys: list[str] | None, tol: float, where: str) -> None:
    """`got[k]` == `want[k]` within `tol` (absolute and relative); keys=None: every metric of `want` except timings
    (and the eval ones a periodic eval merged into `want` but not into `got`)."""
    if keys is None:
        keys = sorted(k for k in want if k not in TIMING_KEYS and (k in got or not k.startswith("eval_")))
    assert keys, where
    for k in keys:
        a, b = float(got[k]), float(want[k])
        assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), f"{where}: {k} = {a!r}, reference {b!r}"


def _checkpoint_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def _poll_until_step(launch: Launch, step: int, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in _train_steps(launch.run_dir)):
        codes = [p.poll() for p in launch.procs]
        if any(c is not None for c in codes):
            launch.kill()
            pytest.fail(f"the run exited ({codes}) before step {step}:\n{launch.output()}")
        if time.monotonic() > deadline:
            launch.kill()
            pytest.fail(f"no step {step} after {timeout:.0f}s:\n{launch.output()}")
        time.sleep(0.05)


# ---- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="module")
def config(workdir: Path) -> Path:
    path = workdir / "tiny.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def cache_dir(workdir: Path) -> Path:
    path = workdir / "jax_cache"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def reference(workdir: Path, config: Path, cache_dir: Path) -> list[dict]:
    """One uninterrupted single-process run on 8 devices: the ground truth of every test here."""
    with Launch(config, workdir / "reference", [], cache_dir=cache_dir, name="reference") as run:
        run.check()
    rows = _rows(workdir / "reference")
    assert sorted(_by_step(rows, "loss")) == list(range(1, REF_STEPS + 1)), run.output()
    return rows


# ---- tests -----------------------------------------------------------------------------------------
def test_two_processes_match_single_process(workdir: Path, config: Path, cache_dir: Path,
                                            reference: list[dict]) -> None:
    """2 processes x 4 devices train on one 8-device mesh (checkpoint.every=2) until process 1 alone gets SIGTERM:
    both stop at the same step, save it together and exit 75 (preempted). A second launch resumes for 2 more steps.
    Every train step and every eval (at the start of each launch and the end) equals the single-process 8-device
    run."""
    run_dir = workdir / "two_procs"
    mh = dict(cache_dir=cache_dir, num_processes=2, devices_per_process=4)
    with Launch(config, run_dir, ["steps=40", "eval.every=0"], name="two_procs_a", **mh) as first:
        _poll_until_step(first, 2)
        first.procs[1].send_signal(signal.SIGTERM)  # one host is preempted; process 0 only learns it collectively
        first.check(expect=EXIT_PREEMPTED)
        out = first.output()
    reached = _train_steps(run_dir)[-1]
    assert out.count(f"SIGTERM: saving at step {reached} and exiting") == 2, out
    if reached + 2 > REF_STEPS:
        pytest.fail(f"SIGTERM landed too late (step {reached}) to compare with the {REF_STEPS}-step reference")
    assert _checkpoint_steps(run_dir)[-1] == reached, out
    assert (run_dir / "config.yaml").exists()

    with Launch(config, run_dir, [f"steps={reached + 2}", "eval.every=0", "resume=true"], name="two_procs_b",
                **mh) as second:
        second.check()
    assert f"at step {reached}" in second.output(), second.output()
    assert _checkpoint_steps(run_dir)[-1] == reached + 2

    rows = _rows(run_dir)
    ref_train, ref_eval = _by_step(reference, "loss"), _by_step(reference, "eval_accuracy")
    train = [r for r in rows if "loss" in r]
    assert [int(r["step"]) for r in train] == list(range(1, reached + 3)), "process 0 alone logs each step once"
    for row in train:
        _assert_close(row, ref_train[int(row["step"])], None, 1e-4, f"step {row['step']}")
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [int(r["step"]) for r in evals] == [0, reached, reached + 2]  # launch 1 start, launch 2 start and end
    for row in evals:
        keys = sorted(k for k in row if k.startswith("eval_"))
        _assert_close(row, ref_eval[int(row["step"])], keys, 1e-4, f"eval at step {row['step']}")


def test_sigterm_saves_and_resumes(workdir: Path, config: Path, cache_dir: Path, reference: list[dict]) -> None:
    """SIGTERM after a couple of steps: exit 75 with a checkpoint at the step reached; resume=true goes on."""
    run_dir = workdir / "sigterm"
    long_run = ["steps=40", "checkpoint.every=1000", "eval.every=0"]
    with Launch(config, run_dir, long_run, cache_dir=cache_dir, name="sigterm_a") as run:
        _poll_until_step(run, 2)
        run.procs[0].send_signal(signal.SIGTERM)
        run.check(expect=EXIT_PREEMPTED)
        out = run.output()
    reached = _train_steps(run_dir)[-1]
    assert f"SIGTERM: saving at step {reached}" in out
    if reached + 2 > REF_STEPS:
        pytest.fail(f"SIGTERM landed too late (step {reached}) to compare with the {REF_STEPS}-step reference")
    assert _checkpoint_steps(run_dir) == [reached], out

    steps = reached + 2
    with Launch(config, run_dir, [*long_run[1:], f"steps={steps}", "resume=true"], cache_dir=cache_dir,
                name="sigterm_b") as resumed:
        resumed.check()
    assert f"at step {reached}" in resumed.output(), resumed.output()
    train_rows = [r for r in _rows(run_dir) if "loss" in r]
    assert [int(r["step"]) for r in train_rows] == list(range(1, steps + 1)), "no step repeated or skipped"
    ref_train = _by_step(reference, "loss")
    for row in train_rows:
        _assert_close(row, ref_train[int(row["step"])], ["teacher_kl", "loss", "grad_norm"], 1e-5,
                      f"step {row['step']}")
    assert _checkpoint_steps(run_dir)[-1] == steps


def test_sigint_saves_like_sigterm(workdir: Path, config: Path, cache_dir: Path) -> None:
    """Ctrl-C (SIGINT) stops like a preemption: a checkpoint at the step reached, exit 75, resumable."""
    run_dir = workdir / "sigint"
    with Launch(config, run_dir, ["steps=40", "checkpoint.every=1000", "eval.every=0"], cache_dir=cache_dir,
                name="sigint") as run:
        _poll_until_step(run, 2)
        run.procs[0].send_signal(signal.SIGINT)
        run.check(expect=EXIT_PREEMPTED)
        out = run.output()
    reached = _train_steps(run_dir)[-1]
    assert f"SIGINT: saving at step {reached}" in out, out
    assert _checkpoint_steps(run_dir) == [reached], out


def test_sigkill_and_resume(workdir: Path, config: Path, cache_dir: Path, reference: list[dict]) -> None:
    """kill -9 after step 3 (checkpoint.every=2), plus a half-written checkpoint left behind; the resumed run repeats
    the steps after its last checkpoint exactly as the uninterrupted run, and metrics.jsonl holds each step once
    (the killed run's rows after its checkpoint are dropped on resume)."""
    run_dir = workdir / "sigkill"
    with Launch(config, run_dir, ["steps=40", "eval.every=0"], cache_dir=cache_dir, name="sigkill_a") as run:
        _poll_until_step(run, 3)
        os.killpg(run.procs[0].pid, signal.SIGKILL)
        assert run.wait() == [-signal.SIGKILL]
    reached = _train_steps(run_dir)[-1]
    saved = _checkpoint_steps(run_dir)
    assert saved and saved[-1] >= 2 and reached - saved[-1] <= 2, (reached, saved)
    last = saved[-1]
    if last >= REF_STEPS - 1:
        pytest.fail(f"the kill landed too late (checkpoint {last}) to compare with the {REF_STEPS}-step reference")
    # what a kill in the middle of the next save leaves: an unfinished orbax temporary directory
    partial = run_dir / "checkpoints" / f"{last + 2}.orbax-checkpoint-tmp"
    if not partial.exists():
        (partial / "state").mkdir(parents=True)
        (partial / "state" / "manifest.ocdbt").write_bytes(b"\x00" * 16)
    steps = min(last + 3, REF_STEPS)

    with Launch(config, run_dir, [f"steps={steps}", "eval.every=0", "resume=true"], cache_dir=cache_dir,
                name="sigkill_b") as resumed:
        resumed.check()
    assert f"at step {last}" in resumed.output(), resumed.output()
    rows = [r for r in _rows(run_dir) if "loss" in r]
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1)), "each step once, the redone ones replaced"
    ref_train = _by_step(reference, "loss")
    for row in rows:  # the killed run's steps up to its checkpoint and the resumed ones
        _assert_close(row, ref_train[int(row["step"])], ["teacher_kl", "loss", "grad_norm"], 1e-5,
                      f"step {row['step']}")
    assert last + 2 in _checkpoint_steps(run_dir)
    assert not partial.exists(), "the re-save of the step replaced the unfinished temporary directory"
