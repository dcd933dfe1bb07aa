"""Text prompts (HF datasets, JSONL/Parquet, TFDS, presets) rendered with chat templates, graded as math.

The student and each teacher have their own renderer: the teacher's prompt is rendered with ITS template,
and the step appends the student's sampled completion tokens unchanged (see `step.completion_hidden`), so the
teacher scores exactly the student's tokens. A teacher renders with the tokenizer in its `model.hf_path` when
that is a local directory holding one (else the student's); both must share one vocabulary (checked here).
"""

from __future__ import annotations

import difflib
import os

from opd_jax import hub
from opd_jax.config.schema import ExperimentConfig
from opd_jax.data import math_grading
from opd_jax.data.dataset import Example, PromptDataset
from opd_jax.data.renderers import Renderer, check_same_vocab, get_renderer, load_tokenizer
from opd_jax.data.sources import open_source
from opd_jax.data.task import EvalProblem, PromptRows, Task
from opd_jax.errors import ConfigError, DataError


def _local_tokenizer_dir(path: str | None) -> str | None:
    """The local directory of `path` (a Hub id resolves to its snapshot) when it holds tokenizer files, else None
    (remote or weights-only dirs)."""
    path = hub.resolve(path) if path else path
    if not path or "://" in path or not os.path.isdir(path):
        return None
    files = ("tokenizer.json", "tokenizer_config.json")
    return path if any(os.path.isfile(os.path.join(path, f)) for f in files) else None


def _check_routes(cfg: ExperimentConfig, name: str) -> None:
    """Teachers that route by dataset must route this run's data: when some teacher lists `datasets` but none lists
    the data's name and no teacher is a catch-all (empty `datasets`), every batch would silently go to teacher 0.
    Raises ConfigError listing the names known (the data's) and routed."""
    routed = [(i, t) for i, t in enumerate(cfg.teachers) if t.datasets]
    if not routed or any(name in t.datasets for _, t in routed) or len(routed) < len(cfg.teachers):
        return
    names = sorted({d for _, t in routed for d in t.datasets})
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f" (did you mean {name!r} for {close[0]!r}? names are case-sensitive)" if close else ""
    raise ConfigError(f"teachers.*.datasets: the routed names {names} match no data source; this run's data is "
                      f"named {name!r} (data.name, or derived from data.source){hint}",
                      hint="name the data's dataset in one teacher's `datasets`, or leave one teacher's `datasets` "
                           "empty to take whatever is not routed")


