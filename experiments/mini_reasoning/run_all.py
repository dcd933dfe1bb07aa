"""The comparison: from the same mid-trained student, continued SFT on teacher samples vs RL (GRPO, exact-match
reward in the program) vs OPD, each with several seeds; then `report.py` draws the table and plots.

    python -m experiments.mini_reasoning.run_all [--quick] [--seeds 0 1 2] [--steps 60] [--methods sft rl opd]
                                                 [--no-extras]

After the comparison (unless --no-extras): the single-prompt run (`single_prompt.py`) and the recovery experiment
(`recovery.py`), with their own results files next to the comparison's.

Every run writes runs/mini_reasoning/compare/<method>_s<seed>/ (metrics.jsonl, eval/); the curves the report
uses (step, accuracy, cumulative student and teacher FLOPs) go to experiments/mini_reasoning/results/curves.jsonl
and each run's metrics.jsonl is copied to results/runs/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time

from experiments.mini_reasoning import common

METHODS = ("sft", "rl", "opd")
SEED_STRIDE = 1_000_000  # each seed trains on its own slice of the prompt stream (the eval set stays fixed)


def method_config(method: str, prep_overrides: list[str], *, seed: int, steps: int, eval_every: int,
                  run_dir: str, extra: list[str] = ()):
    ov = [*prep_overrides, f"run_dir={run_dir}", f"steps={steps}", f"seed={seed}", f"eval.every={eval_every}",
          "overwrite=true", "logging.progress=false"]
    if method == "opd":
        ov += ["algorithm=opd"]
    elif method == "rl":  # pure GRPO: exact-match reward inside the program, no teacher term
        ov += ["algorithm=rl", "loss.kl_penalty_coef=0", "loss.task_reward_coef=1"]
    elif method == "sft":  # the same 32 sequences per step as OPD / RL, as one SFT batch
        ov += ["algorithm=sft"]
    else:
        raise ValueError(f"unknown method {method!r}")
    cfg = common.load("base", [*ov, *extra])
    if method == "sft":
        cfg.groups_per_batch, cfg.group_size = cfg.batch_size, 1
        cfg.teachers = cfg.teachers[:1]
    return cfg


def step_flops(method: str, cfg, teacher_cfg, keep_rate: float = 1.0) -> tuple[float, float]:
    """(student, teacher) FLOPs of one step, counted like the published comparison: SFT's teacher FLOPs are the
    sampling of its training data (divided by the fraction kept by rejection sampling); OPD's are scoring."""
    from opd_jax import flops
    from opd_jax.models.hf_io import load_hf_config

    s = load_hf_config(cfg.student.hf_path)
    t = load_hf_config(teacher_cfg.hf_path)
    B, P, N = cfg.batch_size, cfg.sampling.max_prompt_len, cfg.sampling.max_new_tokens
    if method == "opd":
        f = flops.opd_step_flops(s, t, B, P, N)
    elif method == "rl":
        f = flops.rl_step_flops(s, B, P, N)
    else:
        f = flops.sft_flops(s, B, P + N, teacher=t, prompt_len=P)
        return f["student_total"], f["teacher_total"] / max(keep_rate, 1e-6)
    return f["student_total"], f["teacher_total"]


def run_one(method: str, seed: int, prep, *, steps: int, eval_every: int, out_root: str,
            extra: list[str] = ()) -> dict:
    """Train one method/seed from the cached student; returns its curve rows."""
    import jax

    from opd_jax.data import build_task

    run_dir = os.path.join(out_root, f"{method}_s{seed}")
    cfg = method_config(method, prep.overrides(), seed=seed, steps=steps, eval_every=eval_every, run_dir=run_dir,
                        extra=extra)
    t_model = copy.deepcopy(cfg.teachers[0].model)
    task = build_task(cfg)
    task.restore({"position": (seed + 1) * SEED_STRIDE})
    t0 = time.time()
    keep = 1.0
    if method == "sft":
        from opd_jax.baselines.sft import SFTTrainer, teacher_sft_examples
        from opd_jax.mesh import make_mesh
        from opd_jax.sampling import SamplingParams
        from opd_jax.train_state import load_model

        mesh = make_mesh(cfg.mesh)
        teacher = load_model(t_model, seed=0, mesh=mesh)
        stats: dict = {}
        examples = teacher_sft_examples(
            teacher, task, steps * cfg.batch_size, SamplingParams.create(1.0, 0, 1.0, False),
            max_new_tokens=cfg.sampling.max_new_tokens, max_prompt_len=cfg.sampling.max_prompt_len, mesh=mesh,
            key=jax.random.key(seed + 1000), batch_size=64, stats=stats,
            only_correct=prep.info.get("recipe", {}).get("only_correct", True))
        keep = stats["kept"] / max(1, stats["sampled"])
        cfg.teachers = []
        h = SFTTrainer(cfg, task, examples).run()
    elif method == "rl":
        from opd_jax.baselines.rl import make_rl_trainer

        cfg.teachers = []
        h = make_rl_trainer(cfg, task).run()
    else:
        from opd_jax.trainer import Trainer

        h = Trainer(cfg, task).run()
    wall = time.time() - t0
    f_s, f_t = step_flops(method, cfg, t_model, keep)
    rows = []
    for step, acc in common.eval_curve(run_dir):
        rows.append({"method": method, "seed": seed, "step": step, "accuracy": acc, "student_flops": f_s * step,
                     "teacher_flops": f_t * step})
    for step, kl in common.metric_curve(run_dir, "teacher_kl"):
        rows.append({"method": method, "seed": seed, "step": step, "teacher_kl": kl})
    print(f"[{method} seed {seed}] accuracy {h['eval_start']['eval_accuracy']:.3f} -> "
          f"{h['eval_end']['eval_accuracy']:.3f} in {wall:.0f}s (sft keep rate {keep:.2f})", flush=True)
    return {"rows": rows, "wall_s": wall, "keep_rate": keep}


