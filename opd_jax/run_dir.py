"""The run directory: whether a run may use it, and the one place that changes it before training.

Set-up is split in two so that a failure never changes what a run directory holds: `check_run_dir` only looks
(before any model or data is loaded) and decides what the run will do with it; `open_run_dir` acts on that
decision (moves an old run aside, creates the directory, writes `config.yaml`) and is called only once set-up has
succeeded. On resume, `trim_metrics` drops the metrics rows of steps after the restored checkpoint, which the
run is about to redo, so `metrics.jsonl` never holds a step twice.

One job owns a run directory at a time: `opd_jax.run_owner` (the claim beside it) is taken before anything here
looks at it.

Layout: `<run_dir>/config.yaml`, `metrics.jsonl`, `checkpoints/<step>/`, `eval/`, `tensorboard/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Literal

import jax
import yaml
from etils import epath

from opd_jax.checkpoint import has_checkpoint
from opd_jax.config import ExperimentConfig, ModelConfig, config_to_dict, save_config, to_yaml
from opd_jax.config.presets import resolve_model_config
from opd_jax.errors import ConfigError, RunDirError

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
    if path.is_dir() and "://" not in cfg.run_dir:  # a local run dir we could read but not write (read-only mount)
        probe = os.path.join(cfg.run_dir, f".opd_jax-write-probe-{os.getpid()}")
        try:
            with open(probe, "w"):
                pass
            os.unlink(probe)
        except OSError as e:
            raise RunDirError(f"run_dir {cfg.run_dir} cannot be written: {e.strerror}",
                              hint="point run_dir at a writable location") from None
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


# ---- resume: what changed since the run's last config ------------------------------------------------------------
# A resumed run may change how it runs and how long; it may not change what it trains or on what.
NOT_COMPARED = ("run_dir", "resume", "overwrite", "checkpoint.resume_step", "checkpoint.fallback_to_intact")
# ModelConfig fields that change how the same weights run, not the weights (student.*: everything else is refused)
MODEL_RUN_FIELDS = ("hf_path", "preset", "dtype", "remat", "attention_chunk", "cpu_decode_kernel", "decode_attention",
                    "decode_unroll")
DATA_FIELDS = ("data.source", "data.name", "data.split", "data.prompt_field", "data.answer_field", "data.tokenizer",
               "data.renderer", "data.shuffle_seed", "data.max_examples")


def last_config_path(run_dir: str) -> epath.Path:
    """The config the run last ran under: its newest `config.resume-<time>.yaml`, else `config.yaml`."""
    path = epath.Path(run_dir)
    resumed = sorted(p for p in path.glob("config.resume-*.yaml"))
    return resumed[-1] if resumed else path / "config.yaml"


def _flat(d: object, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out: dict = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _expanded(d: dict) -> dict:
    """A config dict whose model sections are resolved (a config.yaml written before presets were expanded at load
    keeps `preset:` and the defaults it filled in)."""
    sections = [d.get("student")] + [t.get("model") for t in d.get("teachers") or [] if isinstance(t, dict)]
    for m in sections:
        if isinstance(m, dict) and m.get("preset"):
            m.update(dataclasses.asdict(resolve_model_config(ModelConfig(**m))), preset=None)
    return d


def resume_changes(cfg: ExperimentConfig) -> list[str]:
    """Compare `cfg` with the config `cfg.run_dir` last ran under, field by field. Returns the changes a resume may
    make ('field: old -> new': learning rate, steps, eval cadence, logging, ...); raises ConfigError naming every
    field and both values when a change would make it another run (the student's architecture or weight dtype, its
    LoRA adapters, the data, the algorithm, switching gradient clipping on or off: the optimizer state's shape)."""
    path = last_config_path(cfg.run_dir)
    if not path.exists():
        return []
    try:
        old = _flat(_expanded(yaml.safe_load(path.read_text()) or {}))
    except (yaml.YAMLError, TypeError) as e:
        print(f"warning: {path} is unreadable ({e}); resuming without comparing the configs")
        return []
    new = _flat(config_to_dict(cfg))
    refused, allowed = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b or key in NOT_COMPARED or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and
                                             not isinstance(a, bool) and float(a) == float(b)):
            continue
        line = f"{key}: {a!r} -> {b!r}"
        field = key.rsplit(".", 1)[-1]
        if (key.startswith("student.") and (field not in MODEL_RUN_FIELDS
                                             or (field == "hf_path" and cfg.lora.rank > 0))) \
                or (key.startswith("lora.") and (cfg.lora.rank > 0 or old.get("lora.rank", 0))) \
                or key in DATA_FIELDS or key == "algorithm" \
                or (key == "optim.grad_clip" and (float(a or 0) > 0) != (float(b or 0) > 0)):
            refused.append(line)
        else:
            allowed.append(line)
    if refused:
        raise ConfigError(f"resume: run_dir {cfg.run_dir} cannot continue under this config, it changes what the run "
                          f"trains ({path.name} vs now): {'; '.join(refused)}",
                          hint="start another run_dir for the new setting (or overwrite=true to start over here; the "
                               "old run is kept, renamed)")
    return allowed


def open_run_dir(cfg: ExperimentConfig, plan: Plan, changes: list[str] | None = None) -> None:
    """Act on `plan` (process 0 writes; all processes wait for it): move an old run aside, create the directory,
    write `config.yaml` for a new run; a resumed run keeps every config it ran under: when the config changed
    (`changes`, from `resume_changes`), the new one goes to `config.resume-<time>.yaml` beside the first."""
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
        if plan != "resume":
            save_config(cfg, cfg.run_dir)
        elif changes:
            name = f"config.resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
            (path / name).write_text(to_yaml(cfg))
            print(f"resume: the config changed ({'; '.join(changes)}); kept as {name} beside config.yaml")
    _sync_processes("opd_jax:run_dir_open")


def trim_metrics(run_dir: str, step: int) -> int:
    """Drop the rows of `<run_dir>/metrics.jsonl` logged after `step` (process 0 writes, every process returns once
    it is done); returns how many were dropped. A resumed run redoes those steps, and each step must appear once."""
    path = epath.Path(run_dir) / "metrics.jsonl"
    dropped = 0
    if jax.process_index() == 0 and path.exists():
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
        dropped = len(lines) - len(keep)
    _sync_processes("opd_jax:metrics_trimmed")
    return dropped


def eval_steps_logged(run_dir: str) -> set[int]:
    """The steps that have an eval row in `<run_dir>/metrics.jsonl` (every process can read it: a resumed run
    evaluates its starting step only when no eval of that step is logged, all processes deciding alike)."""
    path = epath.Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r.get("step", -1)) for r in rows if any(k.startswith("eval_") for k in r)}


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


__all__ = ["Plan", "RunDirExistsError", "check_run_dir", "eval_steps_logged", "open_run_dir", "resume_changes",
           "trim_metrics"]
