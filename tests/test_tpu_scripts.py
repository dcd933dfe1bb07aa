"""The tpu/*.sh wrappers around gcloud: syntax, --dry-run output, argument checks, and the remote commands they build.

No gcloud is needed: --dry-run prints the exact gcloud command lines, a fake `gcloud` on PATH stands in for the real
one in the non-dry-run check, and the `--command=...` strings meant for the TPU VMs are run here with bash against a
temporary $HOME holding fake `opd-jax` / `python3` / `uv` executables.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU = ROOT / "tpu"
SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "sweep.sh", "logs.sh", "delete.sh"]
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash not available")

SSH = "gcloud compute tpus tpu-vm ssh"
REMOTE_PREFIX = 'mkdir -p ~/opd_jax_logs && cd ~/opd_jax && export PATH="$HOME/opd_jax_venv/bin:$PATH" && '


# Never reach a real gcloud: a stand-in that fails loudly comes first on PATH for every script run here.
_GUARD = Path(tempfile.mkdtemp(prefix="opd-gcloud-guard-"))
(_GUARD / "gcloud").write_text("#!/bin/sh\necho 'real gcloud called from a test' >&2\nexit 99\n")
(_GUARD / "gcloud").chmod(0o755)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPD_")}
    env["PATH"] = f"{_GUARD}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


def sh(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(TPU / script), *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        timeout=60,
    )


def dry(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> list[str]:
    r = sh(script, "--dry-run", *args, env=env, cwd=cwd)  # first: anything after `--` goes to gcloud
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def remote_command(line: str) -> str:
    """The --command=... argument of a printed gcloud ssh line, as the remote shell receives it."""
    (cmd,) = [a[len("--command=") :] for a in shlex.split(line) if a.startswith("--command=")]
    return cmd


def make_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# A stand-in for an executable: appends {"argv", "cwd", "env"} as one JSON line to $HOME/calls.jsonl.
RECORDER = f"""#!{sys.executable}
import json, os, sys
with open(os.path.join(os.environ["HOME"], "calls.jsonl"), "a") as f:
    f.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:], "cwd": os.getcwd(),
                        "env": {{k: os.environ.get(k) for k in ("A", "K")}}}}) + "\\n")
print("fake", os.path.basename(sys.argv[0]), "ran")
"""


def calls(home: Path, n: int = 0, timeout: float = 10.0) -> list[dict]:
    """Recorded calls; waits until at least `n` are there (the remote commands start background jobs)."""
    path = home / "calls.jsonl"
    deadline = time.time() + timeout
    while True:
        out = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        if len(out) >= n or time.time() > deadline:
            return out
        time.sleep(0.05)


@pytest.fixture
def fake_home(tmp_path: Path) -> Path:
    """A worker's home directory after tpu/setup.sh: ~/opd_jax and an opd-jax in ~/opd_jax_venv/bin."""
    home = tmp_path / "home"
    (home / "opd_jax").mkdir(parents=True)
    make_exe(home / "opd_jax_venv" / "bin" / "opd-jax", RECORDER)
    return home


