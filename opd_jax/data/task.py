"""The task contract: what the trainer feeds the step and how it grades, for every task.

A `Task` turns a data config into token prompts for the student and the teacher(s) (`PromptRows`), stop tokens, an
optional in-program reward (`RewardFn`), and eval problems (`EvalProblem`) with a grader. This module is the low
floor of the data layer: it imports no task implementation, no model and nothing above it. The implementations
(`opd_jax.data.synthetic`, `opd_jax.data.text_task`) sit above it, and the factory that picks one from
`data.source` is `opd_jax.data.build_task`.

Host-side prompt padding (`pad_prompts`) lives here too: every path that feeds prompts to a sampler (the
training step, eval, teacher sampling, visualization) packs them with it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import numpy as np

from opd_jax.errors import DataError

# A task reward computed inside the program: (completion tokens [B, N] int32, mask [B, N] bool, answer tokens
# [B, A] int32 padded with -1) -> reward [B] float32.
RewardFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclass
class PromptRows:
    """Per-process prompt rows of one step."""

    student: list[list[int]]
    teacher: list[list[int]]  # the same prompts in the teacher's template (== student when shared)
    answers: list[str | None]
    answer_tokens: list[list[int]] = field(default_factory=list)  # for in-program rewards
    teacher_index: int = 0


@dataclass
class EvalProblem:
    prompt: list[int]
    answer: str
    text: str = ""
    id: str = ""  # the source's id of the problem (a JSONL / dataset `id` field); "" when it has none

class Task(ABC):
    pad_id: int = 0
    reward_fn: RewardFn | None = None
    answer_len: int = 0  # width of the answer-token array fed to the step (0: no in-program reward)
    truncated_prompts: int = 0  # prompts truncated to fit sampling.max_prompt_len (sampling.truncate_prompts)
    vocab_size: int | None = None  # ids the tokenizer can produce (None: unknown); must fit the student's head

    @property
    @abstractmethod
    def stop_token_ids(self) -> list[int]: ...

    @abstractmethod
    def next_prompts(self, n: int) -> PromptRows: ...

    @abstractmethod
    def eval_problems(self) -> list[EvalProblem]: ...

    @abstractmethod
    def grade(self, completion: list[int], answer: str) -> bool: ...

    @abstractmethod
    def decode(self, tokens: list[int]) -> str: ...

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        return None  # stateless by default

    def skip_report(self) -> str:
        """Human-readable counts of the data rows skipped so far, by reason ("" when none)."""
        return ""

    def data_counts(self) -> dict[str, int]:
        """Running counts for the metrics: rows skipped by reason (`skipped/<reason>`) and prompts truncated."""
        return {"prompts_truncated": self.truncated_prompts}

    def grade_batch(self, completions: list[list[int]], answers: list[str]) -> list[bool]:
        return [self.grade(c, a) for c, a in zip(completions, answers, strict=True)]

    def sft_examples(self, n: int) -> list[tuple[list[int], list[int]]]:
        """Optional, for `algorithm: sft`: this process's next `n` supervised examples as (tokens, loss_mask)
        pairs, one conversation each: the prompt in the student's template followed by the target completion,
        loss_mask 1 on the tokens to learn (the assistant turn, its stop token included), 0 elsewhere. Advances
        the same resumable position as `next_prompts` (`state()` / `restore()`).

        Text tasks render each conversation with `renderer.build_conversation(messages)`."""
        raise NotImplementedError(f"{type(self).__name__} has no SFT examples (Task.sft_examples)")

    # ---- host-side packing --------------------------------------------------------------------------
    def pack(self, rows: PromptRows, max_prompt_len: int, truncate: bool, *, with_answers: bool = True
             ) -> dict[str, np.ndarray]:
        """Token lists -> left-padded numpy arrays for `step.PromptBatch`. The answer tokens ([rows, answer_len],
        pad -1) are packed only `with_answers` (an in-program reward reads them), else the array is [rows, 0]."""
        s_tok, s_mask, n1 = pad_prompts(rows.student, max_prompt_len, truncate=truncate, pad_id=self.pad_id)
        t_tok, t_mask, _ = pad_prompts(rows.teacher, max_prompt_len, truncate=truncate, pad_id=self.pad_id)
        self.truncated_prompts += n1
        width = self.answer_len if with_answers else 0
        ans = np.full((len(rows.student), width), -1, np.int32)
        for i, a in enumerate(rows.answer_tokens[: len(rows.student)] if width else []):
            a = a[:width]
            ans[i, : len(a)] = a
        return dict(tokens=s_tok, mask=s_mask, teacher_tokens=t_tok, teacher_mask=t_mask,
                    teacher_index=np.int32(rows.teacher_index), answer=ans)


def resolve_stop_tokens(configured: Sequence[int], task: Task) -> tuple[int, ...]:
    """The stop tokens of a run: `sampling.stop_token_ids` when set, else the task's. Resolved once by whoever
    builds the run and passed down; the config is never written back."""
    return tuple(int(t) for t in (configured or task.stop_token_ids))


# ---- host-side prompt padding ------------------------------------------------------------------------
class PromptTooLongError(DataError, ValueError):
    """A prompt longer than `sampling.max_prompt_len` where truncation is off."""


def bucket_length(n: int, max_len: int, min_bucket: int = 16) -> int:
    """Smallest power-of-two bucket >= n (at least min_bucket), capped at max_len: few distinct compiles."""
    b = min_bucket
    while b < n:
        b *= 2
    return min(b, max_len)


def pad_prompts(
    prompts: Sequence[Sequence[int]],
    max_prompt_len: int,
    *,
    truncate: bool = False,
    pad_id: int = 0,
    bucket: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Left-pad token lists to [B, P] (P = max_prompt_len, or with `bucket` the smallest power-of-two bucket that
    fits). Returns (tokens int32, mask bool, number of left-truncated prompts).

    An empty prompt is an error naming the row. A prompt over `max_prompt_len` is a `PromptTooLongError`, or with
    `truncate=True` keeps its last `max_prompt_len` tokens and is counted."""
    n_truncated = 0
    rows = []
    for i, p in enumerate(prompts):
        p = list(p)
        if not p:
            raise ValueError(f"prompt row {i} is empty")
        if len(p) > max_prompt_len:
            if not truncate:
                raise PromptTooLongError(
                    f"prompt row {i} has {len(p)} tokens, over sampling.max_prompt_len={max_prompt_len} "
                    "(raise it, or set sampling.truncate_prompts=true to left-truncate)"
                )
            p = p[-max_prompt_len:]
            n_truncated += 1
        rows.append(p)
    P = bucket_length(max(map(len, rows)), max_prompt_len) if bucket else max_prompt_len
    tokens = np.full((len(rows), P), pad_id, np.int32)
    mask = np.zeros((len(rows), P), bool)
    for i, p in enumerate(rows):
        tokens[i, P - len(p):] = p
        mask[i, P - len(p):] = True
    return tokens, mask, n_truncated


__all__ = ["RewardFn", "PromptRows", "EvalProblem", "Task", "resolve_stop_tokens", "PromptTooLongError",
           "bucket_length", "pad_prompts"]
