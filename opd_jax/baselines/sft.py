"""SFT / off-policy distillation baseline: token-level cross entropy on the assistant tokens (loss mask) only.

One jitted program per step (forward, chunked cross entropy, backward, optax update, non-finite skip), with
explicit in/out shardings and the train state donated. Logits exist one sequence chunk at a time
(`losses.chunked_map`), so no [batch, seq, vocab] fp32 tensor is ever live.

Data. Rows are (tokens, loss_mask) pairs, one conversation per row, right-padded (no sequence packing: the model
has a pad mask but no segment ids, so packed conversations would attend to each other). Each batch is padded
to the smallest power-of-two length bucket that fits its longest row (single-process runs; several processes
pad to the cap so every host feeds one shape); the cap is `sampling.max_prompt_len + sampling.max_new_tokens`,
longer rows are cut to it and counted (`truncated_rows`). Rows per step: `groups_per_batch * group_size`
(the number of sequences an OPD step trains on). The objective is the mean NLL over the batch's loss tokens.

Where rows come from:
- the task: `Task.sft_examples(n)` (synthetic: the reference scratchpad solutions; text tasks: rendered
  conversations), resumable through the task's state;
- a fixed list: `train_sft(cfg, examples=...)`, e.g. teacher samples (off-policy distillation proper):

      teacher, _ = load_run_model(cfg.teachers[0].model, teacher_run_dir, seed=0, mesh=mesh)
      rows = teacher_sft_examples(teacher, task, 4096, SamplingParams.create(0.7), max_new_tokens=256,
                                  max_prompt_len=cfg.sampling.max_prompt_len, mesh=mesh, only_correct=True)
      train_sft(cfg, examples=rows)

The training loop (eval schedule, checkpoints and resume, metrics, SIGTERM, non-finite tracking) is the
`Trainer`'s: `sft_program` gives it the SFT data and step, and `SFTTrainer` is the Trainer built with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from opd_jax import flops, losses
from opd_jax.config import ExperimentConfig
from opd_jax.data.task import Task, pad_prompts
from opd_jax.mesh import batch_sharding, global_rows, host_local, replicated
from opd_jax.models.qwen3 import positions_from_mask
from opd_jax.sampling import SamplingParams, make_sampler
from opd_jax.train_state import LoadedModel, ModelDef, TrainState, accumulate_gradients, apply_gradients
from opd_jax.trainer import StepProgram, Trainer

__all__ = ["SFTBatch", "SFTTrainer", "ListSFTSource", "TaskSFTSource", "length_buckets", "make_sft_step",
           "pack_rows", "sft_program", "sft_step", "teacher_sft_examples", "train_sft"]

F32 = jnp.float32
Example = tuple[list[int], list[int]]  # (tokens, loss_mask)


# ---- batches -----------------------------------------------------------------------------------------
@struct.dataclass
class SFTBatch:
    tokens: jax.Array  # [B, S] int32, right-padded
    mask: jax.Array  # [B, S] bool: real tokens
    loss_mask: jax.Array  # [B, S] f32: 1 where tokens[b, t] is a target (predicted from position t-1)


def length_buckets(max_len: int, min_bucket: int = 16) -> list[int]:
    """Powers of two from `min_bucket` below `max_len`, then `max_len` itself."""
    out, b = [], min_bucket
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


def pack_rows(rows: Sequence[Example], max_len: int, *, pad_id: int = 0,
              buckets: Sequence[int] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Right-pad (tokens, loss_mask) rows to the smallest bucket >= the longest row (or to `max_len`).
    Rows over `max_len` are cut to it. Returns (arrays for `SFTBatch`, number of cut rows)."""
    if not rows:
        raise ValueError("SFT: no rows to pack")
    cut = sum(len(t) > max_len for t, _ in rows)
    rows = [(list(t)[:max_len], list(m)[:max_len]) for t, m in rows]
    longest = max(len(t) for t, _ in rows)
    width = next((b for b in sorted(buckets) if longest <= b <= max_len), max_len) if buckets else max_len
    B = len(rows)
    tokens = np.full((B, width), pad_id, np.int32)
    mask = np.zeros((B, width), bool)
    loss_mask = np.zeros((B, width), np.float32)
    for i, (t, m) in enumerate(rows):
        if len(t) != len(m):
            raise ValueError(f"SFT row {i}: {len(t)} tokens but {len(m)} loss-mask entries")
        tokens[i, : len(t)] = t
        mask[i, : len(t)] = True
        loss_mask[i, : len(m)] = m
    loss_mask[:, 0] = 0.0  # nothing predicts the first token
    return dict(tokens=tokens, mask=mask, loss_mask=loss_mask), cut


