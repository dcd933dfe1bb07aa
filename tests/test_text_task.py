"""TextTask: student/teacher templates, teacher scoring of the student's exact tokens, per-dataset routing,
bad rows, the vocabulary check, and an end-to-end `opd-jax eval` on a tiny model.

Everything is local: the Qwen3-style fixture tokenizer (vocab 512) and tiny random models; AIME rows come from
../shared/data."""

from __future__ import annotations

import csv
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fixtures_tokenizer import make_tokenizer_dir

from opd_jax.config.schema import DataConfig, ExperimentConfig, ModelConfig, TeacherConfig
from opd_jax.data import build_task
from opd_jax.data.dataset import DataError
from opd_jax.data.renderers import load_tokenizer, teacher_sequence
from opd_jax.data.text_task import TextTask
from opd_jax.errors import ConfigError
from opd_jax.models.qwen3 import build_model, positions_from_mask
from opd_jax.sampling import SamplingParams
from opd_jax.step import PromptBatch, StepBuilder
from opd_jax.train_state import init_train_state, split_model

QUESTIONS = [
    {"question": "What is 12 + 30?", "answer": "42"},
    {"question": "Let x^2 - 5x + 6 = 0 with x > 2. Find x.", "answer": "3"},
    {"question": "What is 7 + 8?", "answer": "15"},
    {"question": "Find the number of minutes in 2 hours.", "answer": "120"},
]


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def _cfg(tok_dir: str, source: str, teachers: list[TeacherConfig], **data) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.data = DataConfig(source=source, tokenizer=tok_dir, renderer="qwen3", **data)
    cfg.teachers = teachers
    cfg.sampling.max_prompt_len = 48
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Teacher template: the teacher scores exactly the student's completion, under its own prompt
# ---------------------------------------------------------------------------------------------------------------