def run_remote(cmd: str, home: Path, path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    env = clean_env(HOME=str(home))
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run([BASH, "-c", cmd], capture_output=True, text=True, env=env, cwd=home, timeout=60)


# ---------------------------------------------------------------------------------------------------------------------
# syntax, lint, usage


@pytest.mark.parametrize("script", [*SCRIPTS, "common.sh"])
def test_bash_syntax(script):
    r = subprocess.run([BASH, "-n", str(TPU / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    r = subprocess.run(
        ["shellcheck", "-x", *[f"tpu/{s}" for s in [*SCRIPTS, "common.sh"]]], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_slurm_example_is_valid_bash():
    sbatch = ROOT / "docs" / "slurm_example.sbatch"
    r = subprocess.run([BASH, "-n", str(sbatch)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(sbatch)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable(script):
    assert os.access(TPU / script, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_exits_0(script, flag):
    r = sh(script, flag)
    assert r.returncode == 0
    assert r.stdout.startswith(f"Usage: tpu/{script}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_args_is_usage_error(script):
    r = sh(script)
    assert r.returncode == 2
    assert "error:" in r.stderr and f"Usage: tpu/{script}" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize(
    "script,args,msg",
    [
        ("create.sh", ["--name", "t", "--zone", "z"], "--accelerator-type is required"),
        ("create.sh", ["--zone", "z", "--accelerator-type", "v5p-8"], "--name is required"),
        ("create.sh", ["--name", "t", "--accelerator-type", "v5p-8"], "--zone is required"),
        (
            "create.sh",
            ["--name", "t", "--zone", "z", "--accelerator-type", "v5p-8", "--spot", "--reserved"],
            "exclusive",
        ),
        ("create.sh", ["--name", "t", "--zone", "z", "--accelerator-type", "tpu7x-8"], "--runtime-version"),
        ("create.sh", ["--name", "t", "--zone", "z", "--bogus"], "unknown argument"),
        ("create.sh", ["--name"], "--name needs a value"),
        ("setup.sh", ["--name", "t", "--zone", "z", "--scp", "--repo", "u"], "--scp"),
        ("launch.sh", ["--name", "t", "--zone", "z", "--run-dir", "gs://b/r"], "--config is required"),
        ("launch.sh", ["--name", "t", "--zone", "z", "--config", "c.yaml"], "--run-dir is required"),
        ("launch.sh", ["--name", "t", "--zone", "z", "--config", "c.yaml", "--run-dir", "gs://b", "oops"], "key=value"),
        ("launch.sh", ["--name", "t", "--zone", "z", "--config", "c", "--run-dir", "gs://b", "run_dir=x"], "--run-dir"),
        ("launch.sh", ["--name", "t", "--zone", "z", "--config", "/c.yaml", "--run-dir", "gs://b"], "inside"),
        ("sweep.sh", ["--zone", "z", "--sequential", "--name", "t"], "--sweep is required"),
        ("sweep.sh", ["--sweep", "s.yaml", "--zone", "z"], "--sequential"),
        ("sweep.sh", ["--sweep", "s.yaml", "--zone", "z", "--sequential"], "--name"),
        ("sweep.sh", ["--sweep", "s.yaml", "--zone", "z", "--sequential", "--name", "t", "--slices", "a"], "not both"),
        ("sweep.sh", ["--sweep", "s.yaml", "--zone", "z", "--slices", ","], "at least one"),
        ("logs.sh", ["--name", "t", "--zone", "z", "--worker", "x"], "--worker"),
        ("delete.sh", ["--name", "t"], "--zone is required"),
    ],
)
def test_bad_arguments_exit_2(script, args, msg):
    r = sh(script, "--dry-run", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert msg in r.stderr
    assert "Usage:" in r.stderr
    assert r.stdout == ""


def test_env_defaults_for_name_zone_project():
    env = clean_env(OPD_TPU_NAME="envtpu", OPD_TPU_ZONE="us-east5-a", OPD_GCP_PROJECT="proj")
    assert dry("delete.sh", env=env) == [
        "gcloud compute tpus tpu-vm delete envtpu --zone=us-east5-a --project=proj --quiet"
    ]
    # flags win over the environment
    assert dry("delete.sh", "--name", "other", env=env) == [
        "gcloud compute tpus tpu-vm delete other --zone=us-east5-a --project=proj --quiet"
    ]


# ---------------------------------------------------------------------------------------------------------------------
# create.sh


def test_create_spot():
    assert dry("create.sh", "--name", "opd", "--zone", "us-east5-a", "--accelerator-type", "v5p-64", "--spot") == [
        "gcloud compute tpus tpu-vm create opd --zone=us-east5-a"
        " --accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot"
    ]


def test_create_queued_spot_with_project_and_extra_flags():
    out = dry(
        "create.sh",
        "--name=opd",
        "--zone=us-east5-a",
        "--accelerator-type=v5p-64",
        "--queued",
        "--spot",
        "--project",
        "my-proj",
        "--",
        "--valid-until-duration=6h",
    )
    assert out == [
        "gcloud compute tpus queued-resources create opd --node-id=opd --zone=us-east5-a --project=my-proj"
        " --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot --valid-until-duration=6h"
    ]


def test_create_queued_reserved_explicit_runtime():
    out = dry(
        "create.sh", "--name", "q", "--zone", "z", "--accelerator-type", "v5p-8", "--queued", "--reserved",
        "--runtime-version", "v2-alpha-tpuv5-custom",
    )  # fmt: skip
    assert out == [
        "gcloud compute tpus queued-resources create q --node-id=q --zone=z"
        " --accelerator-type=v5p-8 --runtime-version=v2-alpha-tpuv5-custom --reserved"
    ]


@pytest.mark.parametrize(
    "accel,version",
    [
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v3-8", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-128", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_default_runtime_per_generation(accel, version):
    (line,) = dry("create.sh", "--name", "t", "--zone", "z", "--accelerator-type", accel)
    assert line == f"gcloud compute tpus tpu-vm create t --zone=z --accelerator-type={accel} --version={version}"


# ---------------------------------------------------------------------------------------------------------------------
# setup.sh

INSTALL = (
    'export PATH="$HOME/.local/bin:$PATH" && python3 -m pip install --user --quiet --upgrade uv'
    " && { [ -x ~/opd_jax_venv/bin/python ] || uv venv --python 3.11 ~/opd_jax_venv; }"
    ' && cd ~/opd_jax && uv pip install --python ~/opd_jax_venv/bin/python -e ".[tpu]"'
)


def test_setup_git_clone_with_ref():
    out = dry(
        "setup.sh", "--name", "opd", "--zone", "z", "--repo", "https://github.com/acme/opd_jax.git", "--ref", "v1"
    )
    assert out == [
        f"{SSH} opd --zone=z --worker=all --command='"
        "if [ -d ~/opd_jax/.git ]; then git -C ~/opd_jax fetch --tags origin;"
        " else git clone https://github.com/acme/opd_jax.git ~/opd_jax; fi"
        " && git -C ~/opd_jax fetch origin v1 && git -C ~/opd_jax checkout --detach FETCH_HEAD"
        f" && {INSTALL}'"
    ]


def test_setup_default_repo_is_origin(tmp_path):
    """Without --repo the clone URL is the checkout's `origin` (tpu/ copied into a fresh repo: ours stays untouched)."""
    repo = tmp_path / "repo"
    shutil.copytree(TPU, repo / "tpu")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "remote", "add", "origin", "git@github.com:acme/opd.git"], check=True)
    r = subprocess.run(
        [BASH, str(repo / "tpu" / "setup.sh"), "--name", "t", "--zone", "z", "--dry-run"],
        capture_output=True, text=True, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    cmd = remote_command(r.stdout.strip())
    assert "git clone git@github.com:acme/opd.git ~/opd_jax;" in cmd
    assert "git -C ~/opd_jax checkout --detach origin/HEAD" in cmd


def test_setup_scp():
    out = dry("setup.sh", "--name", "opd", "--zone", "z", "--project", "p", "--scp", "--extras", "tpu,test",
              "--python", "3.12")  # fmt: skip
    tarball = f"{os.environ.get('TMPDIR', '/tmp')}/opd_jax-src-opd.tar.gz"
    assert out[0] == (
        f"bash -c 'set -o pipefail; cd {ROOT} && git ls-files -z --cached --others --exclude-standard"
        f" | tar -czf {tarball} --null -T -'"
    ) or out[0].startswith("bash -c 'tar -czf")  # (not a git checkout)
    assert out[1:] == [
        f"gcloud compute tpus tpu-vm scp {tarball} opd:opd_jax-src.tar.gz --zone=z --project=p --worker=all",
        f"{SSH} opd --zone=z --project=p --worker=all --command='rm -rf ~/opd_jax && mkdir -p ~/opd_jax"
        " && tar -xzf ~/opd_jax-src.tar.gz -C ~/opd_jax && rm -f ~/opd_jax-src.tar.gz && "
        + INSTALL.replace("3.11", "3.12").replace(".[tpu]", ".[tpu,test]")
        + "'",
    ]


def test_setup_scp_runs_gcloud_for_real(tmp_path):
    """Not a dry run: a fake gcloud records the calls and keeps a copy of the tarball it was asked to copy."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    fakebin = tmp_path / "bin"
    make_exe(
        fakebin / "gcloud",
        f"""#!{sys.executable}
import json, shutil, sys
with open({str(tmp_path / "gcloud.jsonl")!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:5] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(sys.argv[5], {str(tmp_path / "copied.tar.gz")!r})
""",
    )
    env = clean_env(TMPDIR=str(tmp_path))
    env["PATH"] = f"{fakebin}:{env['PATH']}"
    r = sh("setup.sh", "--name", "opd", "--zone", "z", "--scp", env=env)
    assert r.returncode == 0, r.stderr
    recorded = [json.loads(x) for x in (tmp_path / "gcloud.jsonl").read_text().splitlines()]
    assert [c[:5] for c in recorded] == [
        ["compute", "tpus", "tpu-vm", "scp", str(tmp_path / "opd_jax-src-opd.tar.gz")],
        ["compute", "tpus", "tpu-vm", "ssh", "opd"],
    ]
    assert recorded[1][-1].startswith("--command=rm -rf ~/opd_jax && mkdir -p ~/opd_jax && tar -xzf")
    assert not (tmp_path / "opd_jax-src-opd.tar.gz").exists()  # the local tarball is cleaned up
    with tarfile.open(tmp_path / "copied.tar.gz") as tar:
        names = set(tar.getnames())
    assert "tpu/setup.sh" in names and "tests/test_tpu_scripts.py" in names
    assert not any("__pycache__" in n or n.startswith(".git/") for n in names)


def _git(*args: str, cwd: Path) -> str:
    env = clean_env(
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
        GIT_CONFIG_GLOBAL="/dev/null", GIT_CONFIG_NOSYSTEM="1",
    )  # fmt: skip
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def test_setup_remote_command_clones_updates_and_checks_out_ref(tmp_path, fake_home):
    """The command setup.sh sends to the workers, run here against a local repo, twice (fresh, then an update)."""
    shutil.rmtree(fake_home / "opd_jax")
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    _git("init", "-q", "-b", "main", cwd=upstream)
    (upstream / "f.txt").write_text("one\n")
    _git("add", "f.txt", cwd=upstream)
    _git("commit", "-q", "-m", "one", cwd=upstream)
    _git("tag", "v1", cwd=upstream)
    fakebin = tmp_path / "bin"
    make_exe(fakebin / "python3", RECORDER)
    make_exe(
        fakebin / "uv",
        RECORDER + "if sys.argv[1] == 'venv':\n"
        "    os.makedirs(os.path.join(sys.argv[-1], 'bin'), exist_ok=True)\n"
        "    open(os.path.join(sys.argv[-1], 'bin', 'python'), 'w').close()\n"
        "    os.chmod(os.path.join(sys.argv[-1], 'bin', 'python'), 0o755)\n",
    )

    (line,) = dry("setup.sh", "--name", "t", "--zone", "z", "--repo", str(upstream))
    r = run_remote(remote_command(line), fake_home, fakebin)
    assert r.returncode == 0, r.stderr
    assert (fake_home / "opd_jax" / "f.txt").read_text() == "one\n"
    got = calls(fake_home)
    assert [c["prog"] for c in got] == ["python3", "uv", "uv"]
    assert got[0]["argv"] == ["-m", "pip", "install", "--user", "--quiet", "--upgrade", "uv"]
    assert got[1]["argv"] == ["venv", "--python", "3.11", str(fake_home / "opd_jax_venv")]
    assert got[2]["argv"] == ["pip", "install", "--python", f"{fake_home}/opd_jax_venv/bin/python", "-e", ".[tpu]"]
    assert got[2]["cwd"] == str(fake_home / "opd_jax")

    # upstream moves on; a re-run updates the clone to the default branch, and reuses the venv
    (upstream / "f.txt").write_text("two\n")
    _git("commit", "-q", "-am", "two", cwd=upstream)
    (fake_home / "calls.jsonl").unlink()
    r = run_remote(remote_command(line), fake_home, fakebin)
    assert r.returncode == 0, r.stderr
    assert (fake_home / "opd_jax" / "f.txt").read_text() == "two\n"
    assert [c["argv"][0] for c in calls(fake_home)] == ["-m", "pip"]  # no second `uv venv`

    # --ref pins a tag
    (line,) = dry("setup.sh", "--name", "t", "--zone", "z", "--repo", str(upstream), "--ref", "v1")
    r = run_remote(remote_command(line), fake_home, fakebin)
    assert r.returncode == 0, r.stderr
    assert (fake_home / "opd_jax" / "f.txt").read_text() == "one\n"


# ---------------------------------------------------------------------------------------------------------------------
# launch.sh


def test_launch_with_overrides():
    out = dry(
        "launch.sh", "--name", "opd", "--zone", "us-east5-a", "--config", "configs/aime24/stage2_opd.yaml",
        "--run-dir", "gs://bkt/runs/stage2", "resume=true", "sampling.temperature=0.6",
    )  # fmt: skip
    assert out == [
        f"{SSH} opd --zone=us-east5-a --worker=all --command='{REMOTE_PREFIX}"
        "{ nohup opd-jax train configs/aime24/stage2_opd.yaml run_dir=gs://bkt/runs/stage2 resume=true"
        " sampling.temperature=0.6 >> ~/opd_jax_logs/opd.log 2>&1 < /dev/null & }'"
    ]


def test_launch_quotes_values_env_and_log_name():
    out = dry(
        "launch.sh", "--name", "opd", "--zone", "z", "--project", "p", "--config", "configs/base.yaml",
        "--run-dir", "gs://b/r", "--env", "A=x y", "--log-name", "try 2", "data.name=it's a b", "eval.source=",
    )  # fmt: skip
    assert out == [
        f"{SSH} opd --zone=z --project=p --worker=all --command='{REMOTE_PREFIX}"
        '{ A="x y" nohup opd-jax train configs/base.yaml run_dir=gs://b/r'
        ' data.name="it\'"\'"\'s a b" eval.source=""'
        " >> ~/opd_jax_logs/try_2.log 2>&1 < /dev/null & }'"
    ]


def test_launch_makes_config_repo_relative(tmp_path):
    (line,) = dry(
        "launch.sh", "--name", "t", "--zone", "z", "--config", str(ROOT / "tpu" / "x.yaml"), "--run-dir", "gs://b"
    )
    assert "opd-jax train tpu/x.yaml run_dir=gs://b " in line
    (line,) = dry(
        "launch.sh", "--name", "t", "--zone", "z", "--config", "../tpu/x.yaml", "--run-dir", "gs://b", cwd=TPU
    )
    assert "opd-jax train tpu/x.yaml run_dir=gs://b " in line
    (line,) = dry("launch.sh", "--name", "t", "--zone", "z", "--config", "gs://b/c.yaml", "--run-dir", "gs://b")
    assert "opd-jax train gs://b/c.yaml run_dir=gs://b " in line


@pytest.mark.parametrize("run_dir", ["runs/x", "/tmp/x", "s3://b/x", "gs://", "GS://b/x"])
def test_launch_refuses_non_gs_run_dir(run_dir):
    r = sh("launch.sh", "--name", "t", "--zone", "z", "--config", "c.yaml", "--run-dir", run_dir, "--dry-run")
    assert r.returncode == 2
    assert "must be a gs:// path" in r.stderr and "--allow-local" in r.stderr
    assert r.stdout == ""


def test_launch_allow_local():
    (line,) = dry(
        "launch.sh", "--name", "t", "--zone", "z", "--config", "c.yaml", "--run-dir", "runs/x", "--allow-local"
    )
    assert "opd-jax train c.yaml run_dir=runs/x >> ~/opd_jax_logs/t.log" in line


def test_launch_remote_command_runs_opd_jax_in_background(fake_home):
    (line,) = dry(
        "launch.sh", "--name", "opd", "--zone", "z", "--config", "configs/base.yaml", "--run-dir", "gs://b/r",
        "--env", "A=x y", "data.name=it's a \"b\"", "x=$HOME", "steps=3",
    )  # fmt: skip
    t0 = time.time()
    r = run_remote(remote_command(line), fake_home)
    assert r.returncode == 0, r.stderr
    assert time.time() - t0 < 5  # returns at once; the run goes on in the background
    (call,) = calls(fake_home, 1)
    assert call["argv"] == [
        "train",
        "configs/base.yaml",
        "run_dir=gs://b/r",
        'data.name=it\'s a "b"',
        "x=$HOME",
        "steps=3",
    ]
    assert call["cwd"] == str(fake_home / "opd_jax")
    assert call["env"]["A"] == "x y"
    log = fake_home / "opd_jax_logs" / "opd.log"
    deadline = time.time() + 5
    while "fake opd-jax ran" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.05)
    assert "fake opd-jax ran" in log.read_text()


# ---------------------------------------------------------------------------------------------------------------------
# sweep.sh

TWO_RUNS = (
    "printf '%s\\n' '# 2 runs of '\"$1\"'' 'opd-jax train configs/base.yaml optim.learning_rate=1e-4"
    " run_dir=gs://b/sw/lr=1e-4' '' 'opd-jax train configs/base.yaml optim.learning_rate=3e-4"
    " '\"'\"'data.name=a b'\"'\"' run_dir=gs://b/sw/lr=3e-4'"
)
RUN0 = "opd-jax train configs/base.yaml optim.learning_rate=1e-4 run_dir=gs://b/sw/lr=1e-4"
RUN1 = "opd-jax train configs/base.yaml optim.learning_rate=3e-4 'data.name=a b' run_dir=gs://b/sw/lr=3e-4"


def sweep_env(print_cmd: str = TWO_RUNS) -> dict[str, str]:
    return clean_env(OPD_SWEEP_PRINT_CMD=print_cmd)


def test_sweep_fake_listing_prints_two_runs():
    r = subprocess.run([BASH, "-c", TWO_RUNS, "x", "configs/sweeps/lr.yaml"], capture_output=True, text=True)
    assert r.stdout.splitlines() == ["# 2 runs of configs/sweeps/lr.yaml", RUN0, "", RUN1]


def test_sweep_sequential_one_slice():
    out = dry(
        "sweep.sh", "--sweep", "configs/sweeps/lr.yaml", "--zone", "z", "--sequential", "--name", "opd", env=sweep_env()
    )
    chain = f"{RUN0} >> ~/opd_jax_logs/lr-0.log 2>&1; {RUN1} >> ~/opd_jax_logs/lr-1.log 2>&1"
    q = "'\"'\"'"  # a single quote inside the single-quoted --command
    assert out == [
        f"{SSH} opd --zone=z --worker=all --command='{REMOTE_PREFIX}"
        f'{{ nohup bash -c "{chain.replace(chr(39), q)}" > /dev/null 2>&1 < /dev/null & }}\''
    ]


def test_sweep_round_robin_over_slices():
    out = dry(
        "sweep.sh", "--sweep", "configs/sweeps/lr.yaml", "--zone", "z", "--project", "p", "--slices", "a,b,c",
        "--env", "K=v", "--log-prefix", "lr2", "steps=5", env=sweep_env(),
    )  # fmt: skip
    q = "'\"'\"'"
    assert out == [
        f"{SSH} a --zone=z --project=p --worker=all --command='{REMOTE_PREFIX}"
        f'{{ nohup bash -c "K=v {RUN0} steps=5 >> ~/opd_jax_logs/lr2-0.log 2>&1" > /dev/null 2>&1 < /dev/null & }}\'',
        f"{SSH} b --zone=z --project=p --worker=all --command='{REMOTE_PREFIX}"
        f'{{ nohup bash -c "K=v {RUN1.replace(chr(39), q)} steps=5 >> ~/opd_jax_logs/lr2-1.log 2>&1"'
        " > /dev/null 2>&1 < /dev/null & }'",
    ]  # slice c gets no run


def test_sweep_more_runs_than_slices_chain_per_slice():
    listing = "for i in 0 1 2 3 4; do echo opd-jax train c.yaml run_dir=gs://b/r$i; done"
    out = dry("sweep.sh", "--sweep", "tpu/s.yaml", "--zone", "z", "--slices", "a,b", env=sweep_env(listing))
    assert len(out) == 2
    a, b = (remote_command(x) for x in out)
    assert "run_dir=gs://b/r0 >> ~/opd_jax_logs/s-0.log" in a and "r2 >> ~/opd_jax_logs/s-2.log" in a and "r4" in a
    assert "run_dir=gs://b/r1 >> ~/opd_jax_logs/s-1.log" in b and "r3" in b and "r0" not in b


def test_sweep_listing_gets_repo_relative_sweep_path(tmp_path):
    listing = 'echo "opd-jax train configs/base.yaml run_dir=gs://b/$1 x=$(pwd)"'
    (line,) = dry("sweep.sh", "--sweep", "../configs/sweeps/lr.yaml", "--zone", "z", "--sequential", "--name", "t",
                  env=sweep_env(listing), cwd=TPU)  # fmt: skip
    assert f"run_dir=gs://b/configs/sweeps/lr.yaml x={ROOT} >>" in remote_command(line)


def test_sweep_remote_command_runs_runs_in_order(fake_home):
    (line,) = dry("sweep.sh", "--sweep", "configs/sweeps/lr.yaml", "--zone", "z", "--sequential", "--name", "opd",
                  "--env", "K=v w", env=sweep_env())  # fmt: skip
    r = run_remote(remote_command(line), fake_home)
    assert r.returncode == 0, r.stderr
    got = calls(fake_home, 2)
    assert [c["argv"] for c in got] == [shlex.split(RUN0)[1:], shlex.split(RUN1)[1:]]
    assert all(c["env"]["K"] == "v w" and c["cwd"] == str(fake_home / "opd_jax") for c in got)
    for i in range(2):
        log = fake_home / "opd_jax_logs" / f"lr-{i}.log"
        deadline = time.time() + 5
        while not (log.exists() and "fake opd-jax ran" in log.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        assert "fake opd-jax ran" in log.read_text()


@pytest.mark.parametrize(
    "listing,msg",
    [
        ("echo opd-jax train c.yaml run_dir=runs/x", "run_dir=gs://"),
        ("echo python train.py run_dir=gs://b", "expected 'opd-jax train"),
        ("true", "no runs"),
        ("exit 3", "listing the runs failed"),
    ],
)
def test_sweep_bad_listings(listing, msg):
    r = sh(
        "sweep.sh",
        "--sweep",
        "s.yaml",
        "--zone",
        "z",
        "--sequential",
        "--name",
        "t",
        "--dry-run",
        env=sweep_env(listing),
    )
    assert r.returncode == 1
    assert msg in r.stderr
    assert r.stdout == ""


def test_sweep_allow_local():
    listing = "echo opd-jax train c.yaml run_dir=runs/x"
    out = dry("sweep.sh", "--sweep", "s.yaml", "--zone", "z", "--sequential", "--name", "t", "--allow-local",
              env=sweep_env(listing))  # fmt: skip
    assert "opd-jax train c.yaml run_dir=runs/x >> ~/opd_jax_logs/s-0.log" in out[0]


def test_sweep_rejects_run_dir_override():
    r = sh("sweep.sh", "--sweep", "s.yaml", "--zone", "z", "--sequential", "--name", "t", "run_dir=gs://b", "--dry-run",
           env=sweep_env())  # fmt: skip
    assert r.returncode == 2 and "run_dir" in r.stderr


def test_sweep_without_opd_jax_or_override():
    env = clean_env(PATH=f"{_GUARD}:/usr/bin:/bin")
    r = sh("sweep.sh", "--sweep", "s.yaml", "--zone", "z", "--sequential", "--name", "t", "--dry-run", env=env)
    if shutil.which("opd-jax", path=env["PATH"]):
        pytest.skip("opd-jax installed system-wide")
    assert r.returncode == 1 and "OPD_SWEEP_PRINT_CMD" in r.stderr


# ---------------------------------------------------------------------------------------------------------------------
# logs.sh, delete.sh


def test_logs():
    assert dry("logs.sh", "--name", "opd", "--zone", "z") == [
        f"{SSH} opd --zone=z --worker=0 --command='tail -n 100 -F ~/opd_jax_logs/opd.log'"
    ]
    assert dry(
        "logs.sh",
        "--name",
        "opd",
        "--zone",
        "z",
        "--worker",
        "3",
        "--log-name",
        "lr-1",
        "--lines=20",
        "--no-follow",
        "--project",
        "p",
    ) == [  # fmt: skip
        f"{SSH} opd --zone=z --project=p --worker=3 --command='tail -n 20 ~/opd_jax_logs/lr-1.log'"
    ]
    assert dry("logs.sh", "--name", "opd", "--zone", "z", "--list") == [
        f"{SSH} opd --zone=z --worker=0 --command='ls -lt ~/opd_jax_logs'"
    ]


def test_delete():
    assert dry("delete.sh", "--name", "opd", "--zone", "z") == [
        "gcloud compute tpus tpu-vm delete opd --zone=z --quiet"
    ]
    assert dry("delete.sh", "--name", "opd", "--zone", "z", "--queued", "--project", "p", "--async") == [
        "gcloud compute tpus queued-resources delete opd --zone=z --project=p --force --quiet --async"
    ]