# ---- data sources ------------------------------------------------------------------------------------
class TaskSFTSource:
    """Rows from `task.sft_examples(n)`; the position is the task's own state."""

    def __init__(self, task: Task):
        self.task = task

    def next(self, n: int) -> list[Example]:
        return self.task.sft_examples(n)

    def state(self) -> dict:
        return {"task": self.task.state()}

    def restore(self, state: dict) -> None:
        self.task.restore(state.get("task", {}))


class ListSFTSource:
    """Rows from a fixed list (this process's), visited in a seeded permutation per epoch; resumable.

    `SFTTrainer` seeds it with `data.shuffle_seed`, not the run's `seed`: two runs that differ only in `seed` see the
    list in the same order (the model init and sampling differ); set `data.shuffle_seed` too for a different order."""

    def __init__(self, examples: Sequence[Example], seed: int = 0):
        if not examples:
            raise ValueError("SFT: the example list is empty")
        self.examples = list(examples)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))

    def next(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self.examples[int(self._order[self.position])])
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_examples": len(self.examples)}

    def restore(self, state: dict) -> None:
        if state.get("num_examples", len(self.examples)) != len(self.examples):
            raise ValueError(f"SFT resume: the checkpoint was written with {state['num_examples']} examples, "
                             f"this run has {len(self.examples)}")
        self.epoch, self.position = int(state.get("epoch", 0)), int(state.get("position", 0))
        self._order = self._permutation()


# ---- the step ----------------------------------------------------------------------------------------
def sft_step(mdef: ModelDef, optimizer: optax.GradientTransformation, mesh: Mesh | None, state: TrainState,
             batch: SFTBatch, *, logprob_chunk: int, micro_batches: int = 1) -> tuple[TrainState, dict]:
    """One SFT update (traced): mean NLL over the loss tokens, gradients accumulated over `micro_batches`,
    skipped (weights and moments unchanged) when the loss or the gradient norm is not finite."""
    B, S = batch.tokens.shape
    targets_w = batch.loss_mask[:, 1:].astype(F32)
    n_loss = jnp.maximum(jnp.sum(targets_w), 1.0)  # one global denominator: micro-batches add up

    def mb_loss(trainable, tok, m, w):
        model = mdef.merge(trainable, state.frozen)
        h, _ = model(tok, positions_from_mask(m), m, mesh=mesh)

        def chunk_fn(hh, y):
            logits = model.logits(hh)
            hit = jax.lax.stop_gradient(jnp.argmax(logits, -1) == y).astype(F32)
            return {"lp": losses.token_logprobs(logits, y), "hit": hit}

        out = losses.chunked_map(chunk_fn, logprob_chunk, h[:, :-1], tok[:, 1:])
        nll = -jnp.sum(out["lp"] * w)
        return nll / n_loss, {"nll": jax.lax.stop_gradient(nll), "hit": jnp.sum(out["hit"] * w)}

    def mb_grads(xs):
        (_, aux), g = jax.value_and_grad(mb_loss, has_aux=True)(state.trainable, *xs)
        return g, aux

    grads, aux = accumulate_gradients(mb_grads, state.trainable, (batch.tokens, batch.mask, targets_w),
                                      micro_batches)
    loss = aux["nll"] / n_loss
    new_state, grad_norm, finite = apply_gradients(state, grads, optimizer, loss)
    real = jnp.sum(batch.mask.astype(F32))
    metrics = dict(
        loss=loss, token_accuracy=aux["hit"] / n_loss, grad_norm=grad_norm, num_tokens=jnp.sum(targets_w),
        seq_tokens=real, pad_fraction=1.0 - real / (B * S), skipped=(~finite).astype(F32),
    )
    return new_state, metrics


