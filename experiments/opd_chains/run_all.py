"""Regenerate the whole OPD-claims miniature: the cached teacher and student, the diagnostics, the capacity check,
the learning-rate sweeps (chosen on the validation split), three seeds of every method at its chosen rate, RL run
long, single-prompt OPD, the recovery experiment, the negative control's overlap numbers, then the report.

Then issue #22's stages: RL vs OPD across episode lengths (`lengths.py`) and SFT's data curves at 4-6 and at 12
steps (`sft_curve.py`).

    python -m experiments.opd_chains.run_all [--quick] [--reuse] [--workers N] [--results DIR] [--runs DIR]

`--reuse` keeps every run whose record is already in results/runs/ (resuming an interrupted run_all); without it
everything is retrained except the cached models (`--fresh` retrains those too: the shipped pair is copied into an
empty cache otherwise). The lengths and SFT-curve stages always keep the runs they have records of (they are
resumable by design; delete their records to rerun them). `--workers N` (default 2) runs N training runs side by
side, each in its own process (`jobs.py`); the first design's stages are one chain in one worker, the other stages'
runs queue beside it. `--quick` is a smoke run of the same code with tiny models and a few steps (it writes to a
scratch results dir by default and skips issue #22's stages). Every stage writes under `--results`
(default: the committed results/).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import time

from experiments.opd_chains import arms
from experiments.opd_chains.plan import PLAN, QUICK, Plan
from opd_jax.config import ExperimentConfig
from opd_jax.miniature import measure, setup
from opd_jax.miniature.prepare import Prepared, Recipe, grade_both, prepare, prepare_teacher, sft_config, train_teacher

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
TINY = ["student.hidden_size=32", "student.intermediate_size=64", "student.head_dim=8", "student.num_layers=1",
        "teachers.0.model.hidden_size=32", "teachers.0.model.intermediate_size=64", "teachers.0.model.head_dim=8",
        "teachers.0.model.num_layers=1"]
QUICK_RECIPE = Recipe(teacher_steps=30, student_examples=64, student_steps=10)


def dump(path: str, obj: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


class Runner:
    """Runs arms, or reuses their records (`--reuse`), and keeps them all."""

    def __init__(self, prep: Prepared, plan: Plan, results: str, runs: str, reuse: bool, overrides: list[str],
                 pool: list | None):
        self.prep, self.plan, self.results, self.runs, self.reuse = prep, plan, results, runs, reuse
        self.overrides, self.pool = overrides, pool
        self.records: dict[str, dict] = {}
        self.reused_s = 0.0  # measured wall time of the runs reused since the last `take_reused()`

    def spec(self, method: str, lr: float, seed: int, **kw) -> arms.ArmSpec:
        p = self.plan
        base = dict(method=method, lr=lr, seed=seed, steps=p.steps, eval_every=p.eval_every, warmup=p.warmup,
                    prompts=p.prompts, group_size=p.group_size, extra=list(self.overrides))
        base.update(kw)
        return arms.ArmSpec(**base)

    def run(self, spec: arms.ArmSpec) -> dict:
        path = os.path.join(self.results, "runs", f"{spec.name}.json")
        if self.reuse and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
            self.reused_s += rec["wall_s"]
            print(f"[{spec.name}] reused ({rec['wall_s']:.0f}s when it ran)")
        else:
            rec = arms.run_arm(spec, self.prep, self.runs, pool=self.pool if spec.method == "sft_fixed" else None)
            arms.copy_metrics(rec, self.runs, self.results)
        self.records[spec.name] = rec
        return rec

    def take_reused(self) -> float:
        s, self.reused_s = self.reused_s, 0.0
        return s


def student_pool(prep: Prepared, cfg: ExperimentConfig, recipe: Recipe) -> list:
    """The fixed teacher-written data set the student was mid-trained on, regenerated exactly (same stream, key)."""
    import jax

    from opd_jax.baselines.sft import teacher_sft_examples
    from opd_jax.data import build_task
    from opd_jax.data.chains import assert_held_out, stream_position
    from opd_jax.mesh import make_mesh
    from opd_jax.sampling import SamplingParams
    from opd_jax.train_state import load_model

    c = copy.deepcopy(cfg)
    mesh = make_mesh(c.mesh)
    teacher = load_model(c.teachers[0].model, seed=0, mesh=mesh)
    task = build_task(c)
    task.restore({"position": stream_position("student_pool", recipe.seed)})
    task.issued = []
    rows = teacher_sft_examples(teacher, task, recipe.student_examples, SamplingParams.create(1.0),
                                max_new_tokens=c.sampling.max_new_tokens, max_prompt_len=c.sampling.max_prompt_len,
                                mesh=mesh, key=jax.random.key(recipe.seed + 123), batch_size=64, only_correct=True)
    assert_held_out(task, task.issued)
    return rows


def mean_last(curve: list[dict], split: str, n: int = 2) -> float:
    pts = [c[split]["accuracy"] for c in curve[-n:]]
    return sum(pts) / len(pts)


def capacity_check(cfg: ExperimentConfig, plan: Plan, recipe: Recipe, runs: str, results: str, reuse: bool) -> dict:
    """The student's architecture trained like the teacher (from scratch, the teacher's data and steps): can it
    hold the task at the teacher's level?"""
    path = os.path.join(results, "capacity.json")
    if reuse and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    from pathlib import Path

    c = copy.deepcopy(cfg)
    c.teachers[0].model = copy.deepcopy(c.student)  # train_teacher trains teachers[0]: the student's shape
    c.teachers[0].model.hf_path = None
    r = dataclasses.replace(recipe, teacher_steps=plan.capacity_steps or recipe.teacher_steps)
    out_dir = Path(runs) / "capacity_student"
    work = os.path.join(runs, "capacity_work")
    info = train_teacher(c, r, out_dir, work)
    res = {**info, "steps": r.teacher_steps, "batch": r.teacher_batch, "lr": r.teacher_lr,
           "source": r.teacher_source, "test": grade_both(cfg, cfg.student, out_dir, work, "capacity")}
    res["errors_t1"] = capacity_errors(work)
    dump(path, res)
    return res


