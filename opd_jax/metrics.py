"""Metric sinks: metrics.jsonl, TensorBoard, W&B (optional) and a live progress bar. Process 0 writes."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
from etils import epath


def check_optional_packages(cfg) -> None:
    """Before a run writes anything: the optional packages its `logging` settings need are installed. Raises
    ConfigError naming the field and the extra to install."""
    import importlib.util

    from opd_jax.errors import ConfigError

    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb=true, but the wandb package is not installed",
                          hint="pip install 'opd_jax[wandb]' (and `wandb login`), or set logging.wandb=false")


class MetricsLogger:
    def __init__(self, run_dir: str, *, total_steps: int, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "opd_jax", progress: bool = True, config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(run_dir) / "metrics.jsonl"
        self._tb = self._wandb = self._progress = None
        if not self.enabled:
            return
        epath.Path(run_dir).mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.fspath(epath.Path(run_dir) / "tensorboard"))
        if wandb:
            import wandb as wb  # optional dependency: pip install opd_jax[wandb]

            self._wandb = wb.init(project=wandb_project, dir=os.fspath(run_dir), config=config or {})
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]opd_jax"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, info="")
            self._progress.start()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _to_float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        if self._progress is not None:
            keys = [k for k in ("teacher_kl", "loss", "task_reward", "eval_accuracy", "tokens_per_s") if k in row]
            info = " ".join(f"{k}={row[k]:.4g}" for k in keys)
            self._progress.update(self._task, completed=step, info=info)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _to_float(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v
