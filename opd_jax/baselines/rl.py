"""GRPO-style RL baseline: `group_size` samples per prompt, an outcome reward from the task's grader,
group-normalized advantages (`step.group_normalized`) and the same importance-sampling / PPO loss as OPD.

Two modes, picked from the task:

(a) in-program reward (`task.reward_fn` is not None, e.g. the synthetic task's exact match): the whole RL step
    is the fused OPD program with the teacher term switched off: `Trainer` with `algorithm: rl`. With
    `loss.kl_penalty_coef == 0` no teacher is loaded; with a non-zero coefficient the first teacher acts as
    the KL reference and the advantage is `task_reward_coef * A_task - kl_penalty_coef * KL`.
(b) host reward (`task.reward_fn` is None, e.g. math answers checked with math-verify on the host): the step is
    split into two jitted programs, sample -> host grade -> update (`StepBuilder.sample_phase` and
    `StepBuilder.update_phase(..., task_reward=...)`, `host_reward_program`). This is the one place where a
    training step leaves the single XLA program: the grader is Python, so the completions have to come back to
    the host.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from opd_jax import losses
from opd_jax.config import ExperimentConfig
from opd_jax.data import build_task
from opd_jax.data.task import Task
from opd_jax.distributed import initialize_distributed
from opd_jax.mesh import batch_sharding, global_rows, host_local, replicated
from opd_jax.sampling import SampleOutput, SamplingParams
from opd_jax.step import PromptBatch
from opd_jax.trainer import OpdProgram, Trainer, opd_program

__all__ = ["HostRewardRLTrainer", "host_reward_program", "check_rl_config", "make_rl_trainer", "train_rl"]


def check_rl_config(cfg: ExperimentConfig) -> None:
    """Settings under which `algorithm: rl` would silently not learn are errors."""
    lc = cfg.loss
    if cfg.algorithm != "rl":
        raise ValueError(f"RL baseline: algorithm must be 'rl', got {cfg.algorithm!r}")
    if lc.task_reward_coef <= 0:
        raise ValueError("algorithm: rl learns from loss.task_reward_coef * A_task; set loss.task_reward_coef > 0 "
                         "(e.g. 1.0), and loss.kl_penalty_coef=0 for pure RL without a teacher")
    if lc.kind not in losses.SAMPLED_KINDS:
        raise ValueError(f"algorithm: rl needs a policy-gradient loss.kind {losses.SAMPLED_KINDS}, got {lc.kind!r} "
                         "(full-vocabulary divergences ignore the reward)")
    if cfg.group_size < 2:
        raise ValueError(f"algorithm: rl normalizes rewards within a group: group_size must be >= 2, got "
                         f"{cfg.group_size}")
    if lc.kl_penalty_coef != 0 and not cfg.teachers:
        raise ValueError("loss.kl_penalty_coef != 0 needs a reference model in `teachers`")


def host_reward_program(trainer: Trainer) -> OpdProgram:
    """Mode (b) as a `StepProgram`: `sample (jit) -> task.grade_batch (host) -> update (jit)`, reusing the
    fused step's halves (`StepBuilder.sample_phase` / `update_phase`), its teachers and its prompt feed.

    The sample program reads the train state without donating it; the update program donates it. Each process
    grades its own rows: the completions come back process-local and the rewards go in as one global array."""
    p = opd_program(trainer)
    c, mesh, b, task = trainer.cfg, trainer.mesh, p.builder, trainer.task
    B, N = c.batch_size, c.sampling.max_new_tokens
    rep = replicated(mesh)
    rows, toks = batch_sharding(mesh, (B,)), batch_sharding(mesh, (B, N))
    sample_sh = SampleOutput(tokens=toks, mask=toks, lengths=rows, logprobs=toks, sampler_logprobs=toks,
                             truncated=rows)
    sp_sh = SamplingParams(temperature=rep, top_k=rep, top_p=rep)

    def sample_fn(state, batch: PromptBatch, key, sp):
        # the same per-step key as the fused step
        return b.sample_phase(state, batch, jax.random.fold_in(key, state.step), sp)

    sample_jit = jax.jit(sample_fn, in_shardings=(trainer.shardings, p.feed.shardings, rep, sp_sh),
                         out_shardings=sample_sh)
    update_jit = jax.jit(b.update_phase,
                         in_shardings=(trainer.shardings, p.teacher_shardings, p.feed.shardings, sample_sh, rows),
                         out_shardings=(trainer.shardings, rep), donate_argnums=(0,))

    def grade(samples: SampleOutput) -> np.ndarray:
        """This process's rewards [local rows], 1.0 for a correct completion. Completions keep their stop token."""
        tokens, lengths = host_local(samples.tokens), host_local(samples.lengths)
        answers = [a for a in p.feed.last_rows.answers for _ in range(c.group_size)]
        if len(answers) != len(tokens):
            raise RuntimeError(f"{len(answers)} answers for {len(tokens)} local samples")
        completions = [tokens[i, : int(lengths[i])].tolist() for i in range(len(tokens))]
        correct = task.grade_batch(completions, [a if a is not None else "" for a in answers])
        return np.asarray(correct, np.float32)

    def split_step(state, batch: PromptBatch) -> tuple:
        t0 = time.perf_counter()
        samples = sample_jit(state, batch, p.key, p.sampling_params)
        reward = grade(samples)  # blocks on the samples
        t1 = time.perf_counter()
        state, metrics = update_jit(state, p.teacher_params, batch, samples, global_rows(reward, rows))
        return state, {**metrics, "sample_grade_time": t1 - t0}

    p.step = split_step
    return p


class HostRewardRLTrainer(Trainer):
    """Mode (b): the `Trainer` loop over `host_reward_program`."""

    def __init__(self, cfg: ExperimentConfig, task: Task | None = None):
        super().__init__(cfg, task, program=host_reward_program)


def make_rl_trainer(cfg: ExperimentConfig, task: Task | None = None) -> Trainer:
    """Mode (a) `Trainer` when the task's reward runs in the program, else mode (b) `HostRewardRLTrainer`."""
    check_rl_config(cfg)
    if task is None:
        initialize_distributed(cfg.distributed)
        task = build_task(cfg, process_index=jax.process_index(), process_count=jax.process_count())
    if task.reward_fn is not None:
        return Trainer(cfg, task)
    return HostRewardRLTrainer(cfg, task)


def train_rl(cfg: ExperimentConfig, task: Task | None = None) -> dict:
    """`opd-jax train` with `algorithm: rl`. Same return shape as `Trainer.run()`."""
    return make_rl_trainer(cfg, task).run()
