"""`opd-jax demo`: on-policy distillation next to RL, same steps, on a laptop CPU.

On-policy distillation (OPD): the student samples its own answers and the teacher scores every token of them, so
each token gets a grade (its reverse KL against the teacher) where RL gets one reward per answer.

The published protocol, on chains of 12 steps modulo 7 (12 uncertain digits an answer; issue #22's best case for
OPD, `experiments/opd_chains/lengths.py`):
1. A base student that leaves long chains mostly unsolved, and the teacher: RL from that base to its plateau (200
   steps). Both ship with the package (`opd_jax.miniature.protocol`; `--fresh` trains them and the pair they start
   from: about 10 minutes on 2 cores).
2. From the same base, `--steps` steps of RL (exact-answer reward, groups of 4 samples) and as many steps of OPD
   (the RL policy as the teacher), on the same prompts, each at the rate `lengths.py`'s validation sweep chose.
3. Before and after, on held-out test problems no training stream ever contains: accuracy (sampled at T=1, and
   greedy) with 95% intervals, and the per-token KL of each student against the teacher on its own samples.

The 4-6 step comparison with SFT lives in `python -m experiments.opd_chains.run_all` (OPD and SFT on fresh teacher
samples gain about as much there).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from opd_jax.config import ExperimentConfig, apply_overrides
from opd_jax.miniature import setup

# What lengths.py's validation sweep chose at 12 steps (experiments/opd_chains/results/lengths/chosen_L12.json; a
# test keeps these equal to it): RL lr 1e-4; OPD lr 3e-4 with the per-token KL clipped to 5 nats (`loss.kl_clip`).
# A --protocol with another length (tests) runs at these same rates.
RL_LR = 1e-4
OPD_LR = 3e-4
OPD_KL_CLIP = 5.0
DEMO_TEST_PROBLEMS = 512
DEMO_STEPS = 30  # RL's curve is still low there, OPD's near 0.8 (lengths.py's 12-step seed-0 curves)
# RL steps / OPD steps to 80% of RL's gain, seed means, from experiments/opd_chains/results/lengths/lengths.json
# (a test keeps these equal to that file)
LENGTHS_RATIO_80 = {4: 0.69, 8: 1.20, 12: 3.39}
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


def measure_config(base_cfg: ExperimentConfig, length: int, base: str, teacher: str, steps: int, run_dir: str,
                   method: str = "opd") -> ExperimentConfig:
    """The config of one arm (`method` 'rl' or 'opd') from `base` on chains of `length` steps, graded on
    `DEMO_TEST_PROBLEMS` held-out problems; its teacher slot is the RL teacher either way, so the KL is always
    measured against it (RL's training reads no teacher)."""
    from opd_jax.miniature.protocol import run_overrides, source

    lr = RL_LR if method == "rl" else OPD_LR
    ov = run_overrides(base_cfg, method, length=length, lr=lr, seed=0, steps=steps, base=base,
                       teacher=None if method == "rl" else teacher, run_dir=run_dir,
                       eval_source=source(length, test=DEMO_TEST_PROBLEMS, val=16),
                       kl_clip=OPD_KL_CLIP if method == "opd" else 0.0)
    c = apply_overrides(copy.deepcopy(base_cfg), ov)
    c.optim.warmup_steps = min(5, steps // 4)
    c.checkpoint.every = 0
    return c


def run_method(method: str, c: ExperimentConfig, length: int, teacher: str) -> dict:
    """`c.steps` steps of RL or OPD (`c`, from `measure_config`) from the base on the prompt stream of
    `lengths.py`'s seed 0 at this length (`lengths_<length>`; the RL teacher was trained on it too, as in the
    experiment), so both arms are the first steps of that seed's committed curves; returns the measurements after,
    with the KL against the RL teacher."""
    from opd_jax.miniature.protocol import train_run

    t0 = time.time()
    train_run(c, f"lengths_{length}", 0)
    train_s = time.time() - t0
    m = copy.deepcopy(c)
    m.teachers[0].model.hf_path = teacher
    out = measure_point(m, "final", run_dir=c.run_dir)
    out["train_s"] = train_s
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opd-jax demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fresh", action="store_true", help="train the teacher, the student, the base and the RL teacher "
                                                        "anew (about 10 min on 2 cores) instead of the shipped ones")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="RL steps, and as many OPD steps")
    p.add_argument("--run-dir", default="runs/opd_chains/demo", help="the demo's directory, replaced by a rerun")
    p.add_argument("--recipe", default="{}", help="JSON of prepare.Recipe fields (how the pair is made)")
    p.add_argument("--protocol", default="{}", help='JSON {"base": {BaseRecipe fields}, "teacher": {TeacherRecipe '
                                                    'fields}} (how the base and the RL teacher are made)')
    p.add_argument("overrides", nargs="*", help="config overrides of the miniature's base config (tests: tiny models)")
    a = p.parse_args(argv)
    # every argument is checked before the previous demo's directory is replaced
    if a.steps < 1:
        p.error(f"argument --steps: must be >= 1 (RL steps, and as many OPD steps), got {a.steps}")
    from opd_jax.miniature.prepare import Recipe
    from opd_jax.miniature.protocol import BaseRecipe, TeacherRecipe, check_recipes, prepare_protocol

    try:
        recipe = Recipe(**json.loads(a.recipe))
    except (ValueError, TypeError) as e:  # bad JSON, an unknown field, a field of the wrong kind
        p.error(f"argument --recipe: {e}")
    try:
        proto = json.loads(a.protocol)
        if not isinstance(proto, dict) or set(proto) - {"base", "teacher"}:
            raise ValueError(f"expected an object with 'base' and/or 'teacher', got {a.protocol}")
        base_recipe, teacher_recipe = BaseRecipe(**proto.get("base", {})), TeacherRecipe(**proto.get("teacher", {}))
        check_recipes(base_recipe, teacher_recipe)
    except (ValueError, TypeError) as e:
        p.error(f"argument --protocol: {e}")
    setup.quiet_jax()
    t_start = time.time()
    run_dir = os.path.abspath(a.run_dir)  # orbax wants absolute local checkpoint paths
    base_cfg = setup.base_config(a.overrides)
    claim_run_dir(run_dir)
    print(f"opd-jax demo: model cache {setup.cache_root()}, runs under {run_dir}")
    pp = prepare_protocol(base_cfg, recipe, base_recipe, teacher_recipe, fresh=a.fresh, test=DEMO_TEST_PROBLEMS)
    prep_s = time.time() - t_start
    length = teacher_recipe.length
    print(f"measuring the base student on chains of {length} steps ...", flush=True)
    t_measure = time.time()
    before = measure_point(measure_config(base_cfg, length, pp.base, pp.teacher, a.steps, run_dir), "before",
                           run_dir=os.path.join(run_dir, "before"), hf_path=pp.base)
    before_s = time.time() - t_measure
    arms = {}
    for method, lr in (("rl", RL_LR), ("opd", OPD_LR)):
        c = measure_config(base_cfg, length, pp.base, pp.teacher, a.steps, os.path.join(run_dir, method), method)
        what = "exact-answer reward" if method == "rl" else "reverse KL against the RL teacher, every token"
        clip = f", per-token KL clipped to {OPD_KL_CLIP:g} nats" if method == "opd" and OPD_KL_CLIP else ""
        print(f"{method.upper()}: {a.steps} steps x {c.groups_per_batch} prompts x {c.group_size} samples ({what}), "
              f"lr {lr:g}{clip} ...", flush=True)
        arms[method] = run_method(method, c, length, pp.teacher)
    total = time.time() - t_start
    summary = {"teacher": pp.info["teacher"], "base_info": pp.info["base"], "before": before, **arms,
               "steps": a.steps, "length": length, "rl_lr": RL_LR, "opd_lr": OPD_LR, "opd_kl_clip": OPD_KL_CLIP,
               "prepare_s": prep_s,
               "before_s": before_s, "total_s": total, "teacher_dir": pp.teacher, "base_dir": pp.base,
               "run_dir": run_dir,
               "recipes": {"base": dataclasses.asdict(base_recipe), "teacher": dataclasses.asdict(teacher_recipe)}}
    with open(os.path.join(run_dir, "demo_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(report(summary, base_cfg))
    return 0


def _gain_share(after: float, before: float, teacher: float) -> str:
    gap = teacher - before
    return f"{(after - before) / gap:.0%}" if gap > 0 else "n/a"


def report(s: dict, cfg: ExperimentConfig) -> str:
    """The demo's before/after table and its reading, in plain words."""
    b, r, o = s["before"], s["rl"], s["opd"]
    t = s["teacher"]["test"]
    n, length, steps = b["t1"]["problems"], s["length"], s["steps"]
    sm = cfg.student
    lines = [
        "",
        "==== opd-jax demo: on-policy distillation next to RL, same steps ====",
        "OPD: the student samples its own answers and the teacher scores every token of them (per-token reverse KL);",
        "RL gets one reward per answer. Both start from the same base student and see the same prompts.",
        f"Task: chains of {length} steps modulo 7 with a written scratchpad (one uncertain digit a step), e.g.",
        "  3a+4b*2c-6d+5= -> a3+40b0*20c0-61d1+56#6   (4 steps shown)",
        f"Held-out test: {n} problems that no training stream contains (checked for every row).",
        f"Student ({sm.num_layers} layers, hidden {sm.hidden_size}): the base, SFT on chains of "
        f"1-{s['recipes']['base']['longest']} steps.",
        f"Teacher: the same base after {s['recipes']['teacher']['steps']} RL steps (the published protocol: the "
        "teacher is the RL policy).",
        "",
        f"  {'':28s}{'accuracy, sampled (T=1)':>26s}{'accuracy, greedy':>24s}{'KL to teacher':>16s}",
        f"  {'teacher (RL, ' + str(s['recipes']['teacher']['steps']) + ' steps)':28s}{_fmt(t['t1']):>26s}"
        f"{_fmt(t['greedy']):>24s}{'0':>13s}",
    ]
    for label, x in (("base student", b), (f"after {steps} RL steps", r), (f"after {steps} OPD steps", o)):
        lines.append(f"  {label:28s}{_fmt(x['t1']):>26s}{_fmt(x['greedy']):>24s}{x['kl']['kl_exact']:>13.3f}")
    lines += ["", "  (accuracy: share of held-out problems with the right final answer, with a 95% interval;",
              "   KL: nats per token of KL(student || teacher), on the student's own samples of those problems)", ""]
    b1, r1, o1, t1 = b["t1"]["accuracy"], r["t1"]["accuracy"], o["t1"]["accuracy"], t["t1"]["accuracy"]
    apart = o["t1"]["ci_low"] > r["t1"]["ci_high"] or o["t1"]["ci_high"] < r["t1"]["ci_low"]
    if apart and o1 > r1:
        verdict = (f"In {steps} steps OPD closed {_gain_share(o1, b1, t1)} of the gap to the teacher (T=1 {b1:.0%} -> "
                   f"{o1:.0%}), RL {_gain_share(r1, b1, t1)} ({b1:.0%} -> {r1:.0%}): OPD learned faster.")
    elif apart:
        verdict = (f"In {steps} steps RL went further than OPD (T=1 {b1:.0%} -> {r1:.0%} vs {o1:.0%}): OPD did NOT "
                   "learn faster here.")
    else:
        verdict = (f"In {steps} steps OPD and RL ended within the noise of this test set (T=1 {o1:.0%} vs {r1:.0%}, "
                   f"from {b1:.0%}): no clear difference.")
    lines += [verdict,
              f"KL to the teacher, {b['kl']['kl_exact']:.3f} nats/token before: {o['kl']['kl_exact']:.3f} after OPD, "
              f"{r['kl']['kl_exact']:.3f} after RL (which never reads the teacher).",
              "Across lengths (experiments/opd_chains/README.md), RL/OPD steps to 80% of RL's gain: "
              + ", ".join(f"{v:.1f}x at {k} steps" for k, v in LENGTHS_RATIO_80.items())
              + ": the gap grows with the uncertain tokens per answer.",
              f"Took {s['total_s']:.0f}s: {s['prepare_s']:.0f}s getting the models, {s.get('before_s', 0):.0f}s "
              f"measuring the base, RL trained {r['train_s']:.0f}s and OPD {o['train_s']:.0f}s, the rest measuring "
              f"after. Details: {s['run_dir']}/demo_summary.json"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
