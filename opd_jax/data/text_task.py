"""Text prompts (HF datasets, JSONL/Parquet, TFDS, presets) rendered with chat templates, graded as math.

The student and each teacher have their own renderer: the teacher's prompt is rendered with ITS template,
and the step appends the student's sampled completion tokens unchanged (see `step.completion_hidden`), so the
teacher scores exactly the student's tokens. Both must share one vocabulary (checked here).
"""

from __future__ import annotations

from opd_jax.config.schema import ExperimentConfig
from opd_jax.data.dataset import Example, PromptDataset
from opd_jax.data.renderers import Renderer, check_same_vocab, get_renderer, load_tokenizer
from opd_jax.data.sources import open_source
from opd_jax.eval import math_grading
from opd_jax.tasks import EvalProblem, PromptRows, Task


class TextTask(Task):
    def __init__(self, cfg: ExperimentConfig, *, process_index: int = 0, process_count: int = 1):
        d = cfg.data
        tok_path = d.tokenizer or cfg.student.hf_path
        if not tok_path:
            raise ValueError("data.tokenizer: a text data source needs a tokenizer (data.tokenizer or student.hf_path)")
        self.tokenizer = load_tokenizer(tok_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.renderer: Renderer = get_renderer(d.renderer, self.tokenizer)
        self.teacher_renderers: list[Renderer] = []
        for t in cfg.teachers:
            r = self.renderer if t.renderer == "same" else get_renderer(t.renderer, self.tokenizer)
            check_same_vocab(self.renderer, r)
            self.teacher_renderers.append(r)
        self.routes = {name: i for i, t in enumerate(cfg.teachers) for name in t.datasets}
        self.max_prompt_len = cfg.sampling.max_prompt_len
        source = open_source(d.source, split=d.split, prompt_field=d.prompt_field, answer_field=d.answer_field,
                             name=d.name or None)
        self.dataset = PromptDataset(
            source, seed=d.shuffle_seed, process_index=process_index, process_count=process_count,
            max_examples=d.max_examples, max_prompt_tokens=self.max_prompt_len,
            tokenize=lambda ex: self.renderer.build_prompt(ex.messages), truncate_prompts=cfg.sampling.truncate_prompts,
        )
        self._eval_source = cfg.eval.source
        self._eval_split = "test"
        self._eval_cfg = cfg.eval

    @property
    def stop_token_ids(self) -> list[int]:
        return self.renderer.stop_token_ids

    def _teacher_for(self, ex: Example) -> int:
        return self.routes.get(ex.source, 0)

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
        src = open_source(self._eval_source, split=self._eval_split)
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
