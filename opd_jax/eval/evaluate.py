"""Sampled evaluation: k completions per problem with the jitted sampler, graded on the host.

Reports avg@k (mean pass@1) with its standard error over problems, the unbiased pass@k, mean length and
truncation rate, and writes a per-problem table (JSONL with completions, and CSV).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np
from etils import epath

from opd_jax.sampling import SamplingParams, pad_prompts
from opd_jax.tasks import EvalProblem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@dataclass
class EvalResult:
    avg_at_k: float
    stderr: float
    pass_at_k: float
    k: int
    num_problems: int
    mean_length: float
    truncation_rate: float
    rows: list[dict]

    def summary(self) -> dict:
        return {"eval_accuracy": self.avg_at_k, "eval_stderr": self.stderr, f"eval_pass@{self.k}": self.pass_at_k,
                "eval_mean_length": self.mean_length, "eval_truncation_rate": self.truncation_rate,
                "eval_problems": self.num_problems, "eval_k": self.k}


def evaluate(
    sample_fn: Callable,
    params,
    problems: list[EvalProblem],
    *,
    k: int,
    grade_batch: Callable[[list[list[int]], list[str]], list[bool]],
    decode: Callable[[list[int]], str],
    max_prompt_len: int,
    sampling: SamplingParams,
    key: jax.Array,
    batch_size: int = 64,
    pad_id: int = 0,
    truncate_prompts: bool = False,
) -> EvalResult:
    """`sample_fn(params, tokens, mask, key, sp) -> SampleOutput` (e.g. from `make_sampler`). Rows are the
    problems repeated k times; each batch gets its own key, so no two samples share randomness."""
    if not problems:
        raise ValueError("evaluation: no problems to evaluate")
    prompts = [p.prompt for p in problems for _ in range(k)]
    answers = [p.answer for p in problems for _ in range(k)]
    completions, lengths, truncated = [], [], []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start: start + batch_size]
        n_real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n_real)  # fixed batch shape: one compile
        tok, mask, _ = pad_prompts(chunk, max_prompt_len, truncate=truncate_prompts, pad_id=pad_id)
        out = jax.device_get(sample_fn(params, tok, mask, jax.random.fold_in(key, b), sampling))
        for i in range(n_real):
            L = int(out.lengths[i])
            completions.append([int(t) for t in out.tokens[i, :L]])
            lengths.append(L)
            truncated.append(bool(out.truncated[i]))
    correct = grade_batch(completions, answers)
    rows = []
    per_problem = []
    for j, p in enumerate(problems):
        sl = slice(j * k, (j + 1) * k)
        c = int(sum(correct[sl]))
        per_problem.append(c / k)
        rows.append({
            "problem": j, "text": p.text, "answer": p.answer, "correct": c, "k": k,
            "pass@1": c / k, f"pass@{k}": pass_at_k(k, c, k),
            "mean_length": float(np.mean(lengths[sl])), "truncated": int(sum(truncated[sl])),
            "completions": [decode(t) for t in completions[sl]],
        })
    acc = np.asarray(per_problem)
    stderr = float(acc.std(ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else 0.0
    return EvalResult(
        avg_at_k=float(acc.mean()), stderr=stderr, pass_at_k=float(np.mean([r[f"pass@{k}"] for r in rows])),
        k=k, num_problems=len(problems), mean_length=float(np.mean(lengths)),
        truncation_rate=float(np.mean(truncated)), rows=rows,
    )


def write_eval(result: EvalResult, out_dir: str, name: str = "eval") -> dict[str, str]:
    """Write `<name>.jsonl` (with completions), `<name>.csv` and `<name>_summary.json`; returns the paths."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": out / f"{name}.jsonl", "csv": out / f"{name}.csv", "summary": out / f"{name}_summary.json"}
    with paths["jsonl"].open("w") as f:
        for r in result.rows:
            f.write(json.dumps(r) + "\n")
    with paths["csv"].open("w") as f:
        cols = [c for c in result.rows[0] if c != "completions"]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(result.rows)
    paths["summary"].write_text(json.dumps(result.summary(), indent=2))
    return {k: str(v) for k, v in paths.items()}
