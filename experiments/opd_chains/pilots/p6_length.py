"""Pilot 6 (issue #22): the RL-vs-OPD steps ratio across episode lengths under the published protocol, one seed and
one learning rate per method: a check that the design can show the effect, not a verdict.

Protocol (the blog's): a base student; RL from the base, on chains of length L, gives the teacher; OPD from the same
base distils that RL policy on the same prompts; steps to 50%, 80% and 90% of RL's gain are counted on both curves
(evals every 5 steps on 1,024 held-out test problems, T=1), and the ratio RL steps / OPD steps is bracketed by the
eval cadence (`experiments.opd_chains.ratios`).

Base: the shipped student (trained on chains of 4-6 steps, labels a-f), then SFT on clean reference solutions of
chains of 1-16 steps (`base_steps`), so that per-step accuracy leaves long chains mostly unsolved.

    python -m experiments.opd_chains.pilots.p6_length base 300
    python -m experiments.opd_chains.pilots.p6_length length 4 --rl-steps 100 --opd-steps 100
    python -m experiments.opd_chains.pilots.p6_length summary

Every stage appends its record to `pilots/log.jsonl` (tag "p6_*") and keeps its runs under $PILOT_ROOT
(/tmp/pilot_len).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from opd_jax.miniature.setup import base_config, quiet_jax

ROOT = Path(os.environ.get("PILOT_ROOT", "/tmp/pilot_len"))
LOG = Path(os.environ.get("PILOT_LOG", str(Path(__file__).with_name("log.jsonl"))))
MOD = 7
STUDENT_SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "rope_theta")


def source(length: int, lo: int | None = None) -> str:
    return f"synthetic:chains:{lo or length}:{length}:mod={MOD}:test=1024:val=256"


def lengths_overrides(length: int) -> list[str]:
    """Prompt and completion budgets of chains of `length` steps: '<bos>' + start + 3 per step + '=', and 5 per
    step + '#d' + '<eos>', with room for a few corrections, rounded up to 8."""
    up = lambda n: -(-n // 8) * 8  # noqa: E731
    prompt, new = up(3 * length + 3), up(5 * length + 3 + 8)
    return [f"sampling.max_prompt_len={prompt}", f"sampling.max_new_tokens={new}", f"eval.max_new_tokens={new}"]


def log(rec: dict) -> None:
    print(json.dumps(rec)[:2000], flush=True)
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def curve(run_dir: Path) -> list[dict]:
    from opd_jax.miniature.measure import accuracy_of_rows

    out = []
    for p in (run_dir / "eval").glob("eval_step*.jsonl"):
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        out.append({"step": int(p.stem[len("eval_step"):]), **accuracy_of_rows(rows)})
    return sorted(out, key=lambda r: r["step"])


def stage_base(steps: int) -> None:
    from opd_jax.baselines.sft import SFTTrainer
    from opd_jax.data import build_task
    from opd_jax.data.chains import assert_held_out, stream_position
    from opd_jax.miniature import measure
    from opd_jax.miniature.prepare import Recipe, export, prepare, sft_config

    cfg = base_config([])
    prep = prepare(cfg, Recipe(), grade=False)
    student = base_config(prep.overrides()).student
    c = sft_config(base_config([*prep.overrides(), *lengths_overrides(16)]), student, steps=steps, batch=32, lr=3e-3,
                   run_dir=str(ROOT / "base_sft"), seed=0, source=source(16, 1))
    task = build_task(c)
    task.restore({"position": stream_position("p6_base", 0)})
    task.issued = []
    t0 = time.time()
    tr = SFTTrainer(c, task, task.sft_examples(steps * 32))
    tr.run()
    assert_held_out(task, task.issued)
    export(tr, ROOT / "base")
    acc = {}
    for length in (2, 4, 8, 16):
        e = base_config([*prep.overrides(), f"student.hf_path={ROOT / 'base'}", *lengths_overrides(length),
                         f"data.source={source(length)}", f"eval.source={source(length)}"])
        acc[length], _ = measure.grade(e, temperature=1.0, split="val", name=f"base_L{length}",
                                       hf_path=str(ROOT / "base"), run_dir=str(ROOT / "base_eval"))
    log({"tag": "p6_base", "steps": steps, "wall_s": time.time() - t0,
         "val_t1": {k: v["accuracy"] for k, v in acc.items()},
         "per_step_accuracy": {k: v["accuracy"] ** (1 / k) for k, v in acc.items()}})


def run(method: str, length: int, steps: int, lr: float, teacher: Path | None, seed: int = 0) -> tuple[dict, Path]:
    from opd_jax.data import build_task
    from opd_jax.data.chains import assert_held_out, stream_position
    from opd_jax.miniature.prepare import export

    run_dir = ROOT / f"{method}_L{length}_lr{lr:g}_s{seed}"
    base = ROOT / "base"
    student = base_config([]).student
    ov = [f"run_dir={run_dir}", "overwrite=true", f"steps={steps}", f"seed={seed}", f"student.hf_path={base}",
          *lengths_overrides(length), f"data.source={source(length)}", f"eval.source={source(length)}",
          "eval.split=test", "eval.every=5", "eval.temperature=1.0", f"optim.learning_rate={lr}",
          "optim.schedule=constant", "optim.warmup_steps=5", "groups_per_batch=16", "group_size=4",
          # the teacher slot holds the base (RL ignores it) or the RL policy (OPD): the student's shape either way
          f"teachers.0.model.hf_path={teacher or base}",
          *[f"teachers.0.model.{k}={getattr(student, k)}" for k in STUDENT_SHAPE]]
    if method == "rl":
        ov += ["algorithm=rl", "loss.kl_penalty_coef=0", "loss.task_reward_coef=1"]
    else:
        ov += ["algorithm=opd"]
    cfg = base_config(ov)
    task = build_task(cfg)
    task.restore({"position": stream_position(f"p6_{length}", seed)})  # RL and OPD see the same prompts
    task.issued = []
    t0 = time.time()
    if method == "rl":
        from opd_jax.baselines.rl import make_rl_trainer

        tr = make_rl_trainer(cfg, task)
    else:
        from opd_jax.trainer import Trainer

        tr = Trainer(cfg, task)
    tr.run()
    assert_held_out(task, task.issued)
    export(tr, run_dir / "export")
    rec = {"tag": f"p6_{method}", "length": length, "lr": lr, "steps": steps, "seed": seed,
           "wall_s": time.time() - t0, "curve": [{"step": c["step"], "mean": c["accuracy"]} for c in curve(run_dir)]}
    return rec, run_dir / "export"


def stage_length(length: int, rl_steps: int, opd_steps: int, rl_lr: float, opd_lr: float) -> None:
    rl, teacher = run("rl", length, rl_steps, rl_lr, None)
    log(rl)
    opd, _ = run("opd", length, opd_steps, opd_lr, teacher)
    log(opd)


def summary() -> dict:
    from experiments.opd_chains.ratios import ratio_rule, steps_bracket

    recs = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]
    rl = {r["length"]: r for r in recs if r["tag"] == "p6_rl"}  # the latest record per length
    opd = {r["length"]: r for r in recs if r["tag"] == "p6_opd"}
    out = {}
    for length in sorted(set(rl) & set(opd)):
        r, o = rl[length], opd[length]
        start = r["curve"][0]["mean"]
        final = sum(c["mean"] for c in r["curve"][-2:]) / 2  # RL's plateau: its last two evals
        row = {"base": start, "rl_final": final, "opd_final": o["curve"][-1]["mean"], "gain": final - start}
        for f in (0.5, 0.8, 0.9):
            target = start + f * (final - start)
            a = steps_bracket(o["curve"], target, every=5, steps=o["steps"])
            b = steps_bracket(r["curve"], target, every=5, steps=r["steps"])
            v = ratio_rule(a, b, 7.0)
            row[f"{f:.0%}"] = {"target": target, "opd": [a.lo, a.hi], "rl": [b.lo, b.hi],
                               "ratio": [v.ratio_lo, v.ratio_hi]}
        out[length] = row
    print(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    b = sub.add_parser("base")
    b.add_argument("steps", type=int)
    s = sub.add_parser("length")
    s.add_argument("length", type=int)
    s.add_argument("--rl-steps", type=int, default=100)
    s.add_argument("--opd-steps", type=int, default=100)
    s.add_argument("--rl-lr", type=float, default=1e-4)
    s.add_argument("--opd-lr", type=float, default=3e-4)
    sub.add_parser("summary")
    a = p.parse_args(argv)
    quiet_jax()
    if a.stage == "base":
        stage_base(a.steps)
    elif a.stage == "length":
        stage_length(a.length, a.rl_steps, a.opd_steps, a.rl_lr, a.opd_lr)
    else:
        summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
