"""The fused OPD step: sample -> teacher-score -> advantages -> student forward/backward -> optax update,
all in ONE jitted XLA program on one mesh, with no host round trip and no host callbacks.

`build_opd_step` is the one place the step is assembled: it decides which teachers the program scores with
(`ExperimentConfig.scores_with_teachers`), builds the `StepBuilder` and jits `StepBuilder.fused` with explicit
shardings. The trainer, `opd-jax compile` (AOT for a TPU pod) and `benchmarks/opd_step.py` all call it, so the
compiled report describes the program a run executes.

The two halves are also exposed on their own (`sample_phase`, `update_phase`) for the baselines that must
leave the program (RL with a host-side grader) and for the unfused benchmark; the fused step is simply both
halves traced into one `jax.jit`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from opd_jax import losses
from opd_jax.config.schema import ExperimentConfig
from opd_jax.data.task import RewardFn
from opd_jax.errors import ConfigError
from opd_jax.mesh import batch_sharding, replicated, with_logical_constraint
from opd_jax.models.qwen3 import Qwen3, positions_from_mask
from opd_jax.sampling import SampleOutput, SamplingParams, sample
from opd_jax.train_state import (
    ModelDef,
    TrainState,
    accumulate_gradients,
    apply_gradients,
    micro_batches,
    resolve_model,
)

F32 = jnp.float32


@struct.dataclass
class PromptBatch:
    """One step's prompts (groups_per_batch rows; each is sampled group_size times inside the step)."""

    tokens: jax.Array  # [G, P] student-template prompt, left-padded
    mask: jax.Array  # [G, P]
    teacher_tokens: jax.Array  # [G, Pt] the same prompt in the teacher's template
    teacher_mask: jax.Array  # [G, Pt]
    teacher_index: jax.Array  # int32 scalar: which teacher scores this batch (routed per dataset)
    answer: jax.Array  # [G, A] int32 reference tokens for an in-graph task reward (pad -1); may be [G, 0]


def check_vocabularies(cfg: ExperimentConfig, tokenizer_size: int | None = None) -> None:
    """Before anything is compiled: the student and every teacher the step scores with share one vocabulary size
    (the teacher scores the student's token ids; full-vocabulary losses compare whole distributions), and the
    tokenizer's ids fit the student's head. Sizes come from presets and checkpoints' config.json. Raises
    ConfigError naming the fields and both sizes."""
    student = resolve_model(cfg.student).vocab_size
    if tokenizer_size is not None and tokenizer_size > student:
        raise ConfigError(f"data.tokenizer / student.vocab_size: the tokenizer has {tokenizer_size} tokens but the "
                          f"student's head only {student}: ids >= {student} would index past it")
    if not cfg.scores_with_teachers:
        return
    for i, t in enumerate(cfg.teachers):
        v = resolve_model(t.model).vocab_size
        if v != student:
            raise ConfigError(f"student.vocab_size / teachers.{i}.model.vocab_size: the student has {student} tokens "
                              f"and teacher {t.name!r} {v}; they must share one vocabulary (the teacher scores the "
                              "student's token ids)")


