"""The training loop around the fused step: models and data on one mesh, checkpoints, metrics, eval, SIGTERM.

One `Trainer.run()` call = `cfg.steps` calls of the one-program step. The host only feeds prompt tokens in and
reads scalar metrics out.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from opd_jax import flops
from opd_jax.checkpoint import Checkpointer
from opd_jax.config import ExperimentConfig, save_config
from opd_jax.config.schema import LoRAConfig, ModelConfig
from opd_jax.distributed import initialize_distributed
from opd_jax.mesh import make_mesh
from opd_jax.metrics import MetricsLogger
from opd_jax.models.presets import resolve_model_config
from opd_jax.models.qwen3 import abstract_model, build_model, model_axes
from opd_jax.run_setup import make_eval_sampler, task_eval
from opd_jax.sampling import SamplingParams
from opd_jax.step import PromptBatch, StepBuilder, batch_shardings, make_opd_step
from opd_jax.tasks import Task, build_task
from opd_jax.train_state import (
    ModelDef,
    TrainState,
    init_train_state,
    make_optimizer,
    split_model,
    state_shardings,
    tree_shardings,
)


class NonFiniteLossError(RuntimeError):
    pass


class RunDirExistsError(FileExistsError):
    pass


# ---- models ----------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    cfg: ModelConfig
    mdef: ModelDef
    trainable: dict
    frozen: dict
    t_axes: dict
    f_axes: dict


def load_model(cfg: ModelConfig, *, seed: int, mesh: Mesh, lora: LoRAConfig | None = None) -> LoadedModel:
    """Weights from `cfg.hf_path` (streamed tensor by tensor into their shardings) or a seeded random init
    created directly in its shardings (no full copy on one device)."""
    cfg = resolve_model_config(cfg)
    if cfg.hf_path:
        from opd_jax.models.hf_io import hf_config_for

        cfg = hf_config_for(cfg)
    mdef, t_abs, f_abs, t_axes, f_axes = split_model(abstract_model(cfg, lora))
    t_sh, f_sh = tree_shardings(mesh, t_axes, t_abs), tree_shardings(mesh, f_axes, f_abs)

    if not cfg.hf_path:
        def init():
            _, t, f, _, _ = split_model(build_model(cfg, seed, lora))
            return t, f

        trainable, frozen = jax.jit(init, out_shardings=(t_sh, f_sh))()
        return LoadedModel(cfg, mdef, trainable, frozen, t_axes, f_axes)

    from opd_jax.models.hf_io import load_hf_params

    base = load_hf_params(cfg.hf_path, cfg, mesh=mesh)
    if not mdef.lora:
        return LoadedModel(cfg, mdef, base, {}, t_axes, f_axes)

    def init_adapters():  # only the LoRA leaves are materialized; the base comes from the checkpoint
        return split_model(build_model(cfg, seed, lora))[1]

    trainable = jax.jit(init_adapters, out_shardings=t_sh)()
    frozen = base
    return LoadedModel(cfg, mdef, trainable, frozen, t_axes, f_axes)


# ---- run directory -----------------------------------------------------------------------------------
def prepare_run_dir(cfg: ExperimentConfig) -> None:
    """Refuse to reuse a run directory unless resuming; `overwrite=true` moves the old one aside (never deletes)."""
    path = epath.Path(cfg.run_dir)
    used = path.exists() and any(path.iterdir())
    _sync_processes("opd_jax:run_dir_checked")  # all processes look before any of them writes to it
    if used:
        if cfg.resume:
            return
        if not cfg.overwrite:
            raise RunDirExistsError(
                f"run_dir {cfg.run_dir} already exists; pass resume=true to continue it or overwrite=true to "
                "start over (the old directory is kept, renamed)")
        if jax.process_index() == 0:
            backup = f"{cfg.run_dir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            if cfg.run_dir.startswith("gs://"):
                path.rename(backup)
            else:
                shutil.move(cfg.run_dir, backup)
            print(f"overwrite=true: moved the previous run to {backup}")
        _sync_processes("opd_jax:run_dir_moved")
    path.mkdir(parents=True, exist_ok=True)


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def peak_flops_per_device(device: jax.Device) -> float:
    """bf16 peak for the MFU figure. Override with OPD_PEAK_FLOPS."""
    if "OPD_PEAK_FLOPS" in os.environ:
        return float(os.environ["OPD_PEAK_FLOPS"])
    kind = device.device_kind.lower()
    for name, chip in flops.CHIPS.items():
        if name in kind.replace(" ", "").replace("lite", "e"):
            return chip.peak_flops
    table = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "b200": 2250e12}
    for name, v in table.items():
        if name in kind:
            return v
    return 3.4e11 if device.platform == "cpu" else float("nan")  # measured XLA fp32 matmul peak, 2-core CPU


# ---- trainer ---------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: ExperimentConfig, task: Task | None = None):
        if cfg.algorithm not in ("opd", "rl"):
            raise ValueError(f"algorithm {cfg.algorithm!r} runs through opd_jax.baselines, not the OPD trainer")
        self._open_run(cfg, task, cfg.groups_per_batch, "groups_per_batch")
        sampling = cfg.sampling
        if not sampling.stop_token_ids:
            sampling.stop_token_ids = list(self.task.stop_token_ids)

        use_teachers = cfg.algorithm == "opd" or cfg.loss.kl_penalty_coef != 0
        self.teachers = [load_model(t.model, seed=cfg.seed + 1 + i, mesh=self.mesh)
                         for i, t in enumerate(cfg.teachers)] if use_teachers else []
        self.teacher_params = [t.trainable for t in self.teachers]
        self.teacher_shardings = [tree_shardings(self.mesh, t.t_axes, t.trainable) for t in self.teachers]
        s = self._init_student()
        reward_fn = self.task.reward_fn if (cfg.algorithm == "rl" or cfg.loss.task_reward_coef) else None
        self.builder = StepBuilder(cfg, s.mdef, [t.mdef for t in self.teachers], self.mesh, self.optimizer,
                                   reward_fn=reward_fn)
        example = self._next_batch(peek=True)
        self.batch_shardings = batch_shardings(self.mesh, example)
        self.step_fn = make_opd_step(self.builder, self.shardings, self.teacher_shardings, example)
        self.sp = SamplingParams.create(sampling.temperature, sampling.top_k, sampling.top_p, sampling.greedy)
        self.key = jax.random.key(cfg.seed)
        self._open_loop()

    # ---- set-up shared with the baselines' trainers ---------------------------------------------------------
    def _open_run(self, cfg: ExperimentConfig, task: Task | None, rows: int, what: str) -> None:
        """Distributed init, the run dir and its resolved config, the mesh, the task (`rows` per step must
        divide over the processes; `what` names the config key in the error)."""
        initialize_distributed(cfg.distributed)
        self.cfg = cfg
        prepare_run_dir(cfg)
        if jax.process_index() == 0:
            save_config(cfg, cfg.run_dir)
        self.mesh = make_mesh(cfg.mesh)
        n_proc = jax.process_count()
        if rows % n_proc:
            raise ValueError(f"{what}={rows} must divide over {n_proc} processes")
        self.task = task or build_task(cfg, process_index=jax.process_index(), process_count=n_proc)

    def _init_student(self) -> LoadedModel:
        """The student, the optimizer and the sharded train state."""
        cfg = self.cfg
        s = self.student = load_model(cfg.student, seed=cfg.seed, mesh=self.mesh, lora=cfg.lora)
        self.optimizer = make_optimizer(cfg.optim, cfg.steps)
        self.shardings = state_shardings(self.optimizer, s.trainable, s.frozen, s.t_axes, s.f_axes, self.mesh)
        self.state = init_train_state(self.optimizer, s.trainable, s.frozen, self.shardings)
        return s

    def _open_loop(self) -> None:
        """Checkpointer, metric sinks and loop counters; restores the latest checkpoint when resuming."""
        cfg = self.cfg
        self.checkpointer = Checkpointer(os.path.join(cfg.run_dir, "checkpoints"),
                                         max_to_keep=cfg.checkpoint.max_to_keep, async_save=cfg.checkpoint.async_save)
        self.logger = MetricsLogger(cfg.run_dir, total_steps=cfg.steps, tensorboard=cfg.logging.tensorboard,
                                    wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                                    progress=cfg.logging.progress)
        self._eval_fn = None
        self._stop_requested = False
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.start_step = 0
        if cfg.resume and self.checkpointer.latest_step() is not None:
            self._restore()

    # ---- data ------------------------------------------------------------------------------------------
    def _next_batch(self, peek: bool = False) -> PromptBatch:
        c = self.cfg
        n_local = c.groups_per_batch // jax.process_count()
        saved = self.task.state()
        rows = self.task.next_prompts(n_local)
        if peek:
            self.task.restore(saved)
        else:
            self.last_rows = rows  # this step's prompts and answers, for a host-side grader (baselines.rl)
        arrays = self.task.pack(rows, c.sampling.max_prompt_len, c.sampling.truncate_prompts)
        if peek:  # shapes of the global batch (every process's rows), for the shardings
            return PromptBatch(**{k: np.zeros((c.groups_per_batch, *v.shape[1:]), v.dtype) if v.ndim else v
                                  for k, v in arrays.items()})
        out = {}
        for name, arr in arrays.items():
            sh = getattr(self.batch_shardings, name)
            if arr.ndim == 0:
                out[name] = jax.device_put(arr, sh)
                continue
            shape = (c.groups_per_batch, *arr.shape[1:])
            mine = range(jax.process_index() * n_local, (jax.process_index() + 1) * n_local)
            if jax.process_count() > 1 and _addressable_rows(sh, shape) != set(mine):
                # this process's devices hold other rows than the task's slice (e.g. rows replicated when the batch
                # does not divide over the batch axes): gather all processes' rows first
                from jax.experimental import multihost_utils

                full = multihost_utils.process_allgather(arr, tiled=True)
                out[name] = jax.make_array_from_callback(shape, sh, lambda idx, full=full: full[idx])
            else:
                out[name] = jax.make_array_from_process_local_data(sh, arr, shape)
        return PromptBatch(**out)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"data": self.task.state(), "seed": self.cfg.seed, "skipped_total": self.skipped_total}

    def save(self, force: bool = False) -> None:
        step = int(self.state.step)
        self.checkpointer.save(step, self.state, self._meta(), force=force)

    def _restore(self) -> None:
        self.state, meta, step = self.checkpointer.restore(self.state)
        self.task.restore(meta.get("data", {}))
        self.skipped_total = int(meta.get("skipped_total", 0))
        self.start_step = step
        if jax.process_index() == 0:
            print(f"resumed from {self.cfg.run_dir} at step {step}")

    # ---- eval ------------------------------------------------------------------------------------------
    def run_eval(self, tag: str) -> dict:
        if self._eval_fn is None:
            self._eval_fn = make_eval_sampler(self.student.mdef, self.mesh, self.cfg)
        result = task_eval(self.cfg, self.task, self._eval_fn, (self.state.trainable, self.state.frozen), self.mesh,
                           step=int(self.state.step), out_dir=os.path.join(self.cfg.run_dir, "eval"), tag=tag)
        return {} if result is None else result.summary()

    # ---- loop ------------------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        """SIGTERM on any host stops all hosts at the same step, so their saves are collective."""
        flag = np.asarray([self._stop_requested], np.int32)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = multihost_utils.process_allgather(flag)
        return bool(np.any(flag))

    def step_flops(self) -> float:
        c = self.cfg
        t_cfg = self.teachers[0].cfg if self.teachers else None
        f = flops.opd_step_flops(self.student.cfg, t_cfg, c.batch_size, c.sampling.max_prompt_len,
                                 c.sampling.max_new_tokens, lora_rank=c.lora.rank) if t_cfg is not None else None
        return float(f["total"]) if f else float("nan")

    def run(self) -> dict:
        c = self.cfg
        prev_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        peak = peak_flops_per_device(jax.devices()[0]) * jax.device_count()
        step_flops = self.step_flops()
        history: dict = {}
        try:
            if c.eval.source or c.data.source.startswith("synthetic:"):
                if c.eval.every or c.eval.source:
                    history["eval_start"] = self.run_eval("eval_step0")
                    self.logger.log(self.start_step, history["eval_start"])
            for step in range(self.start_step, c.steps):
                batch = self._next_batch()
                t0 = time.perf_counter()
                self.state, metrics = self.step_fn(self.state, self.teacher_params, batch, self.key, self.sp)
                metrics = jax.device_get(metrics)
                dt = time.perf_counter() - t0
                metrics = {k: float(v) for k, v in metrics.items()}
                metrics.update(step_time=dt, tokens_per_s=metrics["num_tokens"] / dt,
                               mfu=step_flops / dt / peak if step_flops == step_flops else float("nan"))
                self._track_nonfinite(step + 1, metrics)
                done = step + 1
                if c.eval.every and done % c.eval.every == 0 and done < c.steps:
                    metrics.update(self.run_eval(f"eval_step{done}"))
                self.logger.log(done, metrics)
                history.setdefault("first", metrics)
                history["last"] = metrics
                if c.checkpoint.every and done % c.checkpoint.every == 0:
                    self.save()
                if self._stop_agreed():
                    print(f"SIGTERM: saving at step {done} and exiting")
                    self.checkpointer.wait()
                    if self.checkpointer.latest_step() != done:  # not just saved by checkpoint.every
                        self.save(force=True)
                    self.checkpointer.wait()
                    history["preempted_at"] = done
                    return history
            if c.eval.every or c.eval.source:
                history["eval_end"] = self.run_eval(f"eval_step{c.steps}")
                self.logger.log(c.steps, history["eval_end"])
            if self.checkpointer.latest_step() != int(self.state.step):
                self.save(force=True)
            self.checkpointer.wait()
            history["skipped_total"] = self.skipped_total
            return history
        finally:
            self.logger.close()
            self.checkpointer.wait()
            if prev_handler is not None:
                signal.signal(signal.SIGTERM, prev_handler)

    def _track_nonfinite(self, step: int, metrics: dict) -> None:
        if metrics.get("skipped", 0.0) > 0:
            self.skipped_total += 1
            self.consecutive_skips += 1
            print(f"step {step}: non-finite loss ({metrics.get('loss')}); update skipped "
                  f"({self.consecutive_skips} in a row, {self.skipped_total} total)")
            if self.consecutive_skips >= self.cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.consecutive_skips} consecutive non-finite losses (max_nonfinite_steps="
                    f"{self.cfg.max_nonfinite_steps}) at step {step}; stopping. The last good checkpoint in "
                    f"{self.cfg.run_dir}/checkpoints is intact (step {self.checkpointer.latest_step()}).")
        else:
            self.consecutive_skips = 0
        metrics["skipped_total"] = float(self.skipped_total)


def _addressable_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> set[int]:
    """The global row indices that this process's devices hold."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[0].indices(shape[0])))
    return rows


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: ExperimentConfig) -> dict:
    return Trainer(cfg).run()


__all__ = ["Trainer", "train", "load_model", "NonFiniteLossError", "RunDirExistsError", "TrainState", "nnx",
           "model_axes"]
