"""The old miniature (experiments/mini_reasoning) as a negative control: its eval-overlap flaw, recounted from its
own code. Pure Python (no models): which of its 256 eval problems occur in each of its training streams.

    python -m experiments.opd_chains.negative_control   # prints them; run_all writes results/negative_control.json

The streams, as experiments/mini_reasoning/{prepare,run_all}.py draw them with configs/mini_reasoning/base.yaml:
- teacher: `ArithmeticTask.sft_examples` rows 0 .. 1500*32 of the task's stream (seed 0);
- student: teacher samples on the prompts of the same stream from row 0 (4096 kept of about 4096/keep drawn);
- comparison arms, seed s: rows from (s+1) * 1,000,000 on: SFT draws 100 steps * 64 rows / keep, OPD and RL
  100 steps * 16 prompts.
"""

from __future__ import annotations

import itertools
import json

from opd_jax.data.synthetic import ArithmeticTask

OLD = {"num_ops": 2, "max_operand": 9, "eval_problems": 256, "teacher_rows": 1500 * 32, "student_examples": 4096,
       "steps": 100, "sft_rows_per_step": 64, "prompts_per_step": 16, "seed_stride": 1_000_000, "seeds": (0, 1, 2)}


def problem_space(num_ops: int, max_operand: int) -> int:
    """Distinct problems of `synthetic:arithmetic:num_ops:max_operand`: start 1..max, then per step '+'/'-' with
    1..max_operand or '*' with 1..9."""
    per_step = 2 * max_operand + 9
    return max_operand * per_step ** num_ops


def overlap_numbers(keep_rate: float = 0.9345794392523364) -> dict:
    """How many of the old eval problems each old training stream contains. `keep_rate`: the share of teacher
    samples rejection sampling kept (experiments/mini_reasoning/results/meta.json)."""
    o = OLD
    task = ArithmeticTask(seed=0, num_ops=o["num_ops"], max_operand=o["max_operand"], eval_problems=o["eval_problems"])
    eval_texts = [p.text for p in task.eval_problems()]
    distinct = set(eval_texts)

    def texts(start: int, n: int) -> set[str]:
        return {task.problem(i).expression for i in range(start, start + n)}

    teacher = texts(0, o["teacher_rows"])
    student = texts(0, int(round(o["student_examples"] / keep_rate)))
    out = {
        "problem_space": problem_space(o["num_ops"], o["max_operand"]),
        "eval_problems": len(eval_texts), "eval_distinct": len(distinct),
        "in_teacher_stream": len(distinct & teacher), "in_student_sft_prompts": len(distinct & student),
        "keep_rate": keep_rate, "arms": {},
    }
    for seed in o["seeds"]:
        start = (seed + 1) * o["seed_stride"]
        sft = texts(start, int(round(o["steps"] * o["sft_rows_per_step"] / keep_rate)))
        opd = texts(start, o["steps"] * o["prompts_per_step"])
        out["arms"][str(seed)] = {"sft_teacher_solutions": len(distinct & sft), "opd_rl_prompts": len(distinct & opd)}
    out["eval_in_any_training_stream"] = len(distinct & set(itertools.chain(teacher, student)))
    return out


def main() -> int:
    print(json.dumps(overlap_numbers(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
