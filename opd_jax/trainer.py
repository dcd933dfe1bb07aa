"""The training loop around one jitted step: models and data on one mesh, checkpoints, metrics, eval, SIGTERM.

One `Trainer.run()` call = `cfg.steps` calls of the step program. The host only feeds prompt tokens in and reads
scalar metrics out. What a step *is* comes from a `StepProgram`, built by a factory passed to the trainer:
`opd_program` (the fused OPD / RL step, the default), `baselines.sft.sft_program` (SFT) or
`baselines.rl.host_reward_program` (RL graded on the host). Everything else (resume, checkpoints, eval, metrics,
SIGTERM, non-finite skips) is the loop's, for every algorithm. Extra work at a cadence goes in hooks:
`trainer.add_hook(fn, every=n)`, as levanter does it.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from opd_jax import compile_cache, flops
from opd_jax.checkpoint import Checkpointer
from opd_jax.config import ExperimentConfig
from opd_jax.data import build_task
from opd_jax.data.task import Task, resolve_stop_tokens
from opd_jax.distributed import initialize_distributed
from opd_jax.errors import ConfigError
from opd_jax.eval.evaluate import make_eval_sampler, runs_eval, task_eval
from opd_jax.guards import CollapseGuard, CollapseReport
from opd_jax.mesh import make_mesh
from opd_jax.metrics import MetricsLogger, check_optional_packages
from opd_jax.run_dir import (
    RunDirExistsError,
    check_run_dir,
    eval_steps_logged,
    open_run_dir,
    resume_changes,
    trim_metrics,
)
from opd_jax.run_owner import claim_run_dir
from opd_jax.sampling import SamplingParams
from opd_jax.step import (
    PromptBatch,
    StepBuilder,
    batch_shardings,
    build_opd_step,
    check_vocabularies,
)
from opd_jax.train_state import (
    LoadedModel,
    TrainState,
    check_model_sources,
    init_train_state,
    load_model,
    make_optimizer,
    state_shardings,
)


class NonFiniteLossError(RuntimeError):
    pass


# ---- what one step is ------------------------------------------------------------------------------------------
@dataclass
class StepProgram:
    """One training step, for the loop: where its batches come from and the jitted update that eats them.

    next_batch(): this process's next batch as global arrays (advances the data position);
    step(state, batch) -> (state, metrics);
    data_state() / restore_data(d): the resumable data position, saved in every checkpoint;
    step_flops(batch): analytic FLOPs of one step on `batch` (NaN when unknown), for MFU;
    teachers: the models the step scores with (for inspection)."""

    next_batch: Callable[[], Any]
    step: Callable[[TrainState, Any], tuple[TrainState, dict]]
    data_state: Callable[[], dict]
    restore_data: Callable[[dict], None]
    step_flops: Callable[[Any], float] = lambda batch: float("nan")
    teachers: list[LoadedModel] = field(default_factory=list)


class PromptFeed:
    """Prompt batches of a task as global arrays in the step's batch shardings (`groups_per_batch` rows a step,
    each process feeding its slice)."""

    def __init__(self, cfg: ExperimentConfig, task: Task, mesh, *, with_answers: bool = False):
        self.cfg, self.task, self.with_answers = cfg, task, with_answers
        n_proc = jax.process_count()
        if cfg.groups_per_batch % n_proc:
            raise ValueError(f"groups_per_batch={cfg.groups_per_batch} must divide over {n_proc} processes")
        self.n_local = cfg.groups_per_batch // n_proc
        self.first_report = ""  # the skip report after drawing the first batch (set by the peek below)
        self.example = self._arrays(peek=True)  # shapes of the global batch (numpy zeros)
        self.shardings = batch_shardings(mesh, self.example)
        self.last_rows = None  # this step's prompts and answers, for a host-side grader (baselines.rl)

    def _arrays(self, peek: bool) -> PromptBatch | dict:
        c = self.cfg
        saved, truncated = self.task.state(), self.task.truncated_prompts
        rows = self.task.next_prompts(self.n_local)
        if peek:  # a look at the first batch, then the data position (and its counts) as it was
            self.first_report = self.task.skip_report()
            self.task.restore(saved)
            self.task.truncated_prompts = truncated
        else:
            self.last_rows = rows
        arrays = self.task.pack(rows, c.sampling.max_prompt_len, c.sampling.truncate_prompts,
                                with_answers=self.with_answers)
        if peek:
            return PromptBatch(**{k: np.zeros((c.groups_per_batch, *v.shape[1:]), v.dtype) if v.ndim else v
                                  for k, v in arrays.items()})
        return arrays

    def next(self) -> PromptBatch:
        c = self.cfg
        out = {}
        for name, arr in self._arrays(peek=False).items():
            sh = getattr(self.shardings, name)
            if arr.ndim == 0:
                out[name] = jax.device_put(arr, sh)
                continue
            shape = (c.groups_per_batch, *arr.shape[1:])
            mine = range(jax.process_index() * self.n_local, (jax.process_index() + 1) * self.n_local)
            if jax.process_count() > 1 and _addressable_rows(sh, shape) != set(mine):
                # this process's devices hold other rows than the task's slice (e.g. rows replicated when the batch
                # does not divide over the batch axes): gather all processes' rows first
                from jax.experimental import multihost_utils

                full = multihost_utils.process_allgather(arr, tiled=True)
                out[name] = jax.make_array_from_callback(shape, sh, lambda idx, full=full: full[idx])
            else:
                out[name] = jax.make_array_from_process_local_data(sh, arr, shape)
        return PromptBatch(**out)


@dataclass
class OpdProgram(StepProgram):
    """`opd_program`'s StepProgram, with the parts the host-graded RL baseline reuses."""

    builder: StepBuilder | None = None
    jitted: Callable | None = None  # build_opd_step's jit: (state, teacher params, batch, key, sampling params)
    feed: PromptFeed | None = None
    teacher_params: list = field(default_factory=list)
    teacher_shardings: list = field(default_factory=list)
    sampling_params: SamplingParams | None = None
    key: jax.Array | None = None