def capacity_errors(work: str) -> dict:
    """Error profile of the capacity model's T=1 test completions (`grade_both` wrote them under `work`)."""
    from experiments.opd_chains.analysis import error_profile

    return error_profile(arms.read_jsonl(os.path.join(work, "capacity", "eval", "capacity_t1.jsonl")))


def diagnostics(cfg: ExperimentConfig, prep: Prepared, runs: str, results: str) -> dict:
    """How teacher and student continue after an injected slip, and where the student's own errors are."""
    from experiments.opd_chains.analysis import error_profile

    c = copy.deepcopy(cfg)
    t_model, s_model = copy.deepcopy(c.teachers[0].model), copy.deepcopy(c.student)
    out = {"probe_teacher": measure.correction_probe(c, t_model), "probe_student": measure.correction_probe(c, s_model)}
    for name, hf in (("student", prep.student), ("teacher", prep.teacher)):
        model = c.student if name == "student" else t_model
        cc = copy.deepcopy(c)
        cc.student = copy.deepcopy(model)
        _, rows = measure.grade(cc, temperature=1.0, split="test", name=f"diag_{name}", hf_path=hf,
                                run_dir=os.path.join(runs, f"diag_{name}"))
        out[f"errors_{name}_t1"] = error_profile(rows)
    dump(os.path.join(results, "diagnostics.json"), out)
    return out


