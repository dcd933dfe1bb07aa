"""A task turns a data config into what the trainer feeds the step: token prompts for the student and the
teacher(s), stop tokens, an optional in-program reward, and eval problems with a grader.

`build_task` picks the implementation from `data.source`: `synthetic:*` tasks are generated on the fly
(`opd_jax.data.synthetic`); every other source is text rendered with chat templates (`opd_jax.data.text_task`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from opd_jax.config.schema import ExperimentConfig
from opd_jax.sampling import pad_prompts
from opd_jax.step import RewardFn


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


class Task(ABC):
    pad_id: int = 0
    reward_fn: RewardFn | None = None
    answer_len: int = 0  # width of the answer-token array fed to the step (0: no in-program reward)
    truncated_prompts: int = 0

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
        return ""

    def grade_batch(self, completions: list[list[int]], answers: list[str]) -> list[bool]:
        return [self.grade(c, a) for c, a in zip(completions, answers, strict=True)]

    def sft_examples(self, n: int) -> list[tuple[list[int], list[int]]]:
        """Optional, for `algorithm: sft`: this process's next `n` supervised examples as (tokens, loss_mask)
        pairs, one conversation each: the prompt in the student's template followed by the target completion,
        loss_mask 1 on the tokens to learn (the assistant turn, its stop token included), 0 elsewhere. Advances
        the same resumable position as `next_prompts` (`state()` / `restore()`).

        Text tasks: render each conversation with `renderer.build_conversation(messages)` (e.g. draw from an
        `opd_jax.data.dataset.SFTDataset` / `PromptDataset` of conversations and return its rendered rows)."""
        raise NotImplementedError(f"{type(self).__name__} has no SFT examples (Task.sft_examples)")

    # ---- host-side packing --------------------------------------------------------------------------
    def pack(self, rows: PromptRows, max_prompt_len: int, truncate: bool) -> dict[str, np.ndarray]:
        """Token lists -> left-padded numpy arrays for `PromptBatch`."""
        s_tok, s_mask, n1 = pad_prompts(rows.student, max_prompt_len, truncate=truncate, pad_id=self.pad_id)
        t_tok, t_mask, _ = pad_prompts(rows.teacher, max_prompt_len, truncate=truncate, pad_id=self.pad_id)
        self.truncated_prompts += n1
        ans = np.full((len(rows.student), self.answer_len), -1, np.int32)
        for i, a in enumerate(rows.answer_tokens[: len(rows.student)]):
            a = a[: self.answer_len]
            ans[i, : len(a)] = a
        return dict(tokens=s_tok, mask=s_mask, teacher_tokens=t_tok, teacher_mask=t_mask,
                    teacher_index=np.int32(rows.teacher_index), answer=ans)


def build_task(cfg: ExperimentConfig, *, process_index: int = 0, process_count: int = 1) -> Task:
    source = cfg.data.source
    if source.startswith("synthetic:"):
        from opd_jax.data.synthetic import make_synthetic_task

        return make_synthetic_task(cfg, process_index=process_index, process_count=process_count)
    from opd_jax.data.text_task import TextTask

    return TextTask(cfg, process_index=process_index, process_count=process_count)
