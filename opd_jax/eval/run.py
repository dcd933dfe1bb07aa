"""`opd-jax eval CONFIG [key=value ...]`: sampled evaluation of a student.

The weights: `student` (hf_path or a seeded init), then the trainable weights of the latest checkpoint in
`run_dir` when it has one (`Checkpointer` layout; the optimizer state is not read). The problems: the task's
eval problems (`synthetic:*` generates them; text tasks read `eval.source`), the first `eval.num_problems`.
Each is sampled `eval.k` times with the jitted sampler at `eval.temperature` / `eval.top_p` / `eval.top_k`,
`eval.max_new_tokens` new tokens. Prints avg@k +- stderr, pass@k, mean length and truncation rate, and writes
`<run_dir>/eval/<name>.jsonl` (with completions), `<name>.csv` and `<name>_summary.json`, where name is
`eval_cli_step<N>` for a checkpoint and `eval_cli` otherwise.
"""

from __future__ import annotations

import json
import os
import sys

import jax

from opd_jax.checkpoint import load_run_model
from opd_jax.config import ExperimentConfig
from opd_jax.data import build_task
from opd_jax.data.task import resolve_stop_tokens
from opd_jax.distributed import initialize_distributed
from opd_jax.eval.evaluate import EvalResult, make_eval_sampler, task_eval
from opd_jax.mesh import make_mesh
from opd_jax.train_state import check_model_sources

__all__ = ["run_eval", "run_eval_cli"]


def run_eval(cfg: ExperimentConfig, *, out_name: str | None = None) -> tuple[EvalResult | None, dict]:
    """Evaluate the config's student (its run's latest checkpoint when there is one). Returns the result (None
    without eval problems) and info: checkpoint step, output name and directory."""
    initialize_distributed(cfg.distributed)
    check_model_sources([("student", cfg.student)])
    mesh = make_mesh(cfg.mesh)
    task = build_task(cfg, process_index=jax.process_index(), process_count=jax.process_count())
    stops = resolve_stop_tokens(cfg.sampling.stop_token_ids, task)
    model, step = load_run_model(cfg.student, cfg.run_dir, seed=cfg.seed, mesh=mesh, lora=cfg.lora)
    name = out_name or (f"eval_cli_step{step}" if step is not None else "eval_cli")
    out_dir = os.path.join(cfg.run_dir, "eval")
    eval_fn = make_eval_sampler(model.mdef, mesh, cfg, stops)
    result = task_eval(cfg, task, eval_fn, (model.trainable, model.frozen), mesh, step=step or 0, out_dir=out_dir,
                       tag=name)
    return result, {"checkpoint_step": step, "name": name, "out_dir": out_dir}


def run_eval_cli(cfg: ExperimentConfig) -> int:
    result, info = run_eval(cfg)
    if result is None:
        print("opd-jax eval: the task has no eval problems (set eval.source for text data)", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        k = result.k
        src = f"checkpoint step {info['checkpoint_step']} of {cfg.run_dir}" if info["checkpoint_step"] is not None \
            else (cfg.student.hf_path or f"random init (seed {cfg.seed})")
        print(f"{src}: {result.num_problems} problems x {k} samples")
        print(f"avg@{k} = {result.avg_at_k:.4f} +- {result.stderr:.4f}   pass@{k} = {result.pass_at_k:.4f}   "
              f"mean length = {result.mean_length:.1f}   truncated = {result.truncation_rate:.3f}")
        print(f"wrote {os.path.join(info['out_dir'], info['name'])}.{{jsonl,csv}} and _summary.json")
        print(json.dumps(result.summary()))
    return 0
