"""Run pieces shared by the OPD/RL `Trainer`, the baselines (SFT, host-reward RL) and `opd-jax eval`.

- `make_eval_sampler` / `task_eval`: the jitted eval sampler and one graded evaluation of a task's eval problems
  (avg@k, pass@k, per-problem JSONL/CSV), as `Trainer.run_eval` does it.
- `load_run_model` / `restore_trainable`: a model with the trainable weights of the latest (or a given)
  checkpoint of a run directory, without its optimizer state (partial restore): any run's student can be
  evaluated or used as a teacher.
- `host_local` / `global_rows`: process-local numpy rows <-> batch-sharded global arrays, for the one step that
  leaves the XLA program (host-graded RL).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opd_jax.config.schema import ExperimentConfig, LoRAConfig, ModelConfig
from opd_jax.eval.evaluate import EvalResult, evaluate, write_eval
from opd_jax.sampling import SamplingParams, sample
from opd_jax.tasks import Task
from opd_jax.train_state import ModelDef, tree_shardings

__all__ = ["make_eval_sampler", "task_eval", "eval_sampling_params", "resolve_stop_tokens", "restore_trainable",
           "has_checkpoint", "load_run_model", "host_local", "global_rows"]


# ---- eval ----------------------------------------------------------------------------------------------
def resolve_stop_tokens(cfg: ExperimentConfig, task: Task) -> list[int]:
    """`sampling.stop_token_ids`, filled from the task when empty (the config is updated in place)."""
    if not cfg.sampling.stop_token_ids:
        cfg.sampling.stop_token_ids = list(task.stop_token_ids)
    return list(cfg.sampling.stop_token_ids)


def make_eval_sampler(mdef: ModelDef, mesh: Mesh | None, cfg: ExperimentConfig) -> Callable:
    """Jitted `fn((trainable, frozen), tokens, mask, key, sp) -> SampleOutput` with `eval.max_new_tokens`.

    Outputs are replicated so every process can read the samples back (a batch-sharded array would span other
    hosts' devices)."""
    n_new, layout = cfg.eval.max_new_tokens, cfg.sampling.layout
    stops = tuple(cfg.sampling.stop_token_ids)

    @partial(jax.jit, out_shardings=None if mesh is None else NamedSharding(mesh, PartitionSpec()))
    def eval_fn(params, tokens, mask, key, sp):
        model = mdef.merge(*params)
        return sample(model, tokens, mask, key, sp, max_new_tokens=n_new, stop_token_ids=stops, mesh=mesh,
                      layout=layout)

    return eval_fn


def eval_sampling_params(cfg: ExperimentConfig) -> SamplingParams:
    e = cfg.eval
    return SamplingParams.create(e.temperature, e.top_k, e.top_p, greedy=e.temperature <= 0)


def task_eval(cfg: ExperimentConfig, task: Task, eval_fn: Callable, params, mesh: Mesh, *, step: int,
              out_dir: str | None = None, tag: str = "eval") -> EvalResult | None:
    """Sample `eval.k` completions for each of the task's eval problems (the first `eval.num_problems`), grade
    them, and (process 0, when `out_dir` is given) write `<out_dir>/<tag>.{jsonl,csv}` and `<tag>_summary.json`.
    The key depends only on the seed and `step`, so re-evaluating a checkpoint reproduces its numbers.
    None when the task has no eval problems."""
    c = cfg
    problems = task.eval_problems()
    if c.eval.num_problems:
        problems = problems[: c.eval.num_problems]
    if not problems:
        return None
    n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = max(n_dev, min(64, len(problems) * c.eval.k))
    batch = int(math.ceil(batch / n_dev) * n_dev)  # rows shard evenly over the batch axes
    result = evaluate(
        eval_fn, params, problems, k=c.eval.k, grade_batch=task.grade_batch, decode=task.decode,
        max_prompt_len=c.sampling.max_prompt_len, sampling=eval_sampling_params(c),
        key=jax.random.fold_in(jax.random.key(c.seed + 7), int(step)), batch_size=batch, pad_id=task.pad_id,
        truncate_prompts=c.sampling.truncate_prompts,
    )
    if out_dir is not None and jax.process_index() == 0:
        write_eval(result, out_dir, name=tag)
    return result


# ---- checkpoints -------------------------------------------------------------------------------------
def restore_trainable(checkpoint_dir: str, trainable, t_axes: dict, mesh: Mesh,
                      step: int | None = None) -> tuple[dict, int]:
    """Load only `trainable` (not the optimizer state) of a `Checkpointer` checkpoint into the shardings of
    `t_axes`; `trainable` gives the shapes and dtypes (arrays or ShapeDtypeStructs). Returns (trainable, step).

    The optimizer config of the run that wrote the checkpoint does not matter (its moments are never read)."""
    path = epath.Path(checkpoint_dir)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint directory {checkpoint_dir}")
    shardings = tree_shardings(mesh, t_axes, trainable)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainable, shardings)
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint found under {checkpoint_dir}")
        tree = {"trainable": target}
        restore_args = ocp.checkpoint_utils.construct_restore_args(tree)
        out = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=True)))
    return out["state"]["trainable"], int(step)


def has_checkpoint(checkpoint_dir: str) -> bool:
    path = epath.Path(checkpoint_dir)
    return path.exists() and any(p.name.isdigit() for p in path.iterdir())


# ---- host <-> global rows ------------------------------------------------------------------------------
def host_local(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, as numpy (the inverse of `global_rows`)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    sh = x.sharding
    assert isinstance(sh, NamedSharding), sh
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, sh.mesh, sh.spec))


def global_rows(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Process-local numpy rows -> one global array in `sharding` (rows of process p follow those of p-1)."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def load_run_model(model_cfg: ModelConfig, run_dir: str | None, *, seed: int, mesh: Mesh,
                   lora: LoRAConfig | None = None, step: int | None = None):
    """`trainer.load_model`, then the trainable weights of `run_dir`'s latest checkpoint when it has one.
    Returns (LoadedModel, checkpoint step or None). LoRA runs: pass the run's `lora` config (adapters are the
    checkpointed part; the base comes from `model_cfg.hf_path`)."""
    from opd_jax.trainer import load_model  # trainer imports this module

    model = load_model(model_cfg, seed=seed, mesh=mesh, lora=lora)
    ckpt_dir = os.path.join(run_dir, "checkpoints") if run_dir else None
    if ckpt_dir is None or not has_checkpoint(ckpt_dir):
        if step is not None:
            raise FileNotFoundError(f"no checkpoints under {run_dir} (asked for step {step})")
        return model, None
    model.trainable, step = restore_trainable(ckpt_dir, model.trainable, model.t_axes, mesh, step)
    return model, step
