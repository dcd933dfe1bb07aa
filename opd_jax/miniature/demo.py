"""`opd-jax demo`: on-policy distillation end to end on a laptop CPU, next to SFT with the same steps.

1. The teacher and the student: the pair shipped with the package (copied into the cache), or trained now with
   `--fresh` (`prepare`, 6-9 minutes on a 2-core CPU): a teacher that solves chains of modular steps and corrects
   slips, and a smaller student mid-trained on a limited set of the teacher's samples.
2. From that student, `--steps` steps of OPD (the student samples, the teacher scores the same tokens, the per-token
   reverse KL is the advantage) and, separately, the same number of SFT steps on fresh teacher samples (the same
   number of sequences per step).
3. Before and after, on held-out test problems no training stream ever contains: accuracy (sampled at T=1, and
   greedy) with 95% intervals, and the per-token reverse KL of the student against the teacher on its own samples.

The learning rates are the ones the miniature's validation sweep chose (experiments/opd_chains/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from opd_jax.config import ExperimentConfig
from opd_jax.miniature import setup
from opd_jax.miniature.prepare import Prepared

# The rates the validation sweep of experiments/opd_chains chose (results/summary.json, "best_lr": opd, sft_fresh).
OPD_LR = 3e-4
SFT_LR = 3e-4
DEMO_TEST_PROBLEMS = 512
MARKER = ".opd_jax_demo"  # marks a directory as the demo's own, so a rerun may replace it


def claim_run_dir(run_dir: str) -> None:
    """Make `run_dir` the demo's, empty: a directory a previous demo made (it holds `MARKER`) is replaced, so reruns
    leave no `.old` copies; any other non-empty directory raises RunDirError and is left as it is."""
    from opd_jax.errors import RunDirError

    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--run-dir {run_dir} is a file, not a directory", hint="pick another --run-dir")
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise RunDirError(f"--run-dir {run_dir} exists and is not a demo's directory (no {MARKER} in it); the demo "
                              "replaces only its own", hint="pick another --run-dir, or move that directory away")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("made by `opd-jax demo`; a rerun replaces this directory\n")


def _fmt(acc: dict) -> str:
    return f"{acc['accuracy']:.3f} [{acc['ci_low']:.2f}, {acc['ci_high']:.2f}]"


def measure_point(cfg: ExperimentConfig, name: str, *, run_dir: str | None = None, hf_path: str | None = None) -> dict:
    """Test accuracy at T=1 and greedy, and the held-out per-token KL on the T=1 samples."""
    from opd_jax.miniature.measure import grade, heldout_kl, summarize_eval

    _, rows = grade(cfg, temperature=1.0, split="test", name=f"{name}_t1", run_dir=run_dir, hf_path=hf_path)
    g, _ = grade(cfg, temperature=0.0, split="test", name=f"{name}_greedy", run_dir=run_dir, hf_path=hf_path)
    kl = heldout_kl(cfg, rows, run_dir=run_dir, hf_path=hf_path)
    return {"t1": summarize_eval(rows), "greedy": g, "kl": kl}


def grade_teacher(cfg: ExperimentConfig, run_dir: str) -> dict:
    """The teacher's test accuracy at T=1 and greedy."""
    import copy

    from opd_jax.miniature.measure import grade

    c = copy.deepcopy(cfg)
    c.student = copy.deepcopy(cfg.teachers[0].model)
    return {label: grade(c, temperature=t, split="test", name=f"teacher_{label}", run_dir=run_dir)[0]
            for label, t in (("t1", 1.0), ("greedy", 0.0))}