def recovery(cfg: ExperimentConfig, prep: Prepared, plan: Plan, lr: dict, runner: Runner, runs: str, results: str,
             reuse: bool) -> dict:
    """Mid-train the teacher (the strong 'original model') on new facts, then win the chains skill back with OPD
    against its own pre-mid-training weights, next to SFT on that model's samples with the same steps."""
    from pathlib import Path

    from opd_jax.baselines.sft import SFTTrainer
    from opd_jax.data import build_task
    from opd_jax.data.chains import assert_held_out, stream_position
    from opd_jax.data.synthetic import FactsTask
    from opd_jax.miniature.prepare import export

    path = os.path.join(results, "recovery.json")
    if reuse and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    t_model = copy.deepcopy(cfg.teachers[0].model)
    t_model.hf_path = prep.teacher
    facts_src = f"synthetic:facts:{plan.recovery_facts}"

    def grade_point(hf: str, name: str) -> dict:
        c = copy.deepcopy(cfg)
        c.student = copy.deepcopy(t_model)
        c.student.hf_path = hf
        out = grade_both(c, c.student, Path(hf), os.path.join(runs, "recovery_eval"), name)
        f = copy.deepcopy(c)
        f.data.source = f.eval.source = facts_src
        for label, temp in (("facts_greedy", 0.0), ("facts_t1", 1.0)):
            out[label], _ = measure.grade(f, temperature=temp, name=f"{name}_{label}", hf_path=hf,
                                          run_dir=os.path.join(runs, "recovery_eval", name))
        return out

    before = grade_point(prep.teacher, "before")
    out = {"facts": plan.recovery_facts, "midtrain_steps": plan.recovery_midtrain_steps,
           "midtrain_lr": plan.recovery_midtrain_lr, "old_fraction": plan.recovery_old_fraction,
           "seeds": list(plan.recovery_seeds), "before": before, "per_seed": []}
    for seed in plan.recovery_seeds:
        # mid-training: facts, with a share of the chains data the model was trained on (reference + corrections);
        # the facts (`@123=` -> `#512`) share no prompt with the chains skill, so what OPD on chains does to them
        # is forgetting or keeping, not relearning
        tag = "" if seed == 0 and len(plan.recovery_seeds) == 1 else f"_s{seed}"
        c = sft_config(cfg, t_model, steps=plan.recovery_midtrain_steps, batch=32, lr=plan.recovery_midtrain_lr,
                       run_dir=os.path.join(runs, f"recovery_midtrain{tag}"), seed=seed,
                       source=plan.recipe.teacher_source)
        chains_task = build_task(c)
        chains_task.restore({"position": stream_position("recovery_midtrain", seed)})
        chains_task.issued = []
        facts = FactsTask(seed=0, num_facts=plan.recovery_facts)  # the same new knowledge for every seed
        n = plan.recovery_midtrain_steps * 32
        n_old = int(round(n * plan.recovery_old_fraction))
        rows = facts.sft_examples(n - n_old) + chains_task.sft_examples(n_old)
        random.Random(seed).shuffle(rows)
        assert_held_out(chains_task, chains_task.issued)
        mid = SFTTrainer(c, chains_task, rows)
        mid.run()
        mid_dir = Path(runs) / f"recovery_midtrained{tag}"
        export(mid, mid_dir)
        one = {"seed": seed, "after_midtrain": grade_point(str(mid_dir), f"after_midtrain{tag}")}
        for method in ("opd", "sft_fresh"):
            spec = runner.spec(method, lr[method], seed, steps=plan.recovery_steps, tag=f"recovery_{method}{tag}",
                               stream=f"recovery_{method}", teacher=prep.teacher, student=str(mid_dir),
                               extra=[*runner.overrides, *[f"teachers.0.model.{k}={v}" for k, v in _shape(t_model)],
                                      *[f"student.{k}={v}" for k, v in _shape(t_model)]])
            rec = runner.run(spec)
            hf = os.path.join(runs, spec.name, "export")
            _export_run(cfg, spec, rec, prep, hf, t_model)
            one[f"after_{method}"] = grade_point(hf, f"after_{method}{tag}")
            one[f"after_{method}"]["lr"] = spec.lr
        out["per_seed"].append(one)
    # each point over the seeds: mean accuracy with a t interval over seeds (the seed spread), per-seed values kept
    for point in ("after_midtrain", "after_opd", "after_sft_fresh"):
        out[point] = {}
        for kind in ("t1", "greedy", "facts_greedy", "facts_t1"):
            vals = [one[point][kind]["accuracy"] for one in out["per_seed"]]
            m, lo, hi = measure.mean_ci(vals)
            out[point][kind] = {"accuracy": m, "ci_low": lo, "ci_high": hi, "values": vals}
    dump(path, out)
    return out


