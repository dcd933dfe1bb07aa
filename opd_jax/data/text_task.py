"""Text prompts (HF datasets, JSONL/Parquet, TFDS, presets) rendered with chat templates, graded as math.

The student and each teacher have their own renderer: the teacher's prompt is rendered with ITS template,
and the step appends the student's sampled completion tokens unchanged (see `step.completion_hidden`), so the
teacher scores exactly the student's tokens. A teacher renders with the tokenizer in its `model.hf_path` when
that is a local directory holding one (else the student's); both must share one vocabulary (checked here).
"""

from __future__ import annotations

import os

from opd_jax.config.schema import ExperimentConfig
from opd_jax.data import math_grading
from opd_jax.data.dataset import Example, PromptDataset
from opd_jax.data.renderers import Renderer, check_same_vocab, get_renderer, load_tokenizer
from opd_jax.data.sources import open_source
from opd_jax.data.task import EvalProblem, PromptRows, Task


def _local_tokenizer_dir(path: str | None) -> str | None:
    """`path` when it is a local directory holding tokenizer files, else None (remote or weights-only dirs)."""
    if not path or "://" in path or not os.path.isdir(path):
        return None
    files = ("tokenizer.json", "tokenizer_config.json")
    return path if any(os.path.isfile(os.path.join(path, f)) for f in files) else None


class TextTask(Task):
    def __init__(self, cfg: ExperimentConfig, *, process_index: int = 0, process_count: int = 1):
        d = cfg.data
        tok_path = d.tokenizer or cfg.student.hf_path
        if not tok_path:
            raise ValueError("data.tokenizer: a text data source needs a tokenizer (data.tokenizer or student.hf_path)")
        self.tokenizer = load_tokenizer(tok_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.renderer: Renderer = get_renderer(d.renderer, self.tokenizer)
        # Each teacher renders with its own tokenizer when its checkpoint dir holds one (else the student's);
        # the ids are exchanged as-is, so the vocabularies must match.
        tokenizers = {os.path.realpath(tok_path): self.tokenizer} if os.path.isdir(tok_path) else {}
        self.teacher_renderers: list[Renderer] = []
        for t in cfg.teachers:
            t_dir = _local_tokenizer_dir(t.model.hf_path)
            t_tok = self.tokenizer
            if t_dir is not None:
                key = os.path.realpath(t_dir)
                if key not in tokenizers:
                    tokenizers[key] = load_tokenizer(t_dir)
                t_tok = tokenizers[key]
            name = d.renderer if t.renderer == "same" else t.renderer
            r = self.renderer if name == d.renderer and t_tok is self.tokenizer else get_renderer(name, t_tok)
            try:
                check_same_vocab(self.renderer, r)
            except ValueError as e:
                raise ValueError(f"teacher {t.name!r}: {e}") from None
            # "same": the student's format over the same ids, so the teacher reuses the student's prompts
            self.teacher_renderers.append(self.renderer if t.renderer == "same" else r)
        self.routes = {name: i for i, t in enumerate(cfg.teachers) for name in t.datasets}
        self.max_prompt_len = cfg.sampling.max_prompt_len
        self.sft = cfg.algorithm == "sft"
        # SFT rows are whole conversations: their budget is the full sequence, not the prompt
        budget = self.max_prompt_len + cfg.sampling.max_new_tokens if self.sft else self.max_prompt_len
        source = open_source(d.source, split=d.split, prompt_field=d.prompt_field, answer_field=d.answer_field,
                             name=d.name or None)
        self.dataset = PromptDataset(
            source, seed=d.shuffle_seed, process_index=process_index, process_count=process_count,
            max_examples=d.max_examples, max_prompt_tokens=budget,
            tokenize=self._conversation_tokens if self.sft else self._budget_tokens,
            truncate_prompts=cfg.sampling.truncate_prompts,
        )
        e = cfg.eval
        self._eval_source = e.source
        # EvalConfig may carry its own split / fields; else hf:/tfds: evals read "test" and non-preset sources use
        # the data fields (presets and `tfds:NAME:SPLIT` fix their own; jsonl/parquet have no split).
        self._eval_split = getattr(e, "split", None) or "test"
        self._eval_prompt_field = getattr(e, "prompt_field", None) or d.prompt_field
        self._eval_answer_field = getattr(e, "answer_field", None) or d.answer_field
        self._eval_cfg = e

    @property
    def stop_token_ids(self) -> list[int]:
        return self.renderer.stop_token_ids

    def _teacher_for(self, ex: Example) -> int:
        return self.routes.get(ex.source, 0)

    def _conversation_tokens(self, ex: Example) -> list[int]:
        if not any(m.get("role") == "assistant" for m in ex.messages):
            raise ValueError("SFT needs a conversation with an assistant turn")  # counted as a bad row
        return self.renderer.build_conversation(ex.messages)[0]

    def sft_examples(self, n: int) -> list[tuple[list[int], list[int]]]:
        """The next `n` conversations rendered in the student's template; loss on assistant tokens only."""
        if not self.sft:
            raise ValueError("sft_examples: this task was built for algorithm != sft (prompts only)")
        return [self.renderer.build_conversation(ex.messages) for ex in self.dataset.next_batch(n)]

    def _budget_tokens(self, ex: Example) -> list[int]:
        """The longer of the student's and the routed teacher's prompt: both must fit sampling.max_prompt_len."""
        student = self.renderer.build_prompt(ex.messages)
        if not self.teacher_renderers:
            return student
        t_renderer = self.teacher_renderers[self._teacher_for(ex)]
        if t_renderer is self.renderer:
            return student
        teacher = t_renderer.build_prompt(ex.messages)
        return teacher if len(teacher) > len(student) else student

    def next_prompts(self, n: int) -> PromptRows:
        examples = self.dataset.next_batch(n)
        # one teacher per step: route by the first row's dataset (batches mixing datasets use that teacher)
        t_idx = self._teacher_for(examples[0]) if self.teacher_renderers else 0
        t_renderer = self.teacher_renderers[t_idx] if self.teacher_renderers else self.renderer
        student = [self.renderer.build_prompt(ex.messages) for ex in examples]
        teacher = student if t_renderer is self.renderer else [t_renderer.build_prompt(ex.messages)
                                                                for ex in examples]
        return PromptRows(student=student, teacher=teacher, answers=[ex.answer for ex in examples],
                          teacher_index=t_idx)

    def eval_problems(self) -> list[EvalProblem]:
        if not self._eval_source:
            return []
        src = open_source(self._eval_source, split=self._eval_split, prompt_field=self._eval_prompt_field,
                          answer_field=self._eval_answer_field)
        ds = PromptDataset(src, seed=0, shuffle=False)
        out = []
        for ex in ds.all_examples():
            if ex.answer is None:
                continue
            text = ex.messages[-1]["content"]
            out.append(EvalProblem(self.renderer.build_prompt(ex.messages), str(ex.answer), text))
        return out

    def grade(self, completion: list[int], answer: str) -> bool:
        return self.grade_batch([completion], [answer])[0]

    def grade_batch(self, completions: list[list[int]], answers: list[str]) -> list[bool]:
        texts = [self.renderer.decode(c) for c in completions]
        return math_grading.grade_batch(texts, answers)

    def decode(self, tokens: list[int]) -> str:
        return self.renderer.decode(tokens)

    def state(self) -> dict:
        return {"dataset": self.dataset.state()}

    def restore(self, state: dict) -> None:
        if "dataset" in state:
            self.dataset.restore(state["dataset"])

    def skip_report(self) -> str:
        return self.dataset.report()
