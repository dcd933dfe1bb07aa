"""Grading of math answers: boxed-answer extraction, string normalization and math-verify equivalence.

Answer policy (what `grade` compares against the gold answer):
  1. If the response contains a `</think>` the answer is looked for only after the last one; an unterminated
     `<think>` (truncated while thinking) has no answer and grades False.
  2. The LAST `\\boxed{...}` / `\\fbox{...}` / `\\framebox{...}` (nested braces handled, `\\boxed 5` too).
  3. With no box and `require_boxed=False` (the default) the LAST plain number in the text (`-12`, `3.5`, `1,000`);
     fractions and expressions need a box. Pass `require_boxed=True` to give no credit to unboxed answers.

Comparison, cheapest first: normalized strings equal -> True; both plain integers -> exact integer comparison in
this process; equal as exact fractions -> True; otherwise `math_verify.verify(parse(gold), parse(pred))` in a worker
process. math-verify can hang on adversarial LaTeX (`\\boxed{9^{9^{9^{9}}}}` makes sympy run forever), so each
answer runs under a SIGALRM deadline of `timeout` seconds inside a reused `ProcessPoolExecutor` worker (math-verify's
own alarm-based timeouts are disabled: they would cancel ours), and the parent kills the pool if a worker still does
not answer (e.g. a C-level hang that ignores signals). A timed-out answer grades False and is counted in
`grading_stats()["timeouts"]`.

The pool uses the "spawn" start method because forking a process that runs JAX (multithreaded) can deadlock; as with
any spawn pool, a script entry point must be guarded by `if __name__ == "__main__":`.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import math
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from fractions import Fraction

__all__ = [
    "extract_boxed",
    "extract_answer",
    "strip_thinking",
    "normalize_answer",
    "grade",
    "grade_batch",
    "grading_stats",
    "reset_grading_stats",
    "shutdown_pool",
]

# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
# A plain number not glued to a word or a preceding digit/decimal point (so "x2" and "3.5.1" tails are not picked).
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})+(?:\.\d+)?(?![\d,])|(?<![\w.])-?\d+(?:\.\d+)?")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """`text[start] == "{"`: return (content, index after the closing brace), or None if never closed."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":  # an escaped char (\{, \}) never opens or closes a group
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox`, `\\framebox`) in `text`; None if absent, empty or unclosed.

    Handles nested braces and the brace-less `\\boxed 5` form. An unclosed last box (a truncated response) gives None
    rather than falling back to an earlier box, which may be an intermediate result.
    """
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    if text.startswith("[", i):  # \framebox[width]{...}
        close = text.find("]", i)
        if close == -1:
            return None
        i = close + 1
    j = i
    while j < len(text) and text[j] in " \t\n":
        j += 1
    if j < len(text) and text[j] == "{":
        got = _braced(text, j)
        if got is None:
            return None
        content = got[0]
    elif j > i:  # "\boxed 5": the argument runs to the next whitespace or math delimiter
        m = re.match(r"[^\s$]+", text[j:])
        content = m.group(0) if m else ""
    elif j < len(text) and text[j].isalnum():  # "\boxed5": TeX takes a single token
        content = text[j]
    else:
        return None
    content = content.strip()
    return content or None


def strip_thinking(text: str) -> str | None:
    """The text after the last `</think>`; `text` unchanged if there is no think block; None if `<think>` is open."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return None
    return text


def extract_answer(text: str, require_boxed: bool = False) -> str | None:
    """The answer string `grade` compares (see the module docstring for the policy)."""
    body = strip_thinking(text)
    if body is None:
        return None
    boxed = extract_boxed(body)
    # A box that failed to parse (truncated) still means "this was the answer": no number fallback then.
    if boxed is not None or require_boxed or _BOX_RE.search(body):
        return boxed
    numbers = _NUMBER_RE.findall(body)
    return numbers[-1].replace(",", "") if numbers else None


# ---------------------------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------------------------

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\frac\{(-?\d+)\}\{(-?\d+)\}")
_FRAC_SHORT_RE = re.compile(r"\\frac(\d)(\d)")
_ASSIGN_RE = re.compile(r"^[A-Za-z]\s*=(?!=)")
_INT_RE = re.compile(r"[+-]?\d+")
_DEC_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def normalize_answer(answer: str | int | float) -> str:
    """A canonical string for cheap equality: `"$0204$"`, `"204.0"` and `"\\text{204}"` all become `"204"`.

    Strips `$`, whitespace, `\\text{}`-like wrappers, `\\left`/`\\right`, spacing commands, degree/percent marks,
    a leading `x =`, a trailing period and thousands separators; rewrites `\\dfrac`/`\\tfrac` and integer
    `\\frac{a}{b}` as `a/b`; writes integers without leading zeros or a trailing `.0`.
    """
    if isinstance(answer, bool):
        answer = int(answer)
    if isinstance(answer, float) and answer.is_integer():  # datasets store AMC answers as 27.0
        answer = int(answer)
    s = str(answer).strip()
    boxed = extract_boxed(s)
    if boxed is not None and s.lstrip("$").startswith(("\\boxed", "\\fbox", "\\framebox")):
        s = boxed
    for old in ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "~", "$"):
        s = s.replace(old, "")
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("{,}", ",")):
        s = s.replace(old, new)
    for old in ("^{\\circ}", "^\\circ", "\\circ", "\\degree", "\\%", "%"):
        s = s.replace(old, "")
    prev = None
    while prev != s:  # unwrap nested \text{\textbf{..}}
        prev, s = s, _TEXT_CMD_RE.sub(r"\1", s)
    s = "".join(s.split())
    s = s.rstrip(".")
    s = _ASSIGN_RE.sub("", s)
    s = _FRAC_RE.sub(r"\1/\2", s)
    s = _FRAC_SHORT_RE.sub(r"\1/\2", s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if _DEC_RE.fullmatch(s):
        value = Fraction(s)
        if value.denominator == 1:
            return str(value.numerator)
        s = s.lstrip("+")
        if "." in s:
            s = s.rstrip("0")
    return s


def _as_fraction(s: str) -> Fraction | None:
    """A normalized answer that is a plain rational number (`-3`, `0.5`, `1/2`), else None."""
    if _DEC_RE.fullmatch(s):
        return Fraction(s)
    num, sep, den = s.partition("/")
    if sep and _INT_RE.fullmatch(num) and _INT_RE.fullmatch(den) and int(den) != 0:
        return Fraction(int(num), int(den))
    return None


def _quick_verdict(pred: str, gold: str) -> bool | None:
    """Decide without sympy when possible: True/False, or None when math-verify must look."""
    if pred == gold:
        return True
    if _INT_RE.fullmatch(pred) and _INT_RE.fullmatch(gold):
        return int(pred) == int(gold)
    fp, fg = _as_fraction(pred), _as_fraction(gold)
    if fp is not None and fg is not None and fp == fg:
        return True
    # Different fractions / decimals still go to math-verify: it rounds floats (0.333333 vs 1/3).
    return None


# ---------------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------------


class _Timeout(BaseException):
    """Raised by SIGALRM. A BaseException so math-verify's `except Exception` cannot swallow it."""


def _on_alarm(signum, frame):
    raise _Timeout()


def _import_math_verify():
    import math_verify
    import math_verify.grader
    import math_verify.parser

    # We pass timeouts of None on purpose (our own alarm enforces the deadline): silence the one-time warning.
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    return math_verify.parse, math_verify.verify


def _math_verify_equal(pred: str, gold: str) -> bool:
    parse, verify = _import_math_verify()

    # None disables math-verify's signal.alarm timeouts, which would cancel the caller's alarm.
    gold_parsed = parse(f"${gold.strip().strip('$')}$", parsing_timeout=None)
    pred_parsed = parse(f"${pred.strip().strip('$')}$", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _verify_with_deadline(pred: str, gold: str, timeout: float) -> tuple[bool, bool]:
    """(correct, timed_out). SIGALRM needs the main thread; elsewhere it runs without a deadline."""
    use_alarm = timeout > 0 and threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    if not use_alarm:
        try:
            return _math_verify_equal(pred, gold), False
        except Exception:
            return False, False
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return _math_verify_equal(pred, gold), False
    except _Timeout:
        return False, True
    except Exception:  # malformed LaTeX etc.: not equivalent
        return False, False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _worker_init() -> None:
    # Pay the sympy / math-verify imports and lazy grammar set-up once per worker, not inside the first answer's
    # deadline.
    _import_math_verify()
    try:
        _math_verify_equal("\\frac{1}{2}", "0.5")
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------------------------
# Pool and public API
# ---------------------------------------------------------------------------------------------------------------

_POOL: cf.ProcessPoolExecutor | None = None
_POOL_WORKERS = 0
_POOL_LOCK = threading.Lock()
_STATS = {"graded": 0, "math_verify_calls": 0, "timeouts": 0, "pool_restarts": 0}

# Parent-side backstop on top of the in-worker alarm: generous, it only fires on hangs that ignore SIGALRM.
_STARTUP_SLACK_S = 60.0
_BACKSTOP_SLACK_S = 5.0


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _get_pool(max_workers: int) -> tuple[cf.ProcessPoolExecutor, bool]:
    """The shared pool (created lazily, recreated if the size changes); also says whether it is fresh."""
    global _POOL, _POOL_WORKERS
    if _POOL is not None and _POOL_WORKERS == max_workers:
        return _POOL, False
    _shutdown_locked(kill=False)
    _POOL = cf.ProcessPoolExecutor(
        max_workers=max_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
    )
    _POOL_WORKERS = max_workers
    return _POOL, True


def _shutdown_locked(kill: bool) -> None:
    global _POOL, _POOL_WORKERS
    pool, _POOL, _POOL_WORKERS = _POOL, None, 0
    if pool is None:
        return
    if kill:  # a hung worker never returns: terminate the processes, shutdown() alone would wait forever
        if hasattr(pool, "terminate_workers"):  # Python >= 3.14
            pool.terminate_workers()
        else:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
    pool.shutdown(wait=not kill, cancel_futures=True)


def shutdown_pool() -> None:
    """Stop the grading worker processes (also registered atexit). The next grading call starts a new pool."""
    with _POOL_LOCK:
        _shutdown_locked(kill=False)


atexit.register(shutdown_pool)


def grading_stats() -> dict[str, int]:
    """Counters since import / the last reset: graded answers, math-verify calls, timeouts, pool restarts."""
    return dict(_STATS)


def reset_grading_stats() -> None:
    for key in _STATS:
        _STATS[key] = 0


def _gold_string(gold: str | int | float) -> str:
    if gold is None:
        raise ValueError("gold answer is None")
    s = normalize_answer(gold)
    if not s:
        raise ValueError(f"empty gold answer: {gold!r}")
    return s


def grade_batch(
    responses: Sequence[str],
    golds: Sequence[str | int | float],
    timeout: float = 5.0,
    max_workers: int | None = None,
    *,
    require_boxed: bool = False,
) -> list[bool]:
    """Grade each response against its gold answer (see the module docstring). Never raises on a bad answer.

    `timeout` is per answer (seconds of math-verify work). `max_workers=None` uses min(4, cpu_count); 0 grades in
    this process (SIGALRM deadline only when called from the main thread), which is handy for debugging.
    """
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    results = [False] * len(responses)
    pending: list[tuple[int, str, str]] = []  # (index, pred, gold) that need math-verify
    for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
        raw = extract_answer(response, require_boxed=require_boxed)
        if raw is None:
            continue
        pred, gold_s = normalize_answer(raw), _gold_string(gold)
        if not pred:
            continue
        verdict = _quick_verdict(pred, gold_s)
        if verdict is None:
            # math-verify gets the un-normalized prediction: normalization may drop meaning it can use.
            pending.append((i, raw, str(gold)))
        else:
            results[i] = verdict
    _STATS["graded"] += len(responses)
    if not pending:
        return results
    _STATS["math_verify_calls"] += len(pending)

    workers = _default_workers() if max_workers is None else max_workers
    tasks = [(pred, _gold_for_verify(gold), timeout) for _, pred, gold in pending]
    if workers <= 0:
        outcomes = [_verify_with_deadline(*task) for task in tasks]
    else:
        outcomes = _run_pool(_verify_with_deadline, tasks, timeout, workers)
    for (i, _, _), (ok, timed_out) in zip(pending, outcomes, strict=True):
        results[i] = ok
        _STATS["timeouts"] += int(timed_out)
    return results


def _run_pool(fn, tasks: list[tuple], timeout: float, workers: int) -> list[tuple[bool, bool]]:
    """Run `fn(*task) -> (ok, timed_out)` for each task on the shared pool; a task that never answers (or whose
    worker dies) gives (False, True), and the pool is killed so the next call starts a healthy one."""
    outcomes: list[tuple[bool, bool]] = [(False, True)] * len(tasks)
    with _POOL_LOCK:
        pool, fresh = _get_pool(workers)
        futures = {pool.submit(fn, *task): k for k, task in enumerate(tasks)}
        # Worst case every task uses its whole alarm budget and one hung worker leaves the others to do the rest.
        waves = math.ceil(len(tasks) / max(1, workers - 1))
        budget = waves * (timeout + 1.0) + _BACKSTOP_SLACK_S + (_STARTUP_SLACK_S if fresh else 0.0)
        done, not_done = cf.wait(futures, timeout=budget)
        broken = bool(not_done)
        for fut in done:
            try:
                outcomes[futures[fut]] = fut.result()
            except Exception:  # a worker died (e.g. OOM / BrokenProcessPool): that answer is wrong, the batch goes on
                broken = True
        if broken:
            _STATS["pool_restarts"] += 1
            _shutdown_locked(kill=True)
    return outcomes


def _gold_for_verify(gold: str) -> str:
    """Gold as LaTeX for math-verify: unwrap a box / `$`, and write integral floats (27.0) as integers."""
    s = gold.strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.strip("$ ")
    try:
        f = float(s)
    except ValueError:
        return s
    return str(int(f)) if f.is_integer() and "e" not in s.lower() else s


def grade(
    response: str,
    gold: str | int | float,
    timeout: float = 5.0,
    *,
    require_boxed: bool = False,
    max_workers: int | None = None,
) -> bool:
    """True if the answer in `response` is equivalent to `gold` (see the module docstring for the policy)."""
    return grade_batch([response], [gold], timeout=timeout, max_workers=max_workers, require_boxed=require_boxed)[0]


def _wait_for_pool_ready(max_workers: int | None = None, timeout: float = 120.0) -> float:
    """Start the pool and wait until a worker answers; returns seconds taken. For benchmarks and tests."""
    t0 = time.perf_counter()
    workers = _default_workers() if max_workers is None else max_workers
    with _POOL_LOCK:
        pool, _ = _get_pool(workers)
        pool.submit(_verify_with_deadline, "1", "1", 5.0).result(timeout=timeout)
    return time.perf_counter() - t0