def _manual_scorer(mdef, params, width: int = 96):
    """`score(tokens, start)`: one plain forward over `tokens` (right-padded to a fixed width, so one compile;
    causal attention keeps the padding away from real tokens); logprobs of tokens[start:] from positions
    start-1 .. len-2."""

    @jax.jit
    def full_logprobs(params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        model = mdef.merge(params)
        hidden, _ = model(tokens, positions_from_mask(mask), mask)
        return jax.nn.log_softmax(model.logits(hidden), axis=-1)

    def score(tokens: list[int], start: int) -> np.ndarray:
        assert len(tokens) <= width
        row = np.zeros((1, width), np.int32)
        row[0, : len(tokens)] = tokens
        mask = jnp.arange(width)[None] < len(tokens)
        logp = np.asarray(full_logprobs(params, jnp.asarray(row), mask)[0])
        idx = np.arange(start, len(tokens))
        return logp[idx - 1, np.asarray(tokens)[idx]]

    return score


@pytest.mark.slow
def test_teacher_scores_student_tokens_under_its_own_template(tok_dir, tmp_path):
    path = _write_jsonl(tmp_path / "math.jsonl", QUESTIONS)
    cfg = _cfg(tok_dir, f"jsonl:{path}", [TeacherConfig(name="base_teacher", renderer="base")])
    cfg.groups_per_batch, cfg.group_size = 2, 2
    cfg.sampling.max_new_tokens = 6
    task = TextTask(cfg)
    cfg.sampling.stop_token_ids = list(task.stop_token_ids)
    s_r, t_r = task.renderer, task.teacher_renderers[0]
    assert (s_r.name, t_r.name) == ("qwen3", "base")

    saved = task.state()
    rows = task.next_prompts(2)
    task.restore(saved)
    examples = task.dataset.next_batch(2)  # the same rows again, to know their messages
    assert rows.teacher_index == 0
    for ex, s, t in zip(examples, rows.student, rows.teacher, strict=True):
        assert s == s_r.build_prompt(ex.messages)
        assert t == t_r.build_prompt(ex.messages)
        assert s != t  # different templates for the same example
        assert s_r.decode(s, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
        assert t_r.decode(t).endswith("\nAnswer:")

    arrays = task.pack(rows, cfg.sampling.max_prompt_len, False)
    batch = PromptBatch(**{k: jnp.asarray(v) for k, v in arrays.items()})
    student = build_model(ModelConfig(), seed=0)
    teacher = build_model(ModelConfig(), seed=1)
    s_def, s_params, s_frozen, _, _ = split_model(student)
    t_def, t_params, _, _, _ = split_model(teacher)
    optimizer = optax.sgd(0.0)
    builder = StepBuilder(cfg, s_def, [t_def], None, optimizer)
    state = init_train_state(optimizer, s_params, s_frozen)
    samples = jax.jit(builder.sample_phase)(state, batch, jax.random.key(3), SamplingParams.create(1.0))

    # The step's teacher scoring, on the packed teacher prompts (repeated per sample as in update_phase).
    K = cfg.group_size
    t_lp, _, _ = jax.jit(builder.teacher_outputs)(
        [t_params], batch.teacher_index, jnp.repeat(batch.teacher_tokens, K, 0), jnp.repeat(batch.teacher_mask, K, 0),
        samples.tokens, samples.mask)
    t_lp = np.asarray(t_lp)
    lengths = np.asarray(samples.lengths)
    score = _manual_scorer(t_def, t_params)
    assert lengths.min() >= 2, lengths

    for b in range(samples.tokens.shape[0]):
        ex, L = examples[b // K], int(lengths[b])
        completion = [int(x) for x in samples.tokens[b, :L]]
        seq, start = teacher_sequence(s_r, t_r, ex.messages, completion)
        assert seq[start:] == completion and seq[:start] == rows.teacher[b // K]
        manual = score(seq, start)
        np.testing.assert_allclose(t_lp[b, :L], manual, atol=1e-5, rtol=0)
        # The same completion under the student's template scores differently: the template matters.
        student_seq = s_r.build_prompt(ex.messages) + completion
        wrong = score(student_seq, len(student_seq) - L)
        assert np.max(np.abs(wrong - manual)) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Routing, bad rows, vocabulary
# ---------------------------------------------------------------------------------------------------------------


def test_teachers_routed_by_dataset_name(tok_dir, tmp_path):
    teachers = [TeacherConfig(name="t_alpha", renderer="same", datasets=["alpha"]),
                TeacherConfig(name="t_beta", renderer="qwen3_nothink", datasets=["beta", "gamma"])]
    for stem in ("alpha", "beta"):
        _write_jsonl(tmp_path / f"{stem}.jsonl", QUESTIONS)
    alpha = TextTask(_cfg(tok_dir, f"jsonl:{tmp_path / 'alpha.jsonl'}", teachers))
    beta = TextTask(_cfg(tok_dir, f"jsonl:{tmp_path / 'beta.jsonl'}", teachers))
    # data.name overrides the file stem; a name no teacher routes is an error (it would silently go to teacher 0),
    # unless one teacher takes the rest (empty `datasets`)
    gamma = TextTask(_cfg(tok_dir, f"jsonl:{tmp_path / 'alpha.jsonl'}", teachers, name="gamma"))
    with pytest.raises(ConfigError, match=r"match no data source.*'delta'"):
        TextTask(_cfg(tok_dir, f"jsonl:{tmp_path / 'beta.jsonl'}", teachers, name="delta"))
    catch_all = [TeacherConfig(name="t_rest"), *teachers]
    other = TextTask(_cfg(tok_dir, f"jsonl:{tmp_path / 'beta.jsonl'}", catch_all, name="delta"))
    beta2 = TextTask(_cfg(tok_dir, f"jsonl:{tmp_path / 'beta.jsonl'}", catch_all))
    # the catch-all takes what no one names wherever it stands in the list (it went to teacher 0 before)
    rest_last = TextTask(_cfg(tok_dir, f"jsonl:{tmp_path / 'beta.jsonl'}", [*teachers, TeacherConfig(name="t_rest")],
                              name="delta"))

    for task, idx in ((alpha, 0), (beta, 1), (gamma, 1), (other, 0), (beta2, 2), (rest_last, 2)):
        for _ in range(3):  # crosses an epoch
            rows = task.next_prompts(2)
            assert rows.teacher_index == idx
            if task.teacher_renderers[idx] is task.renderer:  # "same": the teacher reads the student's prompts
                assert rows.teacher == rows.student
            else:  # the thinking-off template: the student's prompt + the empty think block
                for s, t in zip(rows.student, rows.teacher, strict=True):
                    assert t[: len(s)] == s and t != s
            packed = task.pack(rows, 48, False)
            assert int(packed["teacher_index"]) == idx


def test_bad_rows_skipped_and_reported(tok_dir, tmp_path):
    rows = [QUESTIONS[0], {"question": "", "answer": "1"}, {"answer": "2"}, QUESTIONS[1],
            {"question": "   ", "answer": "3"}, QUESTIONS[2]]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    task = TextTask(_cfg(tok_dir, f"jsonl:{path}", [TeacherConfig(renderer="base")]))
    out = task.next_prompts(len(rows))  # one epoch: every row visited once
    assert len(out.student) == len(out.teacher) == len(rows)
    good = {q["answer"] for q in QUESTIONS[:3]}
    assert set(out.answers) <= good  # bad slots were filled with good rows
    assert all(s and t for s, t in zip(out.student, out.teacher, strict=True))
    stats = task.dataset.stats
    assert stats.counts == {"empty_prompt": 2, "missing_field": 1}
    report = task.skip_report()
    assert "3 skipped" in report and "empty_prompt: 2" in report and "missing_field: 1" in report
    assert "no prompt field 'question'" in report


def test_prompt_budget_counts_teacher_template(tok_dir, tmp_path):
    """A row whose teacher prompt is over budget is a counted skip, not a crash in `pack`."""
    path = _write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:1])
    cfg = _cfg(tok_dir, f"jsonl:{path}", [TeacherConfig(renderer="qwen3_nothink")])
    probe = TextTask(cfg)
    msgs = [{"role": "user", "content": QUESTIONS[0]["question"]}]
    n_s = len(probe.renderer.build_prompt(msgs))
    n_t = len(probe.teacher_renderers[0].build_prompt(msgs))
    assert n_t > n_s
    cfg.sampling.max_prompt_len = n_s  # the student's prompt fits, the teacher's does not
    with pytest.raises(DataError, match="prompt_too_long"):
        TextTask(cfg).next_prompts(1)


def test_teacher_tokenizer_vocab_must_match(tok_dir, tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    # A teacher checkpoint dir with an identical tokenizer: loaded (its own object) and accepted.
    same_dir = make_tokenizer_dir(tmp_path / "teacher_same")
    cfg = _cfg(tok_dir, f"jsonl:{path}", [TeacherConfig(name="t", renderer="base", model=ModelConfig(
        hf_path=same_dir))])
    task = TextTask(cfg)
    assert task.teacher_renderers[0].tokenizer is not task.tokenizer
    rows = task.next_prompts(2)
    assert rows.teacher != rows.student

    # One extra token: a different vocabulary is an error naming the teacher.
    bigger = load_tokenizer(make_tokenizer_dir(tmp_path / "teacher_big"))
    bigger.add_tokens(["<extra_token>"])
    bigger.save_pretrained(str(tmp_path / "teacher_big"))
    for renderer in ("same", "base"):
        cfg = _cfg(tok_dir, f"jsonl:{path}", [TeacherConfig(name="big", renderer=renderer, model=ModelConfig(
            hf_path=str(tmp_path / "teacher_big")))])
        with pytest.raises(ValueError, match="teacher 'big'.*shared vocabulary"):
            TextTask(cfg)


def test_build_task_picks_text_task(tok_dir, tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    task = build_task(_cfg(tok_dir, f"jsonl:{path}", [TeacherConfig()]))
    assert isinstance(task, TextTask)
    assert task.stop_token_ids == task.renderer.stop_token_ids
    assert task.grade(task.tokenizer.encode("so \\boxed{42}"), "42")
    assert not task.grade(task.tokenizer.encode("so \\boxed{41}"), "42")


# ---------------------------------------------------------------------------------------------------------------
# Eval problems and `opd-jax eval`
# ---------------------------------------------------------------------------------------------------------------


def _aime_rows(shared: str, n: int) -> list[dict]:
    with open(os.path.join(shared, "aime24.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()][:n]


def test_eval_problems_preset_and_jsonl(tok_dir, shared_data, monkeypatch):
    monkeypatch.setenv("OPD_SHARED_DATA", shared_data)
    aime = _aime_rows(shared_data, 30)
    path = os.path.join(shared_data, "aime24.jsonl")
    # A preset brings its own split and fields; a jsonl eval source reads the data fields (here "problem").
    for spec, fields in (("preset:aime24", {}), (f"jsonl:{path}", {"prompt_field": "problem"})):
        cfg = _cfg(tok_dir, f"jsonl:{path}", [TeacherConfig()], **fields)
        cfg.eval.source = spec
        cfg.sampling.max_prompt_len = 2048  # eval prompts follow the training rule: over the budget is a skip
        task = TextTask(cfg)
        problems = task.eval_problems()
        assert len(problems) == 30 and task.eval_counts["prompts_skipped"] == 0
        for p, row in zip(problems, aime, strict=True):
            assert p.answer == str(row["answer"]) and p.text == row["problem"]
            assert p.prompt == task.renderer.build_prompt([{"role": "user", "content": row["problem"]}])


def _check_eval_outputs(paths: dict[str, str], k: int, answers: list[str], texts: list[str],
                        max_new_tokens: int) -> list[int]:
    """The JSONL / CSV / summary of one eval agree with each other and with the avg@k, stderr, pass@k formulas.
    Returns the per-problem correct counts."""
    with open(paths["jsonl"]) as f:
        rows = [json.loads(line) for line in f]
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    with open(paths["summary"]) as f:
        summary = json.load(f)
    n = len(answers)
    assert len(rows) == len(table) == n
    assert "completions" not in table[0]
    counts = []
    for j, (r, t) in enumerate(zip(rows, table, strict=True)):
        c = r["correct"]
        counts.append(c)
        assert r["problem"] == j and r["k"] == k and 0 <= c <= k
        assert r["answer"] == answers[j] and r["text"] == texts[j]
        assert len(r["completions"]) == k and all(isinstance(x, str) for x in r["completions"])
        assert r["pass@1"] == pytest.approx(c / k)
        assert r[f"pass@{k}"] == (1.0 if c > 0 else 0.0)  # n == k samples: pass@k is "any correct"
        assert 0 <= r["mean_length"] <= max_new_tokens and 0 <= r["truncated"] <= k
        assert int(t["correct"]) == c and t["answer"] == answers[j]
        assert float(t["pass@1"]) == pytest.approx(c / k)
        assert float(t[f"pass@{k}"]) == pytest.approx(r[f"pass@{k}"])
    acc = np.asarray(counts) / k
    assert summary["eval_problems"] == n and summary["eval_k"] == k
    assert summary["eval_accuracy"] == pytest.approx(acc.mean())
    assert summary["eval_stderr"] == pytest.approx(acc.std(ddof=1) / math.sqrt(n))
    assert summary[f"eval_pass@{k}"] == pytest.approx(np.mean([r[f"pass@{k}"] for r in rows]))
    assert summary["eval_mean_length"] == pytest.approx(np.mean([r["mean_length"] for r in rows]))
    assert summary["eval_truncation_rate"] == pytest.approx(sum(r["truncated"] for r in rows) / (n * k))
    return counts


@pytest.mark.slow
def test_opd_jax_eval_end_to_end(tok_dir, shared_data, tmp_path, monkeypatch, capsys):
    """`opd-jax eval` on a tiny random student (an exported HF dir with the fixture tokenizer) over 3 AIME
    problems, k=2. The real grader runs; its verdicts are then replaced by a fixed pattern so the summary numbers
    are non-trivial (a random model solves nothing)."""
    from opd_jax import cli
    from opd_jax.models.hf_io import export_hf

    monkeypatch.setenv("OPD_SHARED_DATA", shared_data)
    student_dir = str(tmp_path / "student")
    _, params, _, _, _ = split_model(build_model(ModelConfig(), seed=0))
    export_hf(params, ModelConfig(), student_dir)
    make_tokenizer_dir(student_dir)

    graded: list[tuple[list[list[int]], list[str], list[bool]]] = []
    pattern = [True, False, False, False, True, True]  # problem 0: 1/2, problem 1: 0/2, problem 2: 2/2
    real_grade_batch = TextTask.grade_batch

    def grade_batch(self, completions, answers):
        real = real_grade_batch(self, completions, answers)
        graded.append((completions, answers, real))
        return pattern[: len(completions)]

    monkeypatch.setattr(TextTask, "grade_batch", grade_batch)
    run_dir = tmp_path / "run"
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"run_dir: {run_dir}\n"
        f"student:\n  hf_path: {student_dir}\n"
        f"data:\n  source: jsonl:{os.path.join(shared_data, 'aime24.jsonl')}\n  prompt_field: problem\n"
        f"  tokenizer: {student_dir}\n"
        "sampling:\n  max_prompt_len: 256\n"
        "logging:\n  tensorboard: false\n  progress: false\n"
    )
    rc = cli.main(["eval", str(config), "eval.source=preset:aime24", "eval.num_problems=3", "eval.k=2",
                   "eval.max_new_tokens=8"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 problems x 2 samples" in out and "avg@2 = 0.5000" in out

    aime = _aime_rows(shared_data, 3)
    answers, texts = [str(r["answer"]) for r in aime], [r["problem"] for r in aime]
    [(completions, graded_answers, real)] = graded
    assert graded_answers == [a for a in answers for _ in range(2)]
    assert len(completions) == 6 and all(0 < len(c) <= 8 for c in completions)
    assert all(isinstance(v, bool) for v in real)

    eval_dir = run_dir / "eval"
    paths = {"jsonl": eval_dir / "eval_cli.jsonl", "csv": eval_dir / "eval_cli.csv",
             "summary": eval_dir / "eval_cli_summary.json"}
    assert all(p.is_file() for p in paths.values())
    counts = _check_eval_outputs({k: str(v) for k, v in paths.items()}, 2, answers, texts, 8)
    assert counts == [1, 0, 2]
    summary = json.loads(paths["summary"].read_text())
    assert summary["eval_accuracy"] == pytest.approx(0.5)
    assert summary["eval_stderr"] == pytest.approx(0.5 / math.sqrt(3))
    assert summary["eval_pass@2"] == pytest.approx(2 / 3)
    assert f"{summary['eval_stderr']:.4f}" in out
