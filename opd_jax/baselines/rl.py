"""GRPO-style RL baseline: `group_size` samples per prompt, an outcome reward from the task's grader,
group-normalized advantages (`step.group_normalized`) and the same importance-sampling / PPO loss as OPD.

Two modes, picked from the task:

(a) in-program reward (`task.reward_fn` is not None, e.g. the synthetic task's exact match): the whole RL step
    is the fused OPD program with the teacher term switched off: `Trainer` with `algorithm: rl`. With
    `loss.kl_penalty_coef == 0` no teacher is loaded; with a non-zero coefficient the first teacher acts as
    the KL reference and the advantage is `task_reward_coef * A_task - kl_penalty_coef * KL`.
(b) host reward (`task.reward_fn` is None, e.g. math answers checked with math-verify on the host): the step is
    split into two jitted programs, sample -> host grade -> update (`StepBuilder.sample_phase` and
    `StepBuilder.update_phase(..., task_reward=...)`). This is the one place where a training step leaves the
    single XLA program: the grader is Python, so the completions have to come back to the host.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from opd_jax import losses
from opd_jax.config import ExperimentConfig
from opd_jax.distributed import initialize_distributed
from opd_jax.mesh import batch_sharding, replicated
from opd_jax.run_setup import global_rows, host_local
from opd_jax.sampling import SampleOutput, SamplingParams
from opd_jax.step import PromptBatch
from opd_jax.tasks import Task, build_task
from opd_jax.trainer import Trainer

__all__ = ["HostRewardRLTrainer", "check_rl_config", "make_rl_trainer", "train_rl"]


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


class HostRewardRLTrainer(Trainer):
    """Mode (b): `Trainer` whose step is `sample (jit) -> task.grade_batch (host) -> update (jit)`.

    Everything else (checkpoints, resume, eval, metrics, SIGTERM, non-finite skips) is the `Trainer`'s. The
    sample program reads the train state without donating it; the update program donates it. Each process
    grades its own rows: the completions come back process-local and the rewards go in as one global array.
    """

    def __init__(self, cfg: ExperimentConfig, task: Task | None = None):
        super().__init__(cfg, task)
        c, mesh, b = cfg, self.mesh, self.builder
        B, N = c.batch_size, c.sampling.max_new_tokens
        rep = replicated(mesh)
        rows, toks = batch_sharding(mesh, (B,)), batch_sharding(mesh, (B, N))
        sample_sh = SampleOutput(tokens=toks, mask=toks, lengths=rows, logprobs=toks, sampler_logprobs=toks,
                                 truncated=rows)
        sp_sh = SamplingParams(temperature=rep, top_k=rep, top_p=rep)
        self.reward_sharding = rows

        def sample_fn(state, batch: PromptBatch, key, sp):
            # the same per-step key as the fused step
            return b.sample_phase(state, batch, jax.random.fold_in(key, state.step), sp)

        self.sample_fn = jax.jit(sample_fn, in_shardings=(self.shardings, self.batch_shardings, rep, sp_sh),
                                 out_shardings=sample_sh)
        self.update_fn = jax.jit(
            b.update_phase,
            in_shardings=(self.shardings, self.teacher_shardings, self.batch_shardings, sample_sh, rows),
            out_shardings=(self.shardings, rep), donate_argnums=(0,),
        )
        self.step_fn = self.split_step

    def grade(self, samples: SampleOutput) -> np.ndarray:
        """This process's rewards [local rows], 1.0 for a correct completion. Completions keep their stop token."""
        tokens, lengths = host_local(samples.tokens), host_local(samples.lengths)
        K = self.cfg.group_size
        answers = [a for a in self.last_rows.answers for _ in range(K)]
        if len(answers) != len(tokens):
            raise RuntimeError(f"{len(answers)} answers for {len(tokens)} local samples")
        completions = [tokens[i, : int(lengths[i])].tolist() for i in range(len(tokens))]
        correct = self.task.grade_batch(completions, [a if a is not None else "" for a in answers])
        return np.asarray(correct, np.float32)

    def split_step(self, state, teacher_params, batch: PromptBatch, key, sp) -> tuple:
        """`Trainer.step_fn` signature: (state, teacher params, batch, key, sampling params) -> (state, metrics)."""
        t0 = time.perf_counter()
        samples = self.sample_fn(state, batch, key, sp)
        reward = self.grade(samples)  # blocks on the samples
        t1 = time.perf_counter()
        state, metrics = self.update_fn(state, teacher_params, batch, samples, global_rows(reward,
                                                                                            self.reward_sharding))
        metrics = dict(metrics)
        metrics.update(sample_grade_time=t1 - t0)
        return state, metrics


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