def opd_program(trainer: Trainer) -> OpdProgram:
    """The fused OPD step (and in-program-reward RL): teachers loaded by `cfg.scores_with_teachers`, the program built
    by `step.build_opd_step`, prompt batches from the task."""
    cfg, mesh, task = trainer.cfg, trainer.mesh, trainer.task
    if cfg.algorithm not in ("opd", "rl"):
        raise ValueError(f"algorithm {cfg.algorithm!r} runs through opd_jax.baselines, not the OPD step")
    reward_fn = task.reward_fn if (cfg.algorithm == "rl" or cfg.loss.task_reward_coef) else None
    feed = PromptFeed(cfg, task, mesh, with_answers=reward_fn is not None)
    teachers = [load_model(t.model, seed=cfg.seed + 1 + i, mesh=mesh)
                for i, t in enumerate(cfg.teachers)] if cfg.scores_with_teachers else []
    random = [t.name for t in cfg.teachers[: len(teachers)] if not t.model.hf_path]
    if random and jax.process_index() == 0:
        print(f"note: teacher(s) {random} have no hf_path: a random init. This is a smoke test of the machinery (the "
              "KL falls, accuracy does not rise); give teachers.N.model.hf_path a trained checkpoint for a real run")
    t_params = [t.trainable for t in teachers]
    t_shardings = [t.shardings(mesh)[0] for t in teachers]
    builder, step_fn = build_opd_step(cfg, mesh, trainer.student.mdef, [t.mdef for t in teachers],
                                      trainer.optimizer, state_shardings=trainer.shardings,
                                      teacher_shardings=t_shardings, example_batch=feed.example,
                                      reward_fn=reward_fn, stop_token_ids=trainer.stop_token_ids)
    s = cfg.sampling
    sp = SamplingParams.create(s.temperature, s.top_k, s.top_p, s.greedy)
    key = jax.random.key(cfg.seed)
    f = (flops.opd_step_flops(trainer.student.cfg, teachers[0].cfg, cfg.batch_size, s.max_prompt_len,
                              s.max_new_tokens, lora_rank=cfg.lora.rank)["total"] if teachers else float("nan"))
    return OpdProgram(
        next_batch=feed.next, step=lambda state, batch: step_fn(state, t_params, batch, key, sp),
        data_state=task.state, restore_data=task.restore, step_flops=lambda batch: float(f), teachers=teachers,
        builder=builder, jitted=step_fn, feed=feed, teacher_params=t_params, teacher_shardings=t_shardings,
        sampling_params=sp, key=key)


# ---- the loop --------------------------------------------------------------------------------------------------
@dataclass
class Hook:
    fn: Callable[[Trainer, int, dict], dict | None]
    every: int