class TextTask(Task):
    def __init__(self, cfg: ExperimentConfig, *, process_index: int = 0, process_count: int = 1):
        d = cfg.data
        tok_path = d.tokenizer or cfg.student.hf_path
        if not tok_path:
            raise ConfigError("data.tokenizer: a text data source needs a tokenizer (set data.tokenizer or "
                              "student.hf_path)")
        self.tokenizer = load_tokenizer(tok_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.vocab_size = len(self.tokenizer)  # checked against the student's head before anything compiles
        self.renderer: Renderer = get_renderer(d.renderer, self.tokenizer)
        # Each teacher renders with its own tokenizer when its checkpoint dir holds one (else the student's);
        # the ids are exchanged as-is, so the vocabularies must match.
        tokenizers = {os.path.realpath(tok_path): self.tokenizer} if os.path.isdir(tok_path) else {}
        self.teacher_renderers: list[Renderer] = []
        for i, t in enumerate(cfg.teachers):
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
                raise ConfigError(f"teachers.{i}: teacher {t.name!r}: {e}") from None
            # "same": the student's format over the same ids, so the teacher reuses the student's prompts
            self.teacher_renderers.append(self.renderer if t.renderer == "same" else r)
        self.routes = {name: i for i, t in enumerate(cfg.teachers) for name in t.datasets}
        # what no teacher names goes to the one teacher without `datasets` (config.validate allows at most one)
        self.default_teacher = next((i for i, t in enumerate(cfg.teachers) if not t.datasets), 0)
        self.max_prompt_len = cfg.sampling.max_prompt_len
        self.truncate_prompts = cfg.sampling.truncate_prompts
        self.sft = cfg.algorithm == "sft"
        # SFT rows are whole conversations: their budget is the full sequence, not the prompt
        budget = self.max_prompt_len + cfg.sampling.max_new_tokens if self.sft else self.max_prompt_len
        source = open_source(d.source, split=d.split, prompt_field=d.prompt_field, answer_field=d.answer_field,
                             name=d.name or None)
        _check_routes(cfg, source.name)
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
        return self.routes.get(ex.source, self.default_teacher)

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
        student, teacher = self._render_pair(ex.messages, self._teacher_for(ex))
        return teacher if len(teacher) > len(student) else student

    def _render_pair(self, messages: list[dict], t_idx: int) -> tuple[list[int], list[int]]:
        """(student prompt, teacher prompt) of `messages`, each in its own template."""
        student = self.renderer.build_prompt(messages)
        if not self.teacher_renderers:
            return student, student
        t_renderer = self.teacher_renderers[t_idx]
        return student, (student if t_renderer is self.renderer else t_renderer.build_prompt(messages))

    def fit_prompt(self, messages: list[dict], t_idx: int = 0) -> tuple[list[int], list[int], bool] | None:
        """(student prompt, teacher prompt, truncated) that fit `sampling.max_prompt_len`, or None when they do not
        and truncation is off. With `sampling.truncate_prompts` an over-long prompt keeps its template whole: only
        the content of the last user message is cut (its last tokens kept), and the student and the teacher get
        the same cut content, each in its own template."""
        budget = self.max_prompt_len
        pair = self._render_pair(messages, t_idx)
        if max(map(len, pair)) <= budget:
            return (*pair, False)
        if not self.truncate_prompts:
            return None
        i = max(j for j, m in enumerate(messages) if m.get("role") == "user")
        content = self.tokenizer.encode(messages[i]["content"], add_special_tokens=False)

        def with_last(k: int) -> tuple[list[int], list[int]]:
            text = self.tokenizer.decode(content[len(content) - k:]) if k else ""
            cut = [*messages[:i], {**messages[i], "content": text}, *messages[i + 1:]]
            return self._render_pair(cut, t_idx)

        lo, hi = 0, len(content)  # largest k whose rendering fits: fits(lo) is checked below, fits(hi) is False
        if max(map(len, with_last(0))) > budget:
            raise DataError(f"sampling.max_prompt_len={budget} is shorter than the chat template alone "
                            f"({max(map(len, with_last(0)))} tokens with an empty question): raise it")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if max(map(len, with_last(mid))) <= budget:
                lo = mid
            else:
                hi = mid
        return (*with_last(lo), True)

    def next_prompts(self, n: int) -> PromptRows:
        examples = self.dataset.next_batch(n)
        # one teacher per step: route by the first row's dataset (batches mixing datasets use that teacher)
        t_idx = self._teacher_for(examples[0]) if self.teacher_renderers else 0
        student, teacher = [], []
        for ex in examples:
            fitted = self.fit_prompt(ex.messages, t_idx)
            if fitted is None:  # the dataset's budget check admits only prompts that fit, or truncation is on
                raise DataError(f"prompt of row {ex.index} of {ex.source!r} does not fit sampling.max_prompt_len")
            student.append(fitted[0])
            teacher.append(fitted[1])
            self.truncated_prompts += int(fitted[2])
        return PromptRows(student=student, teacher=teacher, answers=[ex.answer for ex in examples],
                          teacher_index=t_idx)

    def eval_problems(self) -> list[EvalProblem]:
        """The eval set's problems under the training prompt rule (`fit_prompt`): a prompt over
        `sampling.max_prompt_len` is skipped and counted, or with `sampling.truncate_prompts` its content is cut.
        The counts land in `eval_counts` (reported with every eval)."""
        if not self._eval_source:
            return []
        src = open_source(self._eval_source, split=self._eval_split, prompt_field=self._eval_prompt_field,
                          answer_field=self._eval_answer_field)
        ds = PromptDataset(src, seed=0, shuffle=False)
        out = []
        counts = {"prompts_skipped": 0, "prompts_truncated": 0, "rows_without_answer": 0}
        for ex in ds.all_examples():
            if ex.answer is None:
                counts["rows_without_answer"] += 1
                continue
            fitted = self.fit_prompt(ex.messages)
            if fitted is None:
                counts["prompts_skipped"] += 1
                continue
            counts["prompts_truncated"] += int(fitted[2])
            out.append(EvalProblem(fitted[0], str(ex.answer), ex.messages[-1]["content"],
                                   id=ex.id or ""))
        counts.update({f"rows_skipped/{k}": v for k, v in ds.stats.counts.items()})
        self.eval_counts = counts
        return out

    def grade(self, completion: list[int], answer: str) -> bool:
        return self.grade_batch([completion], [answer])[0]

    def grade_batch(self, completions: list[list[int]], answers: list[str]) -> list[bool]:
        """Math grading of this turn's text only (`Renderer.turn_text`: the renderer's end-of-turn rule first), so
        an answer written into a next turn the model made up is never read."""
        texts = [self.renderer.turn_text(c) for c in completions]
        return math_grading.grade_batch(texts, answers)

    def decode(self, tokens: list[int]) -> str:
        return self.renderer.decode(tokens)

    def state(self) -> dict:
        return {"dataset": self.dataset.state()}

    def restore(self, state: dict) -> None:
        if "dataset" in state:
            self.dataset.restore(state["dataset"])

    def skip_report(self) -> str:
        return self.dataset.report() if self.dataset.stats.counts else ""

    def data_counts(self) -> dict[str, int]:
        return {**super().data_counts(), **{f"skipped/{k}": v for k, v in self.dataset.stats.counts.items()}}
