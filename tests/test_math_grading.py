"""Math grading: extraction, normalization, math-verify equivalence, timeouts; on the real AIME24 / AMC23 answers."""

from __future__ import annotations

import json
import signal
import time
from fractions import Fraction
from pathlib import Path

import pytest

from opd_jax.data import math_grading as mg
from opd_jax.data.math_grading import extract_answer, extract_boxed, grade, grade_batch, normalize_answer

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared/data"
WORKERS = 2  # one pool size for every test, so the spawned workers are reused


def _load(name: str) -> list[dict]:
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"eval data {path} not found (expected the shared data dir next to the repo)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _int_gold(answer) -> int:
    value = Fraction(str(answer))
    assert value.denominator == 1, answer
    return int(value)


@pytest.fixture(scope="module", autouse=True)
def _pool_cleanup():
    yield
    mg.shutdown_pool()


# ----------------------------------------------------------------------------------------------------------------
# Extraction and normalization (pure, no worker processes)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is $\boxed{204}$.", "204"),
        (r"\boxed{1} first, then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # the last box wins
        (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),  # escaped braces do not close the box
        (r"\boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),  # nested braces
        (r"\fbox{7}", "7"),
        (r"\framebox{204} minutes", "204"),
        (r"The answer is \boxed 5$.", "5"),
        (r"\boxed5", "5"),
        (r"\boxed{12} and then \boxed{3", None),  # truncated last box: no answer, not the earlier one
        (r"\boxed{ }", None),
        (r"no box at all 42", None),
        (r"\boxedx{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_answer_policy():
    # Unboxed: the last plain number (documented fallback) unless require_boxed.
    assert extract_answer("Adding gives 1,000 and then 12.") == "12"
    assert extract_answer("Total: 1,625 apples") == "1625"
    assert extract_answer("The answer is 204", require_boxed=True) is None
    # A present-but-unclosed box suppresses the number fallback.
    assert extract_answer(r"so 12 is \boxed{13") is None
    # Thinking: only the text after </think> counts; an open <think> has no answer yet.
    assert extract_answer(r"<think>maybe \boxed{3}</think>The answer is \boxed{4}") == "4"
    assert extract_answer(r"<think>maybe \boxed{3} hmm") is None
    assert extract_answer("no numbers here") is None


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$0204$", "204"),
        ("204.0", "204"),
        (27.0, "27"),
        (r"\text{204}", "204"),
        (r"\textbf{\text{7}}", "7"),
        (r"\boxed{025}", "25"),
        (r"\dfrac{1}{2}", "1/2"),
        (r"\frac12", "1/2"),
        ("x = 5", "5"),
        ("1,625", "1625"),
        ("1{,}625", "1625"),
        ("0.50", "0.5"),
        (r"45^\circ", "45"),
        (r"10\%", "10"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        ("-007", "-7"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# ----------------------------------------------------------------------------------------------------------------
# Real data: AIME 2024 (string golds with leading zeros) and AMC 2023 (float golds)
# ----------------------------------------------------------------------------------------------------------------


def test_aime24_gold_forms_and_perturbations():
    rows = _load("aime24.jsonl")
    assert len(rows) == 30
    responses, golds, expected = [], [], []
    for row in rows:
        gold = row["answer"]  # e.g. "025": AIME answers are 000-999, some stored zero-padded
        n = _int_gold(gold)
        right = [
            rf"Thus the answer is $\boxed{{{n}}}$.",
            rf"\boxed{{{gold}}}",
            rf"\boxed{{{n:03d}}}",
            rf"\boxed{{0{n}}}",
            rf"\boxed{{{n}.0}}",
            rf"\boxed{{\text{{{n}}}}}",
            f"The final answer is {n}.",  # unboxed: last-number fallback
            rf"<think>try \boxed{{{n + 7}}}</think>So \boxed{{{n}}}",
        ]
        wrong = [
            rf"\boxed{{{n + 1}}}",
            rf"\boxed{{{n - 1}}}",
            f"The final answer is {n + 1}.",
            rf"<think>\boxed{{{n}}}</think>So \boxed{{{n + 1}}}",  # the thought is not the answer
            rf"<think>\boxed{{{n}}}",  # truncated while thinking
            "I don't know.",
        ]
        for r in right:
            responses.append(r), golds.append(gold), expected.append(True)
        for r in wrong:
            responses.append(r), golds.append(gold), expected.append(False)
    mg.reset_grading_stats()
    t0 = time.perf_counter()
    got = grade_batch(responses, golds, timeout=5.0, max_workers=WORKERS)
    elapsed = time.perf_counter() - t0
    mismatches = [(r, g, e) for r, g, e, x in zip(responses, golds, expected, got, strict=True) if x != e]
    assert not mismatches, mismatches[:5]
    # Integer answers are decided without sympy, so AIME grading is cheap and never starts the worker pool.
    assert mg.grading_stats()["math_verify_calls"] == 0
    assert elapsed < 1.0, elapsed


def test_amc23_gold_forms_and_perturbations():
    rows = _load("amc23.jsonl")
    assert len(rows) == 40
    responses, golds, expected = [], [], []
    for row in rows:
        gold = row["answer"]  # float, e.g. 27.0
        n = _int_gold(gold)
        right = [rf"\boxed{{{n}}}", rf"\boxed{{{gold}}}", rf"$\boxed{{\dfrac{{{2 * n}}}{{2}}}}$", f"answer: {n}"]
        wrong = [rf"\boxed{{{n + 1}}}", rf"\boxed{{{-n if n else 1}}}"]
        for r in right:
            responses.append(r), golds.append(gold), expected.append(True)
        for r in wrong:
            responses.append(r), golds.append(gold), expected.append(False)
    got = grade_batch(responses, golds, max_workers=WORKERS)
    mismatches = [(r, g, e) for r, g, e, x in zip(responses, golds, expected, got, strict=True) if x != e]
    assert not mismatches, mismatches[:5]


def test_amc23_fraction_perturbation_goes_through_math_verify():
    # A non-integer fraction against an integer gold cannot be decided by the quick path: math-verify says no.
    rows = _load("amc23.jsonl")[:4]
    responses = [rf"\boxed{{\frac{{{2 * _int_gold(r['answer']) + 1}}}{{2}}}}" for r in rows]
    mg.reset_grading_stats()
    assert grade_batch(responses, [r["answer"] for r in rows], max_workers=WORKERS) == [False] * len(rows)
    assert mg.grading_stats()["math_verify_calls"] == len(rows)


# ----------------------------------------------------------------------------------------------------------------
# Fractions and expressions (math-verify in the worker pool)
# ----------------------------------------------------------------------------------------------------------------


def test_fraction_and_expression_equivalence():
    cases = [
        (r"\boxed{\frac{1}{2}}", "0.5", True),
        (r"\boxed{0.5}", r"\frac{1}{2}", True),
        (r"\boxed{\dfrac{3}{4}}", r"$\frac{3}{4}$", True),
        (r"\boxed{2/3}", r"\frac{1}{2}", False),
        (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", False),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", True),
        (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", True),
        (r"\boxed{2\sqrt{3}}", r"\sqrt{13}", False),
        (r"\boxed{(x+1)^2}", r"x^2+2x+1", True),
        (r"\boxed{\pi}", "3.14", False),
    ]
    got = grade_batch([c[0] for c in cases], [c[1] for c in cases], timeout=5.0, max_workers=WORKERS)
    assert got == [c[2] for c in cases], list(zip(cases, got, strict=True))


def test_grade_single_and_in_process():
    assert grade(r"\boxed{\frac{1}{2}}", "0.5", max_workers=WORKERS)
    assert not grade(r"\boxed{\frac{1}{2}}", "0.6", max_workers=WORKERS)
    # max_workers=0 grades in this process (no pool): same verdicts.
    assert grade(r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", max_workers=0)
    assert not grade(r"\boxed{\sqrt{3}}", r"\sqrt{2}", max_workers=0)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="responses"):
        grade_batch(["1"], ["1", "2"])


# ----------------------------------------------------------------------------------------------------------------
# Timeouts
# ----------------------------------------------------------------------------------------------------------------


def test_adversarial_latex_times_out_and_is_counted():
    # sympy tries to evaluate the power tower forever; the worker's alarm stops it and the batch carries on.
    mg.reset_grading_stats()
    t0 = time.perf_counter()
    got = grade_batch(
        [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{\frac{1}{2}}", r"\boxed{204}"],
        ["5", "0.5", "204"],
        timeout=0.5,
        max_workers=WORKERS,
    )
    assert got == [False, True, True]
    stats = mg.grading_stats()
    assert stats["timeouts"] == 1 and stats["pool_restarts"] == 0
    assert time.perf_counter() - t0 < 10.0
    # The pool survived: the next call still grades.
    assert grade(r"\boxed{\sqrt{4}}", "2", max_workers=WORKERS)


def _ignore_alarm_and_hang(seconds: float) -> tuple[bool, bool]:
    """A task that ignores SIGALRM (like a C-level hang) - only the parent's backstop can stop it."""
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    time.sleep(seconds)
    return True, False


def _quick_task(ok: bool) -> tuple[bool, bool]:
    return ok, False


@pytest.mark.slow
def test_backstop_kills_hung_worker(monkeypatch):
    mg._wait_for_pool_ready(WORKERS)  # a warm pool: the backstop budget has no start-up slack
    monkeypatch.setattr(mg, "_BACKSTOP_SLACK_S", 0.5)
    mg.reset_grading_stats()
    t0 = time.perf_counter()
    out = mg._run_pool(_ignore_alarm_and_hang, [(60.0,)], timeout=0.5, workers=WORKERS)
    assert out == [(False, True)]
    assert time.perf_counter() - t0 < 10.0  # the budget (~2 s here), not the task's 60 s
    assert mg.grading_stats()["pool_restarts"] == 1
    # A fresh pool replaces the killed one.
    got = mg._run_pool(_quick_task, [(True,), (False,)], timeout=0.5, workers=WORKERS)
    assert got == [(True, False), (False, False)]