class Trainer:
    """`Trainer(cfg, task=None, program=opd_program).run()`.

    Set-up: distributed init; a read-only check of the run dir (`run_dir.check_run_dir`); the mesh, the task, the
    vocabularies, the student, the optimizer and the sharded train state; then `program(self)` builds the step.
    Only when all of that has worked (and a resumed checkpoint has been read) is the run dir touched: old run moved
    aside, `config.yaml` written, metrics opened. `task` overrides the one `data.source` names; `program` is any
    `StepProgram` factory. Raises `opd_jax.errors.UserError` subclasses for inputs the user can fix."""

    def __init__(self, cfg: ExperimentConfig, task: Task | None = None,
                 program: Callable[[Trainer], StepProgram] | None = None):
        if program is None and cfg.algorithm not in ("opd", "rl"):
            raise ConfigError(f"algorithm: {cfg.algorithm!r} runs through opd_jax.baselines (opd-jax train picks it), "
                              "not the OPD trainer")
        initialize_distributed(cfg.distributed)
        self.cfg = cfg
        check_optional_packages(cfg)
        self.owner = claim_run_dir(cfg)  # one job per run dir, before looking at it; released by run() or a failure
        try:
            self._set_up(task, program)
        except BaseException:
            self.release_run_dir()
            raise

    def release_run_dir(self) -> None:
        """Give up this job's claim on the run directory (`run()` does at its end)."""
        if self.owner is not None:
            self.owner.release()

    def _set_up(self, task: Task | None, program: Callable[[Trainer], StepProgram] | None) -> None:
        cfg = self.cfg
        # Set-up reads only; nothing is written to the run dir until it has all succeeded (`open_run_dir`).
        check_model_sources([("student", cfg.student)] + [(f"teachers.{i}.model", t.model) for i, t in
                                                           enumerate(cfg.teachers) if cfg.scores_with_teachers])
        plan = check_run_dir(cfg)
        changes = resume_changes(cfg) if plan == "resume" else []
        cache = compile_cache.enable(cfg.compilation_cache)
        self.mesh = make_mesh(cfg.mesh)
        self.task = task or build_task(cfg, process_index=jax.process_index(), process_count=jax.process_count())
        self.stop_token_ids = resolve_stop_tokens(cfg.sampling.stop_token_ids, self.task)
        check_vocabularies(cfg, tokenizer_size=getattr(self.task, "vocab_size", None))
        self.student = load_model(cfg.student, seed=cfg.seed, mesh=self.mesh, lora=cfg.lora)
        s = self.student
        self.optimizer = make_optimizer(cfg.optim, cfg.steps)
        self.shardings = state_shardings(self.optimizer, s.trainable, s.frozen, s.t_axes, s.f_axes, self.mesh)
        self.state = init_train_state(self.optimizer, s.trainable, s.frozen, self.shardings)
        self.program = (program or opd_program)(self)
        self.hooks: list[Hook] = []
        if cfg.eval.every:
            self.add_hook(lambda tr, step, m: tr.run_eval(f"eval_step{step}") if step < cfg.steps else None,
                          every=cfg.eval.every)
        self._eval_fn = None
        self._stop_requested = None  # the signal's name once SIGTERM / SIGINT asked the run to stop
        self.guard = CollapseGuard(cfg.guard)
        self._collapse_stop: CollapseReport | None = None  # set when guard.on_collapse=stop fired
        if cfg.guard.on_collapse != "off":
            self.add_hook(Trainer._watch_collapse, every=1)
        self.nonfinite_total = 0
        self.consecutive_skips = 0
        self.start_step = 0
        self.checkpointer = None
        if plan == "resume":  # restore first: a damaged checkpoint must leave the run dir as it was
            self.checkpointer = self._make_checkpointer()
            self._restore()
        open_run_dir(cfg, plan, changes)
        if plan == "resume":
            dropped = trim_metrics(cfg.run_dir, self.start_step)
            if dropped and jax.process_index() == 0:
                print(f"metrics.jsonl: dropped {dropped} row(s) logged after step {self.start_step}, which this "
                      "run redoes")
        self._evaluated = eval_steps_logged(cfg.run_dir) if plan == "resume" else set()
        self.checkpointer = self.checkpointer or self._make_checkpointer()
        self.logger = MetricsLogger(cfg.run_dir, total_steps=cfg.steps, tensorboard=cfg.logging.tensorboard,
                                    wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                                    progress=cfg.logging.progress)
        self._cache_dir = cache
        report = getattr(getattr(self.program, "feed", None), "first_report", "") or self.task.skip_report()
        if report and jax.process_index() == 0:
            print(f"data: rows skipped drawing the first batch (counted in the data/skipped/* metrics):\n{report}")

    def _make_checkpointer(self) -> Checkpointer:
        c = self.cfg
        return Checkpointer(os.path.join(c.run_dir, "checkpoints"), max_to_keep=c.checkpoint.max_to_keep,
                            async_save=c.checkpoint.async_save)

    @property
    def teachers(self) -> list[LoadedModel]:
        return self.program.teachers

    def add_hook(self, fn: Callable[[Trainer, int, dict], dict | None], every: int) -> None:
        """Call `fn(trainer, step, metrics)` after every `every`-th step (`step` counts completed steps), before
        the step's metrics are logged; a dict it returns is merged into them."""
        if every <= 0:
            raise ValueError(f"add_hook: every must be >= 1, got {every}")
        self.hooks.append(Hook(fn, every))

    # ---- checkpoints -------------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"data": self.program.data_state(), "seed": self.cfg.seed, "nonfinite_total": self.nonfinite_total,
                "guard": self.guard.state()}

    def save(self, force: bool = False) -> None:
        step = int(self.state.step)
        self.checkpointer.save(step, self.state, self._meta(), force=force)

    def _restore(self) -> None:
        c = self.cfg.checkpoint
        self.state, meta, step = self.checkpointer.restore(self.state, c.resume_step, fallback=c.fallback_to_intact)
        self.program.restore_data(meta.get("data", {}))
        self.nonfinite_total = int(meta.get("nonfinite_total", meta.get("skipped_total", 0)))  # older checkpoints
        self.guard.restore(meta.get("guard", {}))
        self.start_step = step
        if jax.process_index() == 0:
            print(f"resumed from {self.cfg.run_dir} at step {step}")

    # ---- the length-collapse guard ------------------------------------------------------------------------
    def _watch_collapse(self, step: int, metrics: dict) -> dict:
        """The `guard` hook (every step): feed the step's metrics to the CollapseGuard; warn once when it fires, and
        with `guard.on_collapse: stop` ask the loop to stop after this step."""
        out, report = self.guard.update(step, metrics)
        if report is not None:
            if jax.process_index() == 0:
                print(f"warning: {report.message(self.cfg.guard)}", flush=True)
            if self.cfg.guard.on_collapse == "stop":
                self._collapse_stop = report
        return out

    # ---- eval ------------------------------------------------------------------------------------------
    @property
    def eval_sampler(self) -> Callable:
        """The jitted eval sampler of the student (`eval.make_eval_sampler`), built on first use."""
        if self._eval_fn is None:
            self._eval_fn = make_eval_sampler(self.student.mdef, self.mesh, self.cfg, self.stop_token_ids)
        return self._eval_fn

    def run_eval(self, tag: str, task: Task | None = None) -> dict:
        """Evaluate the current student on `task`'s eval problems (default: the run's task) with the `eval.*`
        settings, write `<run_dir>/eval/<tag>.*`, and return the summary metrics ({} without eval problems)."""
        result = task_eval(self.cfg, task or self.task, self.eval_sampler, (self.state.trainable, self.state.frozen),
                           self.mesh, step=int(self.state.step), out_dir=os.path.join(self.cfg.run_dir, "eval"),
                           tag=tag)
        return {} if result is None else result.summary()

    # ---- loop ------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._stop_requested == name == "SIGINT":  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self._stop_requested = name
        if jax.process_index() == 0:
            print(f"\n{name}: saving a checkpoint after this step, then stopping"
                  + (" (Ctrl-C again to stop without saving)" if name == "SIGINT" else ""), flush=True)

    def _stop_agreed(self) -> str | None:
        """SIGTERM / SIGINT on any host stops all hosts at the same step, so their saves are collective. Returns the
        signal's name (as any host received it), or None to go on."""
        code = np.asarray([signal.Signals[self._stop_requested].value if self._stop_requested else 0], np.int32)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            code = multihost_utils.process_allgather(code)
        first = int(np.max(code))
        return signal.Signals(first).name if first else None

    def run(self) -> dict:
        c = self.cfg
        history: dict = {}
        if self.start_step >= c.steps:  # a resume of a finished run (a requeue, a repeated launch): nothing to redo
            if jax.process_index() == 0:
                print(f"run_dir {c.run_dir} is already at step {self.start_step} of {c.steps}: nothing to do (raise "
                      "steps to train on)")
            self.logger.close()
            self.release_run_dir()
            return {"already_done": self.start_step}
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} \
            if _main_thread() else {}
        peak = flops.peak_flops_per_device(jax.devices()[0]) * jax.device_count()
        try:
            # the eval before the first step of a launch, unless that step's eval is logged already (a resume at
            # an eval step, or a second resume at the same step): each step's eval row appears once
            has_eval = runs_eval(c)
            if has_eval and self.start_step not in self._evaluated:
                history["eval_start"] = self.run_eval(f"eval_step{self.start_step}")
                self.logger.log(self.start_step, history["eval_start"])
            for step in range(self.start_step, c.steps):
                batch = self.program.next_batch()
                if step == self.start_step:  # the window in which the step program is compiled or loaded
                    cache_before = compile_cache.CacheCounter.snapshot()
                t0 = time.perf_counter()
                self.state, metrics = self.program.step(self.state, batch)
                metrics = jax.device_get(metrics)
                dt = time.perf_counter() - t0
                metrics = {k: float(v) for k, v in metrics.items()}
                step_flops = self.program.step_flops(batch)
                metrics.update(step_time=dt, tokens_per_s=metrics["num_tokens"] / dt,
                               mfu=step_flops / dt / peak if not math.isnan(step_flops) else float("nan"))
                self._track_nonfinite(step + 1, metrics)
                done = step + 1
                for hook in self.hooks:
                    if done % hook.every == 0:
                        metrics.update(hook.fn(self, done, metrics) or {})
                self.logger.log(done, metrics)
                history.setdefault("first", metrics)
                history["last"] = metrics
                if c.checkpoint.every and done % c.checkpoint.every == 0:
                    self.save()
                if step == self.start_step:
                    self._report_compile_cache(cache_before, dt)
                if self._collapse_stop is not None:  # every host fed the same (global) metrics: all stop here
                    self.checkpointer.wait()
                    if self.checkpointer.latest_step() != done:
                        self.save(force=True)
                    self.checkpointer.wait()
                    print(f"guard.on_collapse=stop: stopped at step {done} with a checkpoint")
                    history["collapsed_at"] = done
                    history["collapse"] = self._collapse_stop.message(c.guard)
                    return history
                stop = self._stop_agreed()
                if stop:
                    print(f"{stop}: saving at step {done} and exiting (resume with "
                          f"resume=true)")
                    self.checkpointer.wait()
                    if self.checkpointer.latest_step() != done:  # not just saved by checkpoint.every
                        self.save(force=True)
                    self.checkpointer.wait()
                    history["preempted_at"] = done
                    return history
            if has_eval:
                history["eval_end"] = self.run_eval(f"eval_step{c.steps}")
                self.logger.log(c.steps, history["eval_end"])
            if self.checkpointer.latest_step() != int(self.state.step):
                self.save(force=True)
            self.checkpointer.wait()
            history["nonfinite_total"] = self.nonfinite_total
            report = self.task.skip_report()
            if report and jax.process_index() == 0:
                print(f"data: rows skipped in this run:\n{report}")
            return history
        finally:
            self.logger.close()
            try:
                self.checkpointer.wait()
            finally:
                for sig, prev in handlers.items():
                    signal.signal(sig, prev)
                self.release_run_dir()

    def _track_nonfinite(self, step: int, metrics: dict) -> None:
        if metrics.get("skipped", 0.0) > 0:
            self.nonfinite_total += 1
            self.consecutive_skips += 1
            print(f"step {step}: non-finite loss ({metrics.get('loss')}); update skipped "
                  f"({self.consecutive_skips} in a row, {self.nonfinite_total} total)")
            if self.consecutive_skips >= self.cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.consecutive_skips} consecutive non-finite losses (max_nonfinite_steps="
                    f"{self.cfg.max_nonfinite_steps}) at step {step}; stopping. The last good checkpoint in "
                    f"{self.cfg.run_dir}/checkpoints is intact (step {self.checkpointer.latest_step()}).")
        else:
            self.consecutive_skips = 0
        metrics["nonfinite_steps_total"] = float(self.nonfinite_total)
        counts = self.task.data_counts()
        metrics.update({f"data/{k}": float(v) for k, v in counts.items()})
        metrics["data/skipped_total"] = float(sum(v for k, v in counts.items() if k.startswith("skipped/")))

    def _report_compile_cache(self, before: tuple[int, int], seconds: float) -> None:
        """After the first step: did its program come from the persistent compilation cache?"""
        hits, misses = (now - b for now, b in zip(compile_cache.CacheCounter.snapshot(), before, strict=True))
        if jax.process_index() != 0:
            return
        if self._cache_dir is None:
            print(f"compilation cache: off (compilation_cache=''); first step {seconds:.1f} s")
        elif hits:
            print(f"compilation cache: hit, the step program was loaded from {self._cache_dir} (first step "
                  f"{seconds:.1f} s)")
        else:
            print(f"compilation cache: miss, the step program was compiled ({seconds:.1f} s) and saved to "
                  f"{self._cache_dir}")


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


__all__ = ["Trainer", "StepProgram", "OpdProgram", "PromptFeed", "opd_program", "train", "NonFiniteLossError",
           "RunDirExistsError"]