def run_method(method: str, cfg: ExperimentConfig, prep: Prepared, steps: int, lr: float, run_dir: str) -> dict:
    """`steps` steps of OPD or SFT (fresh teacher samples) from the cached student; returns the measurements."""
    import copy

    from opd_jax.data import build_task
    from opd_jax.data.chains import assert_held_out, stream_position

    c = copy.deepcopy(cfg)
    c.run_dir, c.steps, c.overwrite = run_dir, steps, True
    c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps = lr, "constant", min(5, steps // 4)
    c.eval.every = 0
    c.eval.source = ""  # evaluated after training (measure_point), not by the trainer
    task = build_task(c)
    task.restore({"position": stream_position(f"demo_{method}", 0)})
    task.issued = []
    t0 = time.time()
    if method == "opd":
        from opd_jax.trainer import Trainer

        c.algorithm = "opd"
        Trainer(c, task).run()
    else:
        import jax

        from opd_jax.baselines.sft import SFTTrainer, teacher_sft_examples
        from opd_jax.mesh import make_mesh
        from opd_jax.sampling import SamplingParams
        from opd_jax.train_state import load_model

        c.algorithm = "sft"
        c.groups_per_batch, c.group_size = cfg.batch_size, 1
        mesh = make_mesh(c.mesh)
        teacher = load_model(c.teachers[0].model, seed=0, mesh=mesh)
        rows = teacher_sft_examples(teacher, task, steps * c.batch_size, SamplingParams.create(1.0),
                                    max_new_tokens=c.sampling.max_new_tokens, max_prompt_len=c.sampling.max_prompt_len,
                                    mesh=mesh, key=jax.random.key(1000), batch_size=64, only_correct=True)
        SFTTrainer(c, task, rows).run()
    train_s = time.time() - t0
    assert_held_out(task, task.issued)
    out = measure_point(c, "final", run_dir=run_dir)
    out["train_s"] = train_s
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opd-jax demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fresh", action="store_true", help="train the teacher and student anew (6-9 min on 2 cores) "
                                                        "instead of using the shipped pair")
    p.add_argument("--steps", type=int, default=40, help="OPD steps (and SFT steps)")
    p.add_argument("--run-dir", default="runs/opd_chains/demo", help="the demo's directory, replaced by a rerun")
    p.add_argument("--recipe", default="{}", help="JSON of prepare.Recipe fields (how teacher and student are made)")
    p.add_argument("overrides", nargs="*", help="config overrides of the miniature's base config (tests: tiny models)")
    a = p.parse_args(argv)
    # every argument is checked before the previous demo's directory is replaced
    if a.steps < 1:
        p.error(f"argument --steps: must be >= 1 (OPD steps, and as many SFT steps), got {a.steps}")
    from opd_jax.miniature.prepare import Recipe, prepare

    try:
        recipe = Recipe(**json.loads(a.recipe))
    except (ValueError, TypeError) as e:  # bad JSON, an unknown field, a field of the wrong kind
        p.error(f"argument --recipe: {e}")
    setup.quiet_jax()
    t_start = time.time()
    run_dir = os.path.abspath(a.run_dir)  # orbax wants absolute local checkpoint paths
    base = setup.base_config(a.overrides)
    claim_run_dir(run_dir)
    print(f"opd-jax demo: model cache {setup.cache_root()}, runs under {run_dir}")
    prep = prepare(base, recipe, fresh=a.fresh, grade=False)  # graded below
    prep_s = time.time() - t_start
    cfg = setup.base_config([*a.overrides, *prep.overrides(), f"run_dir={run_dir}"])
    t_info = prep.info["teacher"].get("test") or grade_teacher(cfg, os.path.join(run_dir, "teacher"))
    print("measuring the student before training ...", flush=True)
    t_measure = time.time()
    before = measure_point(cfg, "before", run_dir=os.path.join(run_dir, "before"), hf_path=prep.student)
    before_s = time.time() - t_measure
    print(f"OPD: {a.steps} steps x {cfg.groups_per_batch} prompts x {cfg.group_size} samples, lr {OPD_LR:g} ...",
          flush=True)
    opd = run_method("opd", cfg, prep, a.steps, OPD_LR, os.path.join(run_dir, "opd"))
    print(f"SFT: {a.steps} steps x {cfg.batch_size} fresh teacher samples, lr {SFT_LR:g} ...", flush=True)
    sft = run_method("sft", cfg, prep, a.steps, SFT_LR, os.path.join(run_dir, "sft"))
    total = time.time() - t_start
    summary = {"teacher": t_info, "before": before, "opd": opd, "sft": sft, "steps": a.steps,
               "opd_lr": OPD_LR, "sft_lr": SFT_LR, "prepare_s": prep_s, "before_s": before_s, "total_s": total,
               "teacher_dir": prep.teacher, "student_dir": prep.student}
    with open(os.path.join(run_dir, "demo_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(report(summary, cfg))
    return 0


def report(s: dict, cfg: ExperimentConfig) -> str:
    """The demo's before/after table and its reading, in plain words."""
    b, o, f = s["before"], s["opd"], s["sft"]
    n = b["t1"]["problems"]
    lines = [
        "",
        "==== opd-jax demo: on-policy distillation on a CPU ====",
        "Task: chains of 4-6 steps modulo 7 with a written scratchpad, e.g. 3a+4b*2c-6d+5= -> a3+40b0*20c0-61d1+56#6",
        f"Held-out test: {n} problems that no training stream contains (checked for every row).",
    ]
    tm, sm = cfg.teachers[0].model, cfg.student
    if s.get("teacher"):
        t = s["teacher"]
        lines.append(f"Teacher ({tm.num_layers} layers, hidden {tm.hidden_size}): {_fmt(t['t1'])} sampled at T=1, "
                     f"{_fmt(t['greedy'])} greedy; it corrects slips ('b0*25!0': '!' then the right value).")
    lines += [
        f"Student ({sm.num_layers} layers, hidden {sm.hidden_size}), mid-trained on a limited set of teacher samples:",
        "",
        f"  {'':26s}{'accuracy, sampled (T=1)':>26s}{'accuracy, greedy':>24s}{'KL to teacher':>16s}",
    ]
    for label, r in (("before", b), (f"after {s['steps']} OPD steps", o), (f"after {s['steps']} SFT steps", f)):
        lines.append(f"  {label:26s}{_fmt(r['t1']):>26s}{_fmt(r['greedy']):>24s}{r['kl']['kl_exact']:>13.3f}")
    lines += ["", "  (accuracy: share of held-out problems with the right final answer, with a 95% interval;",
              "   KL: nats per token of KL(student || teacher), on the student's own samples of those problems)", ""]
    d_opd = o["t1"]["accuracy"] - b["t1"]["accuracy"]
    d_sft = f["t1"]["accuracy"] - b["t1"]["accuracy"]
    sig_opd = o["t1"]["ci_low"] > b["t1"]["ci_high"] or o["t1"]["ci_high"] < b["t1"]["ci_low"]
    if d_opd > 0 and sig_opd:
        verdict = (f"OPD raised the student's held-out accuracy from {b['t1']['accuracy']:.0%} to "
                   f"{o['t1']['accuracy']:.0%} (T=1) and cut its KL to the teacher from {b['kl']['kl_exact']:.3f} to "
                   f"{o['kl']['kl_exact']:.3f} nats/token.")
    elif d_opd > 0:
        verdict = (f"OPD moved held-out accuracy from {b['t1']['accuracy']:.0%} to {o['t1']['accuracy']:.0%} (T=1), "
                   "within the noise of this test set: no clear gain.")
    else:
        verdict = (f"OPD did NOT help here: held-out accuracy went from {b['t1']['accuracy']:.0%} to "
                   f"{o['t1']['accuracy']:.0%} (T=1).")
    overlap = not (o["t1"]["ci_low"] > f["t1"]["ci_high"] or o["t1"]["ci_high"] < f["t1"]["ci_low"])
    if overlap:
        cmp = "about as much as SFT (the difference is within the noise of this test set)"
    else:
        cmp = "more than SFT" if d_opd > d_sft else "less than SFT"
    lines += [verdict,
              f"SFT on fresh teacher samples, same steps and sequences per step, went from {b['t1']['accuracy']:.0%} "
              f"to {f['t1']['accuracy']:.0%}: OPD gained {cmp}.",
              f"Took {s['total_s']:.0f}s: {s['prepare_s']:.0f}s getting the teacher and student, "
              f"{s.get('before_s', 0):.0f}s measuring the student before, OPD trained {o['train_s']:.0f}s and SFT "
              f"{f['train_s']:.0f}s, the rest measuring after. Details: {cfg.run_dir}/demo_summary.json"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