def kl_picture(prep, results: str, runs: str, overrides: list[str] = ()) -> str | None:
    """`opd-jax visualize` of the cached student (before any method) on a problem it gets wrong, against the
    teacher: results/kl_wrong_completion.html (+ .png with headless chromium when installed)."""
    from experiments.mini_reasoning.demo import first_wrong_problem, screenshot, write_kl_html

    start_eval = next((os.path.join(runs, d, "eval", "eval_step0.jsonl") for d in sorted(os.listdir(runs))
                       if os.path.exists(os.path.join(runs, d, "eval", "eval_step0.jsonl"))), None)
    prompt = first_wrong_problem(start_eval) if start_eval else None
    cfg = common.load("base", [*prep.overrides(), f"run_dir={os.path.join(runs, '_no_checkpoint')}", *overrides])
    html = os.path.join(results, "kl_wrong_completion.html")
    r = write_kl_html(cfg, html, prompt)
    print(f"per-token KL: {r['prompt']} -> {r['completion']!r} ({'correct' if r.get('correct') else 'wrong'}): "
          f"{html}")
    return screenshot(html, os.path.join(results, "kl_wrong_completion.png"))


def main(argv: list[str] | None = None) -> int:
    common.quiet_jax()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and seeds (a smoke run, minutes)")
    p.add_argument("--seeds", type=int, nargs="*", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--results", default=str(common.RESULTS_DIR))
    p.add_argument("--runs", default="runs/mini_reasoning/compare")
    p.add_argument("--target", type=float, default=None, help="accuracy target of the table (default: see report)")
    p.add_argument("--no-kl-picture", action="store_true", help="skip the per-token KL page of the student")
    p.add_argument("--no-extras", action="store_true", help="skip the single-prompt and recovery experiments")
    p.add_argument("--midtrain-steps", type=int, default=150, help="recovery: SFT steps on the new facts")
    p.add_argument("--recipe", default="{}", help="JSON of PrepRecipe fields (teacher/student preparation)")
    p.add_argument("overrides", nargs="*", help="config overrides for the preparation and every run")
    a = p.parse_args(argv)
    a.runs = os.path.abspath(a.runs)  # orbax wants absolute local checkpoint paths
    seeds = a.seeds if a.seeds is not None else ([0] if a.quick else [0, 1, 2])
    steps = a.steps or (10 if a.quick else 100)
    every = a.eval_every or max(1, steps // (2 if a.quick else 10))

    from experiments.mini_reasoning.prepare import PrepRecipe, prepare

    t_start = time.time()
    prep = prepare(common.load("base", a.overrides), PrepRecipe(**json.loads(a.recipe)))
    os.makedirs(os.path.join(a.results, "runs"), exist_ok=True)
    curves = os.path.join(a.results, "curves.jsonl")
    meta = {"student_accuracy": prep.info["student_accuracy"], "teacher_accuracy": prep.info["teacher_accuracy"],
            "steps": steps, "seeds": seeds, "eval_every": every,
            "eval_problems": common.load("base", a.overrides).eval.num_problems, "runs": {}, "prep": prep.info}
    with open(curves, "w", encoding="utf-8") as f:
        for method in a.methods:
            for seed in seeds:
                r = run_one(method, seed, prep, steps=steps, eval_every=every, out_root=a.runs, extra=a.overrides)
                for row in r["rows"]:
                    f.write(json.dumps(row) + "\n")
                f.flush()
                name = f"{method}_s{seed}"
                shutil.copy(os.path.join(a.runs, name, "metrics.jsonl"), os.path.join(a.results, "runs",
                                                                                      f"{name}.jsonl"))
                meta["runs"][name] = {"wall_s": r["wall_s"], "keep_rate": r["keep_rate"]}
    if not a.no_kl_picture:
        meta["kl_picture"] = kl_picture(prep, a.results, a.runs, a.overrides)
    with open(os.path.join(a.results, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    if not a.no_extras:
        from experiments.mini_reasoning import recovery, single_prompt

        common_args = ["--results", a.results, "--recipe", a.recipe]
        single_prompt.main([*common_args, "--steps", str(steps), "--runs", os.path.join(a.runs, "single_prompt"),
                            *a.overrides])
        recovery.main([*common_args, "--opd-steps", str(steps), "--runs", os.path.join(a.runs, "recovery"),
                       "--midtrain-steps", str(a.midtrain_steps), *a.overrides])
    meta["wall_s"] = time.time() - t_start
    with open(os.path.join(a.results, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    from experiments.mini_reasoning.report import main as report_main

    return report_main(["--results", a.results] + (["--target", str(a.target)] if a.target else []))


if __name__ == "__main__":
    raise SystemExit(main())