def _unrows(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def group_normalized(rewards: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """GRPO advantage: reward minus its group mean, over the group std."""
    r = rewards.reshape(-1, group_size)
    adv = (r - r.mean(-1, keepdims=True)) / (r.std(-1, keepdims=True) + eps)
    return adv.reshape(-1)


def completion_hidden(model: Qwen3, prompt: jax.Array, prompt_mask: jax.Array, completion: jax.Array,
                      completion_mask: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Hidden states that predict each completion token: [B, N, hidden]. The prompt may be in any template;
    the completion tokens are exactly the sampled ones."""
    P = prompt.shape[1]
    N = completion.shape[1]
    tokens = jnp.concatenate([prompt, completion], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), completion_mask.astype(bool)], axis=1)
    hidden, _ = model(tokens, positions_from_mask(mask), mask, mesh=mesh)
    return hidden[:, P - 1: P + N - 1]


@dataclass(frozen=True)
class StepBuilder:
    """Holds the static parts of the step; its methods are traced inside jit."""

    cfg: ExperimentConfig
    student: ModelDef
    teachers: Sequence[ModelDef]
    mesh: Mesh | None
    optimizer: optax.GradientTransformation
    reward_fn: RewardFn | None = None
    stop_token_ids: tuple[int, ...] = ()  # resolved once by the caller (`data.task.resolve_stop_tokens`)

    # ---- sampling ------------------------------------------------------------------------------------
    def sample_phase(self, state: TrainState, batch: PromptBatch, key: jax.Array, sp: SamplingParams) -> SampleOutput:
        c = self.cfg
        student = self.student.merge(jax.lax.stop_gradient(state.trainable), state.frozen)
        prompts = jnp.repeat(batch.tokens, c.group_size, axis=0)
        pmask = jnp.repeat(batch.mask, c.group_size, axis=0)
        prompts = with_logical_constraint(prompts, ("batch", "seq"), self.mesh)
        M = c.sampling.micro_batches

        def one(xs):
            i, toks, m = xs
            return sample(student, toks, m, jax.random.fold_in(key, i), sp,
                          max_new_tokens=c.sampling.max_new_tokens, stop_token_ids=self.stop_token_ids,
                          mesh=self.mesh, layout=c.sampling.layout, cast_weights=c.sampling.cast_weights,
                          segments=c.sampling.decode_segments)

        if M == 1:
            return one((0, prompts, pmask))
        out = jax.lax.map(one, (jnp.arange(M), micro_batches(prompts, M), micro_batches(pmask, M)))
        return jax.tree.map(_unrows, out)

    # ---- teacher -------------------------------------------------------------------------------------
    def teacher_outputs(self, teachers_params: Sequence[Any], index: jax.Array, t_prompt, t_pmask, completion, cmask):
        """Per-token teacher logprobs [b, N] and (for full-vocabulary losses) hidden states + head weight.
        Frozen: stop_gradient on the weights, never differentiated."""
        chunk = self.cfg.loss.logprob_chunk
        full_vocab = self.cfg.loss.kind in losses.FULL_VOCAB_KINDS
        # lax.switch needs equal branch outputs: teachers of different widths/dtypes are zero-padded on the
        # contracted hidden dim (logits unchanged) and cast to one dtype.
        models = [d.merge(p) for d, p in zip(self.teachers, teachers_params, strict=True)]
        width = max(m.cfg.hidden_size for m in models)
        dtype = jnp.result_type(*(m.dtype for m in models))

        def branch(i):
            def run(_):
                teacher = self.teachers[i].merge(jax.lax.stop_gradient(teachers_params[i]))
                h = completion_hidden(teacher, t_prompt, t_pmask, completion, cmask, self.mesh)
                lp = losses.chunked_map(lambda hh, y: {"lp": losses.token_logprobs(teacher.logits(hh), y)},
                                        chunk, h, completion)["lp"]
                if full_vocab:
                    pad = width - h.shape[-1]
                    h = jnp.pad(h.astype(dtype), [(0, 0), (0, 0), (0, pad)])
                    return lp, h, jnp.pad(teacher.head_weight().astype(dtype), [(0, pad), (0, 0)])
                return lp, None, None
            return run

        branches = [branch(i) for i in range(len(self.teachers))]
        if len(branches) == 1:
            return branches[0](None)
        return jax.lax.switch(index, branches, None)

    # ---- update --------------------------------------------------------------------------------------
    def update_phase(self, state: TrainState, teachers_params: Sequence[Any], batch: PromptBatch,
                     samples: SampleOutput, task_reward: jax.Array | None = None) -> tuple[TrainState, dict]:
        c = self.cfg
        lc = c.loss
        K = c.group_size
        B = samples.tokens.shape[0]
        mask = samples.mask.astype(F32)
        prompts = jnp.repeat(batch.tokens, K, axis=0)
        pmask = jnp.repeat(batch.mask, K, axis=0)
        t_prompts = jnp.repeat(batch.teacher_tokens, K, axis=0)
        t_pmask = jnp.repeat(batch.teacher_mask, K, axis=0)
        if task_reward is None and self.reward_fn is not None:
            task_reward = self.reward_fn(samples.tokens, samples.mask, jnp.repeat(batch.answer, K, axis=0))
        task_adv = None if task_reward is None else group_normalized(task_reward.astype(F32), K)
        denom = losses.normalizer(lc.normalization, mask)
        Mg = c.micro_batches

        def mb_loss(trainable, mb, t_out):
            p, pm, toks, m, lp_s, tadv = mb
            t_lp, t_h, t_head = t_out
            student = self.student.merge(trainable, state.frozen)
            h = completion_hidden(student, p, pm, toks, m, self.mesh)
            full_vocab = lc.kind in losses.FULL_VOCAB_KINDS

            def chunk_fn(hh, y, *t):
                logits = student.logits(hh)
                out = {"lp": losses.token_logprobs(logits, y), "ent": jax.lax.stop_gradient(losses.entropy(logits))}
                if full_vocab:
                    t_logits = jnp.einsum("...d,dv->...v", t[0], t_head, preferred_element_type=F32)
                    out["div"] = losses.divergence(lc, logits, jax.lax.stop_gradient(t_logits))
                return out

            extra = (t_h,) if full_vocab else ()
            tok_out = losses.chunked_map(chunk_fn, lc.logprob_chunk, h, toks, *extra)
            lp_new = tok_out["lp"]
            if full_vocab:
                per_token = tok_out["div"] * m
                ratio = jnp.exp(lp_new - lp_s)
                adv = jnp.zeros_like(lp_new)
            else:
                adv = losses.opd_advantages(lc, lp_s, t_lp, m, tadv) if self.teachers else \
                    jax.lax.stop_gradient(lc.task_reward_coef * tadv[:, None] * m)
                per_token, ratio = losses.policy_gradient_loss(lc, lp_new, lp_s, adv, m)
            loss = losses.reduce_tokens(per_token, m, lc.normalization, denom)
            aux = dict(
                entropy=jnp.sum(tok_out["ent"] * m), ratio=jnp.sum(ratio * m), advantage=jnp.sum(adv * m),
                logprob_diff=jnp.sum(jnp.abs(jax.lax.stop_gradient(lp_new) - lp_s) * m),
            )
            return loss, aux

        def mb_grads(mb):
            p, pm, tp, tpm, toks, m, lp_s, tadv = mb
            if self.teachers:
                t_out = self.teacher_outputs(teachers_params, batch.teacher_index, tp, tpm, toks, m)
            else:  # pure RL: no teacher, zero KL
                t_out = (lp_s, None, None)
            (loss, aux), g = jax.value_and_grad(mb_loss, has_aux=True)(
                state.trainable, (p, pm, toks, m, lp_s, tadv), t_out)
            aux["loss"] = loss
            aux["teacher_kl"] = jnp.sum((lp_s - t_out[0]) * m)
            return g, aux

        tadv_rows = task_adv if task_adv is not None else jnp.zeros((B,), F32)
        xs = (prompts, pmask, t_prompts, t_pmask, samples.tokens, mask, samples.logprobs, tadv_rows)
        grads, aux = accumulate_gradients(mb_grads, state.trainable, xs, Mg)
        new_state, grad_norm, finite = apply_gradients(state, grads, self.optimizer, aux["loss"])

        n_tok = jnp.maximum(jnp.sum(mask), 1.0)
        metrics = dict(
            loss=aux["loss"],
            teacher_kl=aux["teacher_kl"] / n_tok,
            entropy=aux["entropy"] / n_tok,
            ratio_mean=aux["ratio"] / n_tok,
            advantage_mean=aux["advantage"] / n_tok,
            logprob_diff=aux["logprob_diff"] / n_tok,
            grad_norm=grad_norm,
            num_tokens=jnp.sum(mask),
            mean_length=jnp.mean(samples.lengths.astype(F32)),
            truncation_rate=jnp.mean(samples.truncated.astype(F32)),
            skipped=(~finite).astype(F32),
        )
        if task_reward is not None:
            metrics["task_reward"] = jnp.mean(task_reward.astype(F32))
        return new_state, metrics

    # ---- the fused step ------------------------------------------------------------------------------
    def fused(self, state: TrainState, teachers_params, batch: PromptBatch, key: jax.Array, sp: SamplingParams):
        key = jax.random.fold_in(key, state.step)
        samples = self.sample_phase(state, batch, key, sp)
        return self.update_phase(state, teachers_params, batch, samples)


def batch_shardings(mesh: Mesh, batch: PromptBatch) -> PromptBatch:
    return PromptBatch(
        tokens=batch_sharding(mesh, batch.tokens.shape), mask=batch_sharding(mesh, batch.mask.shape),
        teacher_tokens=batch_sharding(mesh, batch.teacher_tokens.shape),
        teacher_mask=batch_sharding(mesh, batch.teacher_mask.shape),
        teacher_index=replicated(mesh), answer=batch_sharding(mesh, batch.answer.shape),
    )


def make_opd_step(builder: StepBuilder, state_shardings: TrainState | None, teacher_shardings, example_batch):
    """The fused step of `builder` as one `jax.jit` with explicit in/out shardings and the train state donated
    (without a mesh or shardings: a plain jit). Most callers want `build_opd_step`.

    Call: `state, metrics = step(state, teachers_params, batch, key, sampling_params)`."""
    mesh = builder.mesh
    if mesh is None or state_shardings is None:
        return jax.jit(builder.fused, donate_argnums=(0,))
    rep = replicated(mesh)
    sp_sh = SamplingParams(temperature=rep, top_k=rep, top_p=rep)
    return jax.jit(
        builder.fused,
        in_shardings=(state_shardings, teacher_shardings, batch_shardings(mesh, example_batch), rep, sp_sh),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )


def build_opd_step(cfg: ExperimentConfig, mesh: Mesh | None, student: ModelDef, teachers: Sequence[ModelDef],
                   optimizer: optax.GradientTransformation, *, state_shardings: TrainState | None,
                   teacher_shardings: Sequence[Any], example_batch: PromptBatch, reward_fn: RewardFn | None = None,
                   stop_token_ids: Sequence[int] = ()) -> tuple[StepBuilder, Callable]:
    """The one assembly of the fused OPD / RL step: `(builder, jitted step)`.

    teachers / teacher_shardings: the models the step scores with, which must be those `cfg.scores_with_teachers`
    asks for (all of `cfg.teachers`, or none); ValueError otherwise. example_batch: a `PromptBatch` of arrays or
    ShapeDtypeStructs (only its shapes are read). reward_fn: the in-program task reward (RL and mixed losses).
    The trainer passes real weights' definitions and shardings, `opd-jax compile` abstract ones; both get the
    same program."""
    if cfg.algorithm == "opd" and not cfg.teachers:
        raise ConfigError("teachers: algorithm: opd needs at least one teacher to distill from")
    want = len(cfg.teachers) if cfg.scores_with_teachers else 0
    if len(teachers) != want or len(teacher_shardings) != want:
        raise ValueError(f"algorithm={cfg.algorithm!r}, loss.kl_penalty_coef={cfg.loss.kl_penalty_coef}: the step "
                         f"scores with {want} teacher(s), got {len(teachers)} model(s) and "
                         f"{len(teacher_shardings)} sharding tree(s)")
    builder = StepBuilder(cfg, student, list(teachers), mesh, optimizer, reward_fn=reward_fn,
                          stop_token_ids=tuple(int(t) for t in stop_token_ids))
    return builder, make_opd_step(builder, state_shardings, list(teacher_shardings), example_batch)