def keep_training_metrics(prep: Prepared, runs: str, results: str, clean_dir: str | None) -> None:
    """Per-step metrics of the runs that are not arms (teacher, student, clean teacher, capacity check, recovery
    mid-training) into results/runs/."""
    import shutil

    srcs = {"prepare_teacher": prep.teacher + ".metrics.jsonl", "prepare_student": prep.student + ".metrics.jsonl",
            "capacity_student": os.path.join(runs, "capacity_work", "teacher", "metrics.jsonl"),
            "recovery_midtrain": os.path.join(runs, "recovery_midtrain", "metrics.jsonl")}
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        if name.startswith("recovery_midtrain_s"):  # one per recovery seed
            srcs[name] = os.path.join(runs, name, "metrics.jsonl")
    if clean_dir:
        srcs["prepare_teacher_clean"] = clean_dir + ".metrics.jsonl"
    for name, src in srcs.items():
        if os.path.exists(src):
            shutil.copy(src, os.path.join(results, "runs", f"{name}.metrics.jsonl"))
        else:
            print(f"[metrics] {name}: {src} not found (trained before metrics were kept?)")


def _shape(m) -> list[tuple[str, object]]:
    return [(k, getattr(m, k)) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                          "num_kv_heads", "head_dim", "rope_theta")]


def _export_run(cfg, spec, rec, prep, hf_dir: str, model_cfg) -> None:
    """The final weights of a run as an HF dir (for grading it on another task)."""
    from opd_jax.checkpoint import load_run_model
    from opd_jax.mesh import make_mesh
    from opd_jax.models.hf_io import export_hf

    m = copy.deepcopy(model_cfg)
    m.hf_path = spec.student
    model, _ = load_run_model(m, os.path.join(os.path.dirname(hf_dir)), seed=0, mesh=make_mesh(cfg.mesh))
    if os.path.exists(hf_dir):
        import shutil

        shutil.rmtree(hf_dir)
    export_hf(model.trainable, model.cfg, hf_dir, dtype="float32")