def make_sft_step(mdef: ModelDef, optimizer: optax.GradientTransformation, mesh: Mesh, *, logprob_chunk: int,
                  micro_batches: int = 1, shardings: TrainState | None = None, batch_size: int | None = None):
    """`step(state, SFTBatch) -> (state, metrics)` as one `jax.jit`: state donated, explicit shardings when
    `shardings` and `batch_size` are given. Every length bucket is one compile (the row sharding does not
    depend on the length)."""

    def fn(state, batch):
        return sft_step(mdef, optimizer, mesh, state, batch, logprob_chunk=logprob_chunk,
                        micro_batches=micro_batches)

    if shardings is None or batch_size is None:
        return jax.jit(fn, donate_argnums=(0,))
    rows = batch_sharding(mesh, (batch_size, 1))
    batch_sh = SFTBatch(tokens=rows, mask=rows, loss_mask=rows)
    return jax.jit(fn, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated(mesh)),
                   donate_argnums=(0,))


# ---- the program ----------------------------------------------------------------------------------------
def sft_program(examples: Sequence[Example] | None = None) -> Callable[[Trainer], StepProgram]:
    """A `StepProgram` factory for SFT: rows from `examples` (a fixed list, e.g. teacher samples) or else
    `task.sft_examples`, packed into length buckets, and the jitted `make_sft_step`. No teacher is loaded."""

    def build(trainer: Trainer) -> StepProgram:
        cfg, task, mesh = trainer.cfg, trainer.task, trainer.mesh
        n_proc = jax.process_count()
        if cfg.batch_size % n_proc:
            raise ValueError(f"batch_size (groups_per_batch x group_size) = {cfg.batch_size} must divide over "
                             f"{n_proc} processes")
        if examples is not None:
            source: ListSFTSource | TaskSFTSource = ListSFTSource(examples, seed=cfg.data.shuffle_seed)
        else:  # fail now, not at the first step, when the task has no SFT data
            saved = task.state()
            task.sft_examples(1)
            task.restore(saved)
            source = TaskSFTSource(task)
        max_len = cfg.sampling.max_prompt_len + cfg.sampling.max_new_tokens
        buckets = length_buckets(max_len) if n_proc == 1 else None  # hosts must agree on shapes
        rows = batch_sharding(mesh, (cfg.batch_size, 1))
        sft_fn = make_sft_step(trainer.student.mdef, trainer.optimizer, mesh, logprob_chunk=cfg.loss.logprob_chunk,
                               micro_batches=cfg.micro_batches, shardings=trainer.shardings,
                               batch_size=cfg.batch_size)
        counts = {"truncated_rows": 0}

        def next_batch() -> SFTBatch:
            arrays, cut = pack_rows(source.next(cfg.batch_size // n_proc), max_len, pad_id=task.pad_id,
                                    buckets=buckets)
            if cut and counts["truncated_rows"] == 0:
                print(f"SFT: {cut} row(s) longer than sampling.max_prompt_len + max_new_tokens = {max_len} were "
                      "cut (counted in the truncated_rows metric)")
            counts["truncated_rows"] += cut
            return SFTBatch(**{k: global_rows(v, rows) for k, v in arrays.items()})

        def step_flops(batch: SFTBatch) -> float:
            return float(flops.sft_flops(trainer.student.cfg, cfg.batch_size, batch.tokens.shape[1],
                                         lora_rank=cfg.lora.rank)["total"])

        def step(state, batch: SFTBatch):
            state, metrics = sft_fn(state, batch)
            return state, {**metrics, "seq_len": batch.tokens.shape[1], "truncated_rows": counts["truncated_rows"],
                           "step_flops": step_flops(batch)}

        def data_state() -> dict:
            return {**source.state(), "truncated_rows": counts["truncated_rows"]}

        def restore_data(d: dict) -> None:
            source.restore(d)
            counts["truncated_rows"] = int(d.get("truncated_rows", 0))

        return StepProgram(next_batch=next_batch, step=step, data_state=data_state, restore_data=restore_data,
                           step_flops=step_flops)

    return build


class SFTTrainer(Trainer):
    """The `Trainer` loop (eval schedule, checkpoints, resume, metrics, SIGTERM, non-finite tracking) over
    `sft_program`. `examples`: train on this fixed list instead of `task.sft_examples`."""

    def __init__(self, cfg: ExperimentConfig, task: Task | None = None, examples: Sequence[Example] | None = None):
        if cfg.algorithm != "sft":
            raise ValueError(f"SFTTrainer: algorithm must be 'sft', got {cfg.algorithm!r}")
        super().__init__(cfg, task, program=sft_program(examples))


def train_sft(cfg: ExperimentConfig, *, task: Task | None = None, examples: Sequence[Example] | None = None) -> dict:
    """`opd-jax train` with `algorithm: sft`. Same return shape as `Trainer.run()` (first/last/eval_start/eval_end)."""
    return SFTTrainer(cfg, task, examples).run()


# ---- teacher samples (off-policy distillation) --------------------------------------------------------
def teacher_sft_examples(
    teacher: LoadedModel,
    task: Task,
    n: int,
    sp: SamplingParams,
    *,
    max_new_tokens: int,
    max_prompt_len: int,
    mesh: Mesh | None = None,
    key: jax.Array | None = None,
    batch_size: int = 64,
    samples_per_prompt: int = 1,
    only_correct: bool = True,
    drop_truncated: bool = True,
    max_rounds: int = 1000,
    truncate_prompts: bool = False,
    layout: str = "train",
    stats: dict | None = None,
) -> list[Example]:
    """`n` SFT rows (this process's) from teacher samples: prompts from `task.next_prompts` (this consumes the
    task's training stream), sampled in the teacher's template with one jitted sampler, kept when graded
    correct (`only_correct`) and stopped (`drop_truncated`). Each row is the student-template prompt (loss 0)
    + the teacher's completion with its stop token (loss 1). Teacher and student must share the vocabulary.

    `stats` (optional dict) receives sampled / kept / correct / truncated counts. Raises after `max_rounds`
    batches without `n` kept rows."""
    if n <= 0:
        return []
    mdef, params = teacher.mdef, (teacher.trainable, teacher.frozen)
    stops = tuple(task.stop_token_ids)
    n_proc = jax.process_count()
    n_dev = 1 if mesh is None else max(1, mesh.shape["data"] * mesh.shape["fsdp"] // n_proc)  # local rows
    n_prompts = max(1, batch_size // samples_per_prompt)
    rows_per_batch = int(math.ceil(n_prompts * samples_per_prompt / n_dev) * n_dev)

    sample_fn = make_sampler(mdef, max_new_tokens=max_new_tokens, stop_token_ids=stops, pad_id=task.pad_id,
                             mesh=mesh, layout=layout)
    key = jax.random.key(0) if key is None else key
    counts = {"sampled": 0, "kept": 0, "correct": 0, "truncated": 0}
    out: list[Example] = []
    for r in range(max_rounds):
        rows = task.next_prompts(n_prompts)
        idx = [i for i in range(len(rows.teacher)) for _ in range(samples_per_prompt)]
        prompts = [rows.teacher[i] for i in idx]
        prompts += [prompts[-1]] * (rows_per_batch - len(prompts))  # fixed shape: one compile
        tok, mask, _ = pad_prompts(prompts, max_prompt_len, truncate=truncate_prompts, pad_id=task.pad_id)
        if mesh is not None:  # each process feeds its own prompts as its rows of one global batch
            sh = batch_sharding(mesh, (tok.shape[0] * n_proc, tok.shape[1]))
            tok, mask = global_rows(tok, sh), global_rows(mask, sh)
        s = jax.tree.map(host_local, sample_fn(params, tok, mask, jax.random.fold_in(key, r), sp))
        comps = [s.tokens[j, : int(s.lengths[j])].tolist() for j in range(len(idx))]
        answers = [rows.answers[i] if rows.answers[i] is not None else "" for i in idx]
        correct = task.grade_batch(comps, answers)
        for j, i in enumerate(idx):
            counts["sampled"] += 1
            counts["correct"] += int(bool(correct[j]))
            counts["truncated"] += int(bool(s.truncated[j]))
            if (drop_truncated and s.truncated[j]) or (only_correct and not correct[j]) or len(out) >= n:
                continue
            prompt = rows.student[i]
            out.append((list(prompt) + comps[j], [0] * len(prompt) + [1] * len(comps[j])))
        counts["kept"] = len(out)
        if len(out) >= n:
            break
    if stats is not None:
        stats.update(counts)
    if len(out) < n:
        raise RuntimeError(f"teacher_sft_examples: kept {len(out)} of {n} rows after {counts['sampled']} samples "
                           f"({counts['correct']} correct, {counts['truncated']} truncated); raise max_rounds or "
                           "relax only_correct / drop_truncated")
    return out
