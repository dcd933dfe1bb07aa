"""The run directory: whether a run may use it, and the one place that changes it before training.

Set-up is split in two so that a failure never changes what a run directory holds: `check_run_dir` only looks
(before any model or data is loaded) and decides what the run will do with it; `open_run_dir` acts on that
decision (moves an old run aside, creates the directory, writes `config.yaml`) and is called only once set-up has
succeeded. On resume, `trim_metrics` drops the metrics rows of steps after the restored checkpoint, which the
run is about to redo, so `metrics.jsonl` never holds a step twice.

Layout: `<run_dir>/config.yaml`, `metrics.jsonl`, `checkpoints/<step>/`, `eval/`, `tensorboard/`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Literal

import jax
from etils import epath

from opd_jax.checkpoint import has_checkpoint
from opd_jax.config import ExperimentConfig, save_config
from opd_jax.errors import RunDirError

Plan = Literal["fresh", "resume", "move_aside"]


class RunDirExistsError(RunDirError):
    """The run directory holds a run and neither resume nor overwrite was given."""


def check_run_dir(cfg: ExperimentConfig) -> Plan:
    """What this run may do with `cfg.run_dir`, deciding without writing anything:

    - "fresh": the directory is new or empty (it is created by `open_run_dir`);
    - "resume": `resume` is true or "auto" and the directory holds a checkpoint;
    - "move_aside": `overwrite=true`, or `resume="auto"` without a checkpoint: the old directory is renamed.

    Raises `RunDirExistsError` for a used directory without resume/overwrite, and `RunDirError` for `resume=true`
    where there is no checkpoint to resume from."""
    path = epath.Path(cfg.run_dir)
    used = path.exists() and path.is_dir() and any(path.iterdir())
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run_dir {cfg.run_dir} is a file, not a directory")
    ckpt = used and has_checkpoint(str(path / "checkpoints"))
    if cfg.resume is True:
        if not ckpt:
            what = "is empty or does not exist" if not used else \
                "holds no checkpoint (" + ", ".join(sorted(p.name for p in path.iterdir())[:4]) + ")"
            raise RunDirError(
                f"resume=true, but run_dir {cfg.run_dir} {what}: there is nothing to resume",
                hint="start it with resume=false (add overwrite=true to move an old run aside), or pass "
                     "resume=auto to resume when a checkpoint exists and start fresh otherwise")
        return "resume"
    if cfg.resume == "auto" and ckpt:
        return "resume"
    if not used:
        return "fresh"
    if cfg.overwrite or cfg.resume == "auto":
        return "move_aside"
    raise RunDirExistsError(
        f"run_dir {cfg.run_dir} already exists",
        hint="pass resume=true to continue it, or overwrite=true to start over (the old directory is kept, renamed)")


def open_run_dir(cfg: ExperimentConfig, plan: Plan) -> None:
    """Act on `plan` (process 0 writes; all processes wait for it): move an old run aside, create the directory,
    and write the resolved `config.yaml` (a resumed run writes the config it now runs with)."""
    path = epath.Path(cfg.run_dir)
    if plan == "move_aside" and jax.process_index() == 0:
        backup = f"{cfg.run_dir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        if cfg.run_dir.startswith("gs://"):
            path.rename(backup)
        else:
            shutil.move(cfg.run_dir, backup)
        why = "overwrite=true" if cfg.overwrite else "resume=auto found no checkpoint"
        print(f"{why}: moved the previous run to {backup}")
    _sync_processes("opd_jax:run_dir_moved")
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir)
    _sync_processes("opd_jax:run_dir_open")


def trim_metrics(run_dir: str, step: int) -> int:
    """Drop the rows of `<run_dir>/metrics.jsonl` logged after `step` (process 0); returns how many were dropped.
    A resumed run redoes those steps, and each step must appear once."""
    path = epath.Path(run_dir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return 0
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) != len([line for line in lines if line.strip()]):
        text = "".join(line + "\n" for line in keep)
        if "://" in str(path):  # object stores replace an object whole
            path.write_text(text)
        else:  # write beside it and swap in, so a crash leaves the old or the new file, never half of one
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
    return len(lines) - len(keep)


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


__all__ = ["Plan", "RunDirExistsError", "check_run_dir", "open_run_dir", "trim_metrics"]
