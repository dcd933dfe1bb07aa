"""Sampled evaluation: k completions per problem with the jitted sampler, graded on the host.

Reports avg@k (mean pass@1) with its standard error over problems, the unbiased pass@k, mean length and
truncation rate, and writes a per-problem table (JSONL with completions, and CSV). `task_eval` is one graded
evaluation of a task's eval problems with a run's `eval.*` settings, as the trainer and `opd-jax eval` run it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh

from opd_jax.config.schema import ExperimentConfig
from opd_jax.data.task import EvalProblem, Task, pad_prompts
from opd_jax.errors import DataError
from opd_jax.eval.batch import batch_granule, eval_batch_size
from opd_jax.sampling import SamplingParams, make_sampler


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
    counts: dict[str, int] = field(default_factory=dict)  # prompts skipped / truncated, rows without an answer

    def summary(self) -> dict:
        return {"eval_accuracy": self.avg_at_k, "eval_stderr": self.stderr, f"eval_pass@{self.k}": self.pass_at_k,
                "eval_mean_length": self.mean_length, "eval_truncation_rate": self.truncation_rate,
                "eval_problems": self.num_problems, "eval_k": self.k, **self.counts}


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
    shards: int = 1,
) -> EvalResult:
    """`sample_fn(params, tokens, mask, keys, sp, active) -> SampleOutput` (e.g. from `make_sampler`). Rows are the
    problems repeated k times. Row r samples with its own key, `fold_in(key, r)`, so a row's completion does not
    depend on the batch it lands in: two batch sizes give the same samples, up to the floating-point effects of
    another batch shape. A last, partial batch is padded with inactive rows (they finish at once, so the decode
    loop stops with the real rows), and its real rows are spread over the `shards` batch shards (the mesh's batch
    axes), so no chip holds only padding."""
    if not problems:
        raise ValueError("evaluation: no problems to evaluate")
    if batch_size % shards:
        raise ValueError(f"evaluation: batch_size={batch_size} must divide over {shards} batch shards")
    prompts = [p.prompt for p in problems for _ in range(k)]
    answers = [p.answer for p in problems for _ in range(k)]
    n = len(prompts)
    completions: list = [None] * n
    lengths, truncated = [0] * n, [False] * n
    row_keys = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))
    per_shard = batch_size // shards
    for start in range(0, n, batch_size):
        real = list(range(start, min(start + batch_size, n)))
        slots: list[int | None] = [None] * batch_size
        for q, r in enumerate(real):  # real row q of the batch goes to shard q % shards
            slots[(q % shards) * per_shard + q // shards] = r
        chunk = [prompts[r] if r is not None else prompts[real[0]] for r in slots]  # fixed batch shape: one compile
        ids = np.asarray([r if r is not None else n + i for i, r in enumerate(slots)], np.int32)
        active = np.asarray([r is not None for r in slots])
        tok, mask, _ = pad_prompts(chunk, max_prompt_len, truncate=truncate_prompts, pad_id=pad_id)
        out = jax.device_get(sample_fn(params, tok, mask, row_keys(key, ids), sampling, active))
        for i, r in enumerate(slots):
            if r is None:
                continue
            L = int(out.lengths[i])
            completions[r] = [int(t) for t in out.tokens[i, :L]]
            lengths[r] = L
            truncated[r] = bool(out.truncated[i])
    correct = grade_batch(completions, answers)
    rows = []
    per_problem = []
    for j, p in enumerate(problems):
        sl = slice(j * k, (j + 1) * k)
        c = int(sum(correct[sl]))
        per_problem.append(c / k)
        rows.append({
            "problem": j, "id": p.id, "text": p.text, "answer": p.answer, "correct": c, "k": k,
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


# ---- a run's evaluation ----------------------------------------------------------------------------------------
def make_eval_sampler(mdef, mesh: Mesh | None, cfg: ExperimentConfig, stop_token_ids: Sequence[int]) -> Callable:
    """The run's eval sampler: `fn((trainable, frozen), tokens, mask, key, sp) -> SampleOutput` with
    `eval.max_new_tokens`, the decode layout of `sampling.layout`, and replicated outputs so every process can
    read the samples back (a batch-sharded array would span other hosts' devices)."""
    return make_sampler(mdef, max_new_tokens=cfg.eval.max_new_tokens, stop_token_ids=stop_token_ids, mesh=mesh,
                        layout=cfg.sampling.layout, replicate_outputs=True, cast_weights=cfg.sampling.cast_weights,
                        segments=cfg.sampling.decode_segments)


def runs_eval(cfg: ExperimentConfig) -> bool:
    """Whether a training run of `cfg` evaluates: it has eval problems (an `eval.source`, or a synthetic task's
    own) and a cadence (`eval.every`) or a source to evaluate at the end. The trainer and `opd-jax compile` read
    this one rule."""
    return bool((cfg.eval.source or cfg.data.source.startswith("synthetic:")) and (cfg.eval.every or cfg.eval.source))


def eval_sampling_params(cfg: ExperimentConfig) -> SamplingParams:
    e = cfg.eval
    return SamplingParams.create(e.temperature, e.top_k, e.top_p, greedy=e.temperature <= 0)


def drop_duplicates(problems: list[EvalProblem]) -> tuple[list[EvalProblem], list[EvalProblem]]:
    """(problems with each one once, in order; the dropped repeats). A problem repeats one seen before when it has
    the same source id (a JSONL `id` field), or, for problems without one, the same text and answer."""
    seen: set = set()
    keep, dropped = [], []
    for p in problems:
        key = ("id", p.id) if p.id else ("text", p.text, p.answer)
        if key in seen:
            dropped.append(p)
        else:
            seen.add(key)
            keep.append(p)
    return keep, dropped


def task_eval(cfg: ExperimentConfig, task: Task, eval_fn: Callable, params, mesh: Mesh, *, step: int,
              out_dir: str | None = None, tag: str = "eval") -> EvalResult | None:
    """Sample `eval.k` completions for each of the task's eval problems (the first `eval.num_problems`), grade
    them, and (process 0, when `out_dir` is given) write `<out_dir>/<tag>.{jsonl,csv}` and `<tag>_summary.json`.
    The key depends only on the seed and `step`, so re-evaluating a checkpoint reproduces its numbers.
    None when the task has no eval problems."""
    c = cfg
    problems, duplicates = drop_duplicates(task.eval_problems())
    if duplicates and jax.process_index() == 0:
        print(f"eval: {len(duplicates)} duplicate problem(s) dropped (a problem counts once; same id, or the same text "
              f"and answer), e.g. id {duplicates[0].id!r}")
    # the training rule for prompts over sampling.max_prompt_len: skip and count, or (truncate_prompts) keep and
    # count (text tasks cut them already, template kept: `TextTask.fit_prompt`; others are left-truncated here)
    counts = {f"eval_{k}": v for k, v in getattr(task, "eval_counts", {}).items()}
    counts["eval_duplicates_dropped"] = len(duplicates)
    long = [p for p in problems if len(p.prompt) > c.sampling.max_prompt_len]
    if long and not c.sampling.truncate_prompts:
        problems = [p for p in problems if len(p.prompt) <= c.sampling.max_prompt_len]
    key = "eval_prompts_truncated" if c.sampling.truncate_prompts else "eval_prompts_skipped"
    counts[key] = counts.get(key, 0) + len(long)
    if c.eval.num_problems:
        problems = problems[: c.eval.num_problems]
    if not problems:
        if counts.get("eval_prompts_skipped"):
            raise DataError(f"every eval problem was skipped: {counts['eval_prompts_skipped']} prompts are longer "
                            f"than sampling.max_prompt_len={c.sampling.max_prompt_len} (raise it, or set "
                            "sampling.truncate_prompts=true)")
        return None
    batch = eval_batch_size(c, mesh, len(problems) * c.eval.k, eval_fn=eval_fn, params=params)
    result = evaluate(
        eval_fn, params, problems, k=c.eval.k, grade_batch=task.grade_batch, decode=task.decode,
        max_prompt_len=c.sampling.max_prompt_len, sampling=eval_sampling_params(c),
        key=jax.random.fold_in(jax.random.key(c.seed + 7), int(step)), batch_size=batch, pad_id=task.pad_id,
        truncate_prompts=c.sampling.truncate_prompts, shards=batch_granule(mesh),
    )
    result.counts = {k: v for k, v in counts.items() if v}
    if out_dir is not None and jax.process_index() == 0:
        write_eval(result, out_dir, name=tag)
    return result