def single_prompt_spec(runner: Runner, plan: Plan, source: str, lr: float, seed: int, steps: int,
                       samples: int) -> arms.ArmSpec:
    """OPD on single prompt `seed + 1` (distinct per seed, every operation used) x `samples` a step for `steps`."""
    return runner.spec("opd", lr, seed, prompts=1, group_size=samples, steps=steps,
                       eval_every=plan.single_prompt_eval_every, warmup=min(plan.warmup, steps // 4),
                       source=f"{source}:single={seed + 1}", stream="single_prompt",
                       tag=f"single_prompt_{steps}x{samples}_lr{lr:g}_s{seed}")


def rerun_stage(name: str, prefix: str, plan: Plan, prep: Prepared, cfg: ExperimentConfig, results: str, runs: str,
                overrides: list[str], stage) -> int:
    """`--only single|recovery`: one stage again at the learning rates of the committed summary.json. Its old
    records (names starting with `prefix`) that the rerun does not rewrite are removed (their runs are in git
    history); summary.json's run list and stage time are updated; then the report."""
    summary_path = os.path.join(results, "summary.json")
    with open(summary_path, encoding="utf-8") as f:
        summary = json.load(f)
    runner = Runner(prep, plan, results, runs, False, overrides, None)
    old = [n for n in summary["runs"] if n.startswith(prefix)]
    t0 = time.time()
    if name == "single":
        lr = summary["best_lr"]["opd"]
        for steps, samples in plan.single_prompt_shapes:
            for seed in plan.single_prompt_seeds:
                runner.run(single_prompt_spec(runner, plan, cfg.data.source, lr, seed, steps, samples))
    else:
        recovery(cfg, prep, plan, summary["best_lr"], runner, runs, results, reuse=False)
    for n in old:
        if n not in runner.records:
            for ext in (".json", ".metrics.jsonl"):
                path = os.path.join(results, "runs", n + ext)
                if os.path.exists(path):
                    os.remove(path)
    stage("single_prompt" if name == "single" else "recovery", t0)
    with open(os.path.join(results, "timing.json"), encoding="utf-8") as f:
        summary["stage_s"] = json.load(f)["stage_s"]
    summary["runs"] = sorted([n for n in summary["runs"] if n not in old] + list(runner.records))
    summary["plan"] = dataclasses.asdict(plan)
    dump(summary_path, summary)
    from experiments.opd_chains.report import main as report_main

    return report_main(["--results", results])


def classic_stages(a: argparse.Namespace, plan: Plan, recipe: Recipe, prep: Prepared, base: ExperimentConfig,
                   cfg: ExperimentConfig, results: str, runs: str, overrides: list[str],
                   stage_s: dict[str, float]) -> dict:
    """The miniature's first design, in order (one job: each stage needs the rates the sweeps chose): diagnostics,
    the capacity check, the fixed data set, the rate sweeps and seeds of the four methods, RL run long, single-prompt
    OPD, the control, recovery, the negative control's numbers. Returns the summary's parts and `stage_s` updated
    with the stages measured here (a stage reused from earlier records keeps its earlier time)."""
    runner_ref: list[Runner] = []

    def stage(name: str, t0: float, reused: bool = False) -> None:
        took = time.time() - t0 + (runner_ref[0].take_reused() if runner_ref else 0.0)
        if not (reused and name in stage_s):
            stage_s[name] = took
        print(f"== {name}: {stage_s[name]:.0f}s{' (reused; as measured when it ran)' if reused else ''}", flush=True)

    t0 = time.time()
    setting = {"teacher": prep.info["teacher"], "student": prep.info["student"],
               "models": {"teacher": dict(_shape(cfg.teachers[0].model)), "student": dict(_shape(cfg.student))},
               "task": cfg.data.source, "diagnostics": diagnostics(cfg, prep, runs, results)}
    stage("diagnostics", t0)
    if "capacity" not in a.skip:
        t0 = time.time()
        reused = a.reuse and os.path.exists(os.path.join(results, "capacity.json"))
        setting["capacity"] = capacity_check(cfg, plan, recipe, runs, results, a.reuse)
        stage("capacity", t0, reused)
    dump(os.path.join(results, "setting.json"), setting)

    t0 = time.time()
    pool = student_pool(prep, cfg, recipe)
    runner = Runner(prep, plan, results, runs, a.reuse, overrides, pool)
    runner_ref.append(runner)
    stage("fixed data set", t0)
    # learning-rate sweeps on the validation split (seed `sweep_seed`), then all seeds at the chosen rate
    t0 = time.time()
    best: dict[str, float] = {}
    sweep: dict[str, dict] = {}
    for method in arms.METHODS:
        scores = {}
        for lr in plan.lrs[method]:
            rec = runner.run(runner.spec(method, lr, plan.sweep_seed))
            scores[lr] = mean_last(rec["curve"], "val")
        best[method] = max(scores, key=lambda k: scores[k])
        sweep[method] = {"val_score": {str(k): v for k, v in scores.items()}, "best_lr": best[method]}
    stage("sweeps", t0)
    t0 = time.time()
    for method in arms.METHODS:
        for seed in plan.seeds:
            runner.run(runner.spec(method, best[method], seed))
    stage("seeds", t0)
    if "rl_long" not in a.skip:
        t0 = time.time()
        runner.run(runner.spec("rl", best["rl"], plan.sweep_seed, steps=plan.rl_long_steps,
                               eval_every=plan.rl_long_eval_every, tag=f"rl_long_lr{best['rl']:g}_s{plan.sweep_seed}"))
        stage("rl_long", t0)
    if "single" not in a.skip:
        t0 = time.time()
        for steps, samples in plan.single_prompt_shapes:
            for seed in plan.single_prompt_seeds:
                runner.run(single_prompt_spec(runner, plan, cfg.data.source, best["opd"], seed, steps, samples))
        stage("single_prompt", t0)
    clean_dir = None
    if "control" not in a.skip:  # OPD against a teacher trained on clean solutions: it never saw a correction
        t0 = time.time()
        clean_dir, clean_info = prepare_teacher(base, dataclasses.replace(recipe, teacher_source=cfg.data.source),
                                                name="teacher_clean")
        setting["teacher_clean"] = {**clean_info, "probe": measure.correction_probe(
            cfg, dataclasses.replace(copy.deepcopy(cfg.teachers[0].model), hf_path=clean_dir))}
        dump(os.path.join(results, "setting.json"), setting)
        before = len(runner.records)
        for seed in plan.seeds:
            runner.run(runner.spec("opd", best["opd"], seed, teacher=clean_dir, stream="opd",
                                   tag=f"opd_clean_teacher_lr{best['opd']:g}_s{seed}"))
        stage("control", t0, reused=not clean_info["trained_now"] and runner.reused_s > 0
              and len(runner.records) - before == len(plan.seeds))
    rec_out = None
    if "recovery" not in a.skip:
        t0 = time.time()
        reused = a.reuse and os.path.exists(os.path.join(results, "recovery.json"))
        rec_out = recovery(cfg, prep, plan, best, runner, runs, results, a.reuse)
        stage("recovery", t0, reused)
    keep_training_metrics(prep, runs, results, clean_dir if "control" not in a.skip else None)
    t0 = time.time()
    from experiments.opd_chains.negative_control import overlap_numbers

    dump(os.path.join(results, "negative_control.json"), overlap_numbers())
    stage("negative control", t0)
    return {"sweep": sweep, "best_lr": best, "runs": sorted(runner.records), "recovery": rec_out is not None,
            "stage_s": stage_s}


def timed(name: str, fn, *args) -> float:
    """Run `fn(*args)`; its wall time in seconds."""
    t0 = time.time()
    fn(*args)
    took = time.time() - t0
    print(f"== {name}: {took:.0f}s", flush=True)
    return took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, a few steps")
    p.add_argument("--reuse", action="store_true", help="keep runs whose records exist in results/runs/")
    p.add_argument("--fresh", action="store_true", help="retrain the cached teacher and student")
    p.add_argument("--results", default=None)
    p.add_argument("--runs", default=None)
    p.add_argument("--workers", type=int, default=2,
                   help="training runs side by side, each in its own process (default 2, this machine's cores; "
                        "1: all in this process). The results do not depend on it")
    p.add_argument("--skip", nargs="*", default=[],
                   help="stages to skip: capacity recovery single rl_long control lengths sft_curve sft_curve_L12")
    p.add_argument("--only", choices=["single", "recovery"], default=None,
                   help="run one stage again at the learning rates of the committed summary.json, replace its "
                        "records, then the report (the other stages' records stay as they are)")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error(f"--workers {a.workers}: must be at least 1")
    plan = QUICK if a.quick else PLAN
    overrides = TINY if a.quick else []
    recipe = QUICK_RECIPE if a.quick else plan.recipe
    plan = dataclasses.replace(plan, recipe=recipe)
    results = os.path.abspath(a.results or (os.path.join("runs", "opd_chains", "quick_results") if a.quick
                                            else RESULTS))
    runs = os.path.abspath(a.runs or os.path.join("runs", "opd_chains", "quick" if a.quick else "full"))
    # every stage (and every worker process) writes under `results`: lengths/, sft_curve*/ included
    os.environ["OPD_CHAINS_RESULTS"] = results
    setup.quiet_jax()
    os.makedirs(os.path.join(results, "runs"), exist_ok=True)
    t_start = time.time()
    # Stage times: measured here, or, for work reused from an earlier invocation (`--reuse`), as measured then (runs
    # carry their own wall time). Stages overlap (`--workers`), so the headline is `run_all_wall_s`: the wall time
    # of the last invocation that reused nothing.
    timing_path = os.path.join(results, "timing.json")
    timing: dict = {}
    if (a.reuse or a.only) and os.path.exists(timing_path):
        with open(timing_path, encoding="utf-8") as f:
            timing = json.load(f)
    stage_s: dict[str, float] = dict(timing.get("stage_s", {}))

    t0 = time.time()
    base = setup.base_config(overrides)
    prep = prepare(base, recipe, fresh=a.fresh)
    cfg = setup.base_config([*overrides, *prep.overrides()])
    if prep.info["trained_now"] or "prepare" not in stage_s:
        stage_s["prepare"] = time.time() - t0
    if a.only:
        def stage(name: str, t0: float) -> None:
            stage_s[name] = time.time() - t0
            dump(timing_path, {**timing, "stage_s": stage_s})

        return rerun_stage(a.only, {"single": "single_prompt_", "recovery": "recovery_"}[a.only], plan, prep, cfg,
                           results, runs, overrides, stage)
    # issue #22's stages: RL vs OPD across episode lengths, SFT's data curves (each resumable from its records;
    # a --quick run skips them)
    from pathlib import Path

    from experiments.opd_chains import lengths as lengths_mod
    from experiments.opd_chains import sft_curve as sft_curve_mod
    from experiments.opd_chains.jobs import Jobs, wait_all

    # name -> (module, plan, how to run it with a `Jobs`)
    later = {"lengths": (lengths_mod, lengths_mod.PLAN, lambda j: lengths_mod.run_all(
                 lengths_mod.PLAN, Path(runs) / "lengths", overrides, j)),
             "sft_curve": (sft_curve_mod, sft_curve_mod.PLAN, lambda j: sft_curve_mod.run_curve(
                 sft_curve_mod.PLAN, Path(runs) / "sft_curve", j)),
             "sft_curve_L12": (sft_curve_mod, sft_curve_mod.PLAN_L12, lambda j: sft_curve_mod.run_curve(
                 sft_curve_mod.PLAN_L12, Path(runs) / "sft_curve_L12", j))}
    later = {k: v for k, v in later.items() if k not in a.skip and not a.quick}
    reused_before = {k: mod.all_recorded(pl) for k, (mod, pl, _) in later.items()}
    with Jobs(a.workers) as jobs:
        # the first design's stages are one chain in one worker, started first (the longest); the other stages'
        # runs queue beside it
        classic = jobs.start(jobs.call, classic_stages, a, plan, recipe, prep, base, cfg, results, runs, overrides,
                             stage_s)
        others = {k: jobs.start(timed, k, go, jobs) for k, (_, _, go) in later.items()}
        wait_all([classic, *others.values()])
    out = classic.result()
    stage_s.update(out.pop("stage_s"))
    for k, (mod, pl, _) in later.items():
        # a stage whose runs were all recorded already: its time as measured when they ran
        stage_s[k] = mod.recorded_wall_s(pl) if reused_before[k] else others[k].result()
    if "lengths" in later:
        lengths_mod.report(lengths_mod.PLAN)
    for k in ("sft_curve", "sft_curve_L12"):
        if k in later:
            sft_curve_mod.report(later[k][1])
    wall = time.time() - t_start
    if not a.reuse or "run_all_wall_s" not in timing:  # a --reuse invocation keeps the fresh run's wall time
        timing.update(run_all_wall_s=wall if not a.reuse else None, workers=a.workers,
                      measured=time.strftime("%Y-%m-%d"), pair_trained_now=prep.info["trained_now"])
    timing["stage_s"] = stage_s
    dump(timing_path, timing)
    summary = {"plan": dataclasses.asdict(plan), **out, "stage_s": stage_s, "wall_s": timing["run_all_wall_s"],
               "this_invocation_s": wall, "quick": a.quick}
    dump(os.path.join(results, "summary.json"), summary)
    from experiments.opd_chains.report import main as report_main

    return report_main(["--results", results])


if __name__ == "__main__":
    raise SystemExit(main())
