"""The collapse of OPD far from the teacher, reproduced, and its controls (issue #26).

    python -m experiments.opd_collapse.controls [--only NAME,...] [--seeds 0,1,2] [--fresh]

The pair: the shipped miniature teacher, and the miniature student mid-trained for only 300 steps
(`Recipe(student_steps=300)`, test accuracy about 0.15 at T=1: far below the teacher's 0.98). Every control is 60 OPD
steps from that student at lr 3e-4 (5 warmup steps, then constant), 16 prompts x 4 samples a step, evaluated every 5
steps at T=1 on the 768 held-out problems (256 validation + 512 test), with one thing changed. Each run's metrics and
record go to `results/runs/`; a run whose record is there is reused unless `--fresh`. The per-token anatomy
(`anatomy.py`) of the reproduction is taken at steps 0, 20, 40 and 60. `results/summary.json` and
`results/controls.md` are rewritten from the records at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
RUNS = os.path.join("runs", "opd_collapse")
STUDENT_STEPS = 300  # the student far from the teacher: the shipped recipe's 600 steps halved
LR = 3e-4
STEPS = 60
EVAL_EVERY = 5
SEEDS = (0, 1, 2)
ANATOMY_STEPS = (0, 20, 40, 60)


@dataclass(frozen=True)
class Control:
    name: str
    what: str  # one line for the table
    extra: tuple[str, ...] = ()
    lr: float = LR
    clean_teacher: bool = False
    checkpoints: bool = False  # keep checkpoints every 10 steps (the anatomy reads them)
    seeds: tuple[int, ...] = field(default=SEEDS)
    steps: int = STEPS
    student_steps: int = STUDENT_STEPS  # the student's mid-training steps (600: the shipped student, near the teacher)


CONTROLS = (
    Control("reproduction", "as published: IS loss, sum, no clipping, discount 0", checkpoints=True),
    Control("clean_teacher", "a teacher trained on clean solutions (never saw '!')", clean_teacher=True),
    Control("token_mean", "loss.normalization=token_mean", ("loss.normalization=token_mean",)),
    Control("grad_clip_1", "optim.grad_clip=1.0 (global norm)", ("optim.grad_clip=1.0",)),
    Control("kl_clip_5", "loss.kl_clip=5 (per-token kl_t clipped to +-5 nats)", ("loss.kl_clip=5",)),
    Control("discount_1", "loss.discount=1.0 (each token charged the KL of the rest of its row)",
            ("loss.discount=1.0",)),
    Control("discount_0.9", "loss.discount=0.9", ("loss.discount=0.9",)),
    Control("lr_1e-4", "lr 1e-4", lr=1e-4),
    Control("lr_3e-5", "lr 3e-5", lr=3e-5),
    Control("lr_1e-3", "lr 1e-3", lr=1e-3),
    Control("full_reverse_kl", "loss.kind=reverse_kl (exact full-vocabulary reverse KL at the sampled states)",
            ("loss.kind=reverse_kl",)),
    Control("task_reward", "loss.task_reward_coef=1 (exact-match reward, group-normalized, added to -kl_t)",
            ("loss.task_reward_coef=1.0",)),
    # the direction of the KL (PREDICTIONS.md, addendum 2)
    Control("forward_kl", "loss.kind=forward_kl (exact full-vocabulary forward KL at the sampled states)",
            ("loss.kind=forward_kl",)),
    Control("jsd_0.5", "loss.kind=jsd, beta 0.5 (full vocabulary, at the sampled states)",
            ("loss.kind=jsd", "loss.beta=0.5")),
    # 150 steps: is the collapse absorbing, does a lower rate only delay it, does the discount keep holding?
    Control("reproduction_150", "as published, 150 steps", steps=150),
    Control("lr_1e-4_150", "lr 1e-4, 150 steps", lr=1e-4, steps=150),
    Control("discount_1_150", "loss.discount=1.0, 150 steps", ("loss.discount=1.0",), steps=150),
    Control("discount_0.9_150", "loss.discount=0.9, 150 steps", ("loss.discount=0.9",), steps=150),
    # does the mitigation cost anything near the teacher? (the shipped student; PREDICTIONS.md, addendum 3)
    Control("near_discount_0", "near the teacher (shipped student), discount 0", student_steps=600),
    Control("near_discount_0.9", "near the teacher, loss.discount=0.9", ("loss.discount=0.9",), student_steps=600),
    Control("near_discount_1", "near the teacher, loss.discount=1.0", ("loss.discount=1.0",), student_steps=600),
)


def collapse_verdict(trunc: list[float], acc0: float, acc_end: float) -> str:
    """'collapse' (training-rollout truncation >= 0.5 in any of the last 10 steps and the final test accuracy below
    half of step 0's), 'stable' (truncation <= 0.1 at every step), else 'partial' (PREDICTIONS.md)."""
    if max(trunc[-10:]) >= 0.5 and acc_end < 0.5 * acc0:
        return "collapse"
    if max(trunc) <= 0.1:
        return "stable"
    return "partial"


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize_run(rec: dict, metrics: list[dict]) -> dict:
    """One run's curve and verdict from its record and its metrics.jsonl rows."""
    train = [m for m in metrics if "truncation_rate" in m]
    trunc = [m["truncation_rate"] for m in train]
    curve = [(c["step"], c["test"]["accuracy"], c["test"]["with_correction"]) for c in rec["curve"]]
    acc0, acc_end = curve[0][1], curve[-1][1]
    kl = [m["teacher_kl"] for m in train]
    return {
        "name": rec["name"], "seed": rec["seed"], "steps": rec["steps"],
        "verdict": collapse_verdict(trunc, acc0, acc_end),
        "test_acc": {s: a for s, a, _ in curve}, "with_mark": {s: w for s, _, w in curve},
        "truncation": trunc, "mean_length": [m["mean_length"] for m in train], "teacher_kl": kl,
        "grad_norm": [m["grad_norm"] for m in train],
        "first_truncation_step": next((i + 1 for i, t in enumerate(trunc) if t >= 0.5), None),
        "kl_first5": sum(kl[:5]) / 5, "kl_last5": sum(kl[-5:]) / 5,
        "heldout_kl_exact": rec["kl_test"]["kl_exact"], "final_greedy": rec["final"]["greedy"]["test"]["accuracy"],
    }


def prepare_models(fresh: bool = False):
    """({student steps: the pair}, the clean teacher's HF dir): the shipped teacher with the far (300-step) and the
    shipped (600-step) student, and the clean-solutions teacher."""
    from opd_jax.miniature import setup
    from opd_jax.miniature.prepare import Recipe, prepare, prepare_teacher

    cfg = setup.base_config()
    recipe = Recipe(student_steps=STUDENT_STEPS)
    pairs = {n: prepare(cfg, Recipe(student_steps=n), fresh=fresh) for n in sorted({c.student_steps for c in CONTROLS})}
    clean_dir, _ = prepare_teacher(cfg, dataclasses.replace(recipe, teacher_source=setup.TASK), name="teacher_clean")
    return pairs, clean_dir


def run_control(ctl: Control, seed: int, pairs: dict, clean_dir: str, fresh: bool) -> dict:
    from experiments.opd_chains import arms

    name = f"{ctl.name}_s{seed}"
    path = os.path.join(RESULTS, "runs", f"{name}.json")
    if os.path.exists(path) and not fresh:
        with open(path, encoding="utf-8") as f:
            print(f"[{name}] reused")
            return json.load(f)
    extra = list(ctl.extra)
    if ctl.checkpoints:
        extra += ["checkpoint.every=10", "checkpoint.max_to_keep=10"]
    spec = arms.ArmSpec(method="opd", lr=ctl.lr, seed=seed, steps=ctl.steps, eval_every=EVAL_EVERY, tag=name,
                        stream="opd", teacher=clean_dir if ctl.clean_teacher else None, extra=extra)
    rec = arms.run_arm(spec, pairs[ctl.student_steps], RUNS)
    rec["control"] = ctl.name
    arms.copy_metrics(rec, RUNS, RESULTS)
    return rec


def anatomy_series(prep, seed: int = 0) -> dict:
    """The reproduction's per-token picture at ANATOMY_STEPS (its checkpoints), against the shipped teacher."""
    from experiments.opd_chains import arms
    from experiments.opd_collapse.anatomy import format_anatomy, token_anatomy
    from opd_jax.checkpoint import load_run_model
    from opd_jax.data import build_task
    from opd_jax.mesh import make_mesh
    from opd_jax.train_state import load_model

    name = f"reproduction_s{seed}"
    spec = arms.ArmSpec(method="opd", lr=LR, seed=seed, steps=STEPS, tag=name)
    cfg = arms.arm_config(spec, prep, os.path.abspath(os.path.join(RUNS, name)))
    mesh = make_mesh(cfg.mesh)
    task = build_task(cfg)
    teacher = load_model(cfg.teachers[0].model, seed=0, mesh=mesh)
    out = {}
    for step in ANATOMY_STEPS:
        if step == 0:
            student = load_model(cfg.student, seed=0, mesh=mesh)
        else:
            student, _ = load_run_model(cfg.student, cfg.run_dir, seed=0, mesh=mesh, step=step)
        out[step] = token_anatomy(student, teacher, task, n=256, max_new_tokens=cfg.sampling.max_new_tokens,
                                  max_prompt_len=cfg.sampling.max_prompt_len)
        print(f"== reproduction seed {seed}, step {step}\n{format_anatomy(out[step])}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated control names (default: all)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--fresh", action="store_true", help="rerun runs whose record exists")
    a = p.parse_args(argv)
    from opd_jax.miniature import setup

    setup.quiet_jax()
    t0 = time.time()
    pairs, clean_dir = prepare_models()
    only = set(filter(None, a.only.split(",")))
    unknown = only - {c.name for c in CONTROLS}
    if unknown:
        raise SystemExit(f"--only: unknown control(s) {sorted(unknown)}; known: {[c.name for c in CONTROLS]}")
    seeds = [int(s) for s in a.seeds.split(",")]
    for ctl in CONTROLS:
        if only and ctl.name not in only:
            continue
        for seed in seeds:
            if seed in ctl.seeds:
                run_control(ctl, seed, pairs, clean_dir, a.fresh)
    anatomy_path = os.path.join(RESULTS, "anatomy_reproduction_s0.json")
    if (not only or "reproduction" in only) and 0 in seeds and (a.fresh or not os.path.exists(anatomy_path)):
        with open(anatomy_path, "w", encoding="utf-8") as f:
            json.dump(anatomy_series(pairs[STUDENT_STEPS], 0), f, indent=1)
    write_summary()
    print(f"done in {time.time() - t0:.0f}s")
    return 0


def write_summary() -> None:
    """results/summary.json and results/controls.md from every record in results/runs/."""
    from opd_jax.miniature.measure import mean_ci

    runs_dir = os.path.join(RESULTS, "runs")
    rows = []
    for ctl in CONTROLS:
        runs = []
        for seed in ctl.seeds:
            path = os.path.join(runs_dir, f"{ctl.name}_s{seed}.json")
            if not os.path.exists(path):
                continue
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
            runs.append(summarize_run(rec, read_jsonl(os.path.join(runs_dir, f"{ctl.name}_s{seed}.metrics.jsonl"))))
        if runs:
            rows.append({"control": ctl.name, "what": ctl.what, "runs": runs})
    with open(os.path.join(RESULTS, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    lines = ["| control | verdicts (seeds) | test acc, step 0 -> last (mean [95% CI over seeds]) | max truncation, "
             "last 10 steps | teacher KL/token, first 5 -> last 5 steps | '!' in completions, last step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        runs = r["runs"]
        a0 = mean_ci([x["test_acc"][0] for x in runs])
        a1 = mean_ci([x["test_acc"][x["steps"]] for x in runs])
        tr = [max(x["truncation"][-10:]) for x in runs]
        lines.append(
            f"| {r['control']} ({r['what']}) | {', '.join(x['verdict'] for x in runs)} | {a0[0]:.3f} -> {a1[0]:.3f} "
            f"[{a1[1]:.3f}, {a1[2]:.3f}] | {', '.join(f'{t:.2f}' for t in tr)} | "
            f"{sum(x['kl_first5'] for x in runs) / len(runs):.2f} -> {sum(x['kl_last5'] for x in runs) / len(runs):.2f}"
            f" | {sum(x['with_mark'][x['steps']] for x in runs) / len(runs):.2f} |")
    with open(os.path.join(RESULTS, "controls.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
