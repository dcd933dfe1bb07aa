"""Data: the task contract (`task`), task implementations (`synthetic`, `text_task`) with their graders
(`math_grading`), record sources, datasets and chat renderers, and `build_task`, the factory that picks a task
implementation from `data.source`."""

from __future__ import annotations

from opd_jax.config.schema import ExperimentConfig
from opd_jax.data.task import Task


def build_task(cfg: ExperimentConfig, *, process_index: int = 0, process_count: int = 1) -> Task:
    """The task of `cfg.data.source`: `synthetic:chains[...]` is the miniature's task (`opd_jax.data.chains`),
    other `synthetic:*` tasks are generated on the fly (`opd_jax.data.synthetic`), and every other source is text
    rendered with chat templates (`opd_jax.data.text_task`). Raises ConfigError / DataError for a bad source."""
    if cfg.data.source.split(":")[:2] == ["synthetic", "chains"]:  # the OPD miniature's task
        from opd_jax.data.chains import make_chains_task

        return make_chains_task(cfg, process_index=process_index, process_count=process_count)
    if cfg.data.source.startswith("synthetic:"):
        from opd_jax.data.synthetic import make_synthetic_task

        return make_synthetic_task(cfg, process_index=process_index, process_count=process_count)
    from opd_jax.data.text_task import TextTask

    return TextTask(cfg, process_index=process_index, process_count=process_count)


__all__ = ["build_task"]
