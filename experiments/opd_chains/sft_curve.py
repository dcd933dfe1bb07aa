"""SFT's data curve (issue #22, deliverable 2, first part): held-out accuracy of the student trained by SFT on fixed
teacher-written sets of growing size, each with early stopping on validation, 2 seeds; does it have a log-linear
stretch?

The published 9x / ~30x FLOPs advantage of OPD over SFT comes from extrapolating SFT's log-linear data curve
(SFT-400K -> 60%, ~2M prompts to reach 70%; `../shared/docs/OPD_NOTES.md`). That comparison needs a stretch where
accuracy grows linearly in log(data); a threshold-shaped curve cannot show it. This measures the curve on the
miniature's task (chains of 4-6 steps mod 7) the way the student was made (`prepare.train_student`: the student
architecture from random weights, SFT on correct teacher samples at T=1, lr 3e-3 cosine, batch 32), for nested sets
(the first n rows of one seed's pool) and a fixed step budget; early stopping = the eval step with the best
validation accuracy, whose test accuracy is reported.

At 12 steps (`--length 12`, issue #22 deliverable 2 at a longer length): the published protocol's base student
and its RL teacher (`opd_jax.miniature.protocol`, the models `lengths.py` and the demo use): SFT from the base on
fixed sets of the RL teacher's samples with every step right (T=1, chains of 12 steps; `pool_reward='steps'`, so
no chain with a wrong step and a lucky final digit), sizes 16 to 8,192, the same recipe otherwise; records under
results/sft_curve_L12/.

    python -m experiments.opd_chains.sft_curve            # resumable: finished runs are kept
    python -m experiments.opd_chains.sft_curve --length 12
    python -m experiments.opd_chains.sft_curve --report [--length 12]

Records: results/sft_curve[_L12]/runs/<name>.json, results/sft_curve[_L12]/sft_curve.json and sft_curve.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.opd_chains.arms import eval_curve, results_root, write_json
from experiments.opd_chains.jobs import Jobs, wait_all
from opd_jax.miniature.measure import mean_ci
from opd_jax.miniature.setup import base_config, quiet_jax

RESULTS = results_root() / "sft_curve"
CHANCE = 1 / 7  # a random final digit mod 7


@dataclass(frozen=True)
class CurvePlan:
    sizes: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 600  # the student's recipe
    every: int = 100
    # 0: chains of 4-6 steps, the student's architecture from random weights, the pair's teacher writes the data;
    # L > 0: chains of L steps, from the protocol's base student, the protocol's RL teacher writes the data
    length: int = 0
    # what makes a teacher sample correct for the pool (`pool`): at 12 steps `steps`, so that no chain with a wrong
    # step and a lucky final digit is taught (a review finding on the first 12-step curve, which used `answer`)
    pool_reward: str = "answer"

    @property
    def results(self) -> Path:
        return RESULTS if not self.length else RESULTS.parent / f"sft_curve_L{self.length}"

    @property
    def stream(self) -> str:
        return "sft_curve" if not self.length else f"sft_curve_L{self.length}"


PLAN = CurvePlan()
PLAN_L12 = CurvePlan(sizes=(16, 32, 64, 128, 256, 1024, 8192), length=12, pool_reward="steps")
PLANS = {0: PLAN, 12: PLAN_L12}


def pool(cfg, teacher_dir: str, n: int, seed: int, stream: str = "sft_curve", reward: str = "answer") -> list:
    """`n` correct teacher samples (T=1) from the stream `<stream>/<seed>` (not the student's own pool). `reward`:
    what counts as correct, the chains task's `answer` (the final digit: a wrong chain can guess it, 1 in 7) or
    `steps` (every step's result and the answer right: no lucky guesses)."""
    import jax

    from opd_jax.baselines.sft import teacher_sft_examples
    from opd_jax.data import build_task
    from opd_jax.data.chains import assert_held_out, stream_position
    from opd_jax.mesh import make_mesh
    from opd_jax.sampling import SamplingParams
    from opd_jax.train_state import load_model

    mesh = make_mesh(cfg.mesh)
    t_cfg = copy.deepcopy(cfg.teachers[0].model)
    t_cfg.hf_path = teacher_dir
    teacher = load_model(t_cfg, seed=0, mesh=mesh)
    cfg = copy.deepcopy(cfg)
    if reward != "answer":
        cfg.data.source = f"{cfg.data.source}:reward={reward}"
    task = build_task(cfg)
    task.restore({"position": stream_position(stream, seed)})
    task.issued = []
    rows = teacher_sft_examples(teacher, task, n, SamplingParams.create(1.0),
                                max_new_tokens=cfg.sampling.max_new_tokens,
                                max_prompt_len=cfg.sampling.max_prompt_len, mesh=mesh,
                                key=jax.random.key(1000 + seed), batch_size=64, only_correct=True)
    assert_held_out(task, task.issued)
    return rows


def run_one(plan: CurvePlan, cfg, rows: list, size: int, seed: int, runs: Path) -> dict:
    from opd_jax.baselines.sft import SFTTrainer
    from opd_jax.data import build_task
    from opd_jax.miniature.prepare import Recipe, sft_config

    name = f"sft_n{size}_s{seed}"
    record = plan.results / "runs" / f"{name}.json"
    if record.exists():
        rec = json.loads(record.read_text())
        if rec.get("pool_reward", "answer") == plan.pool_reward:  # else: a record of another pool, rerun
            return rec
    model = copy.deepcopy(cfg.student)
    if not plan.length:
        model.hf_path = None  # from random weights, as the student was made (else: from the protocol's base)
    r = Recipe()
    c = sft_config(cfg, model, steps=plan.steps, batch=r.student_batch, lr=r.student_lr, run_dir=str(runs / name),
                   seed=seed)
    c.eval.every, c.eval.split, c.eval.temperature = plan.every, "val+test", 1.0
    t0 = time.time()
    SFTTrainer(c, build_task(c), rows[:size]).run()
    curve = eval_curve(str(runs / name))
    best = max(curve[1:], key=lambda c: (c["val"]["accuracy"], -c["step"]))  # early stopping on validation
    rec = {"name": name, "size": size, "seed": seed, "steps": plan.steps, "pool_reward": plan.pool_reward,
           "wall_s": time.time() - t0,
           "curve": curve, "best_step": best["step"], "test_at_best": best["test"]["accuracy"],
           "val_at_best": best["val"]["accuracy"]}
    write_json(record, rec)
    print(f"[{name}] best val at step {best['step']}: test T=1 {rec['test_at_best']:.3f}; {rec['wall_s']:.0f}s",
          flush=True)
    return rec


def all_recorded(plan: CurvePlan) -> bool:
    return all(_recorded(plan, n, seed) for n in plan.sizes for seed in plan.seeds)


def _recorded(plan: CurvePlan, size: int, seed: int) -> bool:
    path = plan.results / "runs" / f"sft_n{size}_s{seed}.json"
    return path.exists() and json.loads(path.read_text()).get("pool_reward", "answer") == plan.pool_reward


def recorded_wall_s(plan: CurvePlan) -> float:
    """The stage's time as measured: the wall time of every run of the plan, each recorded when it ran (the teacher
    samples of the pools are not in it: about a minute a seed)."""
    return sum(json.loads((plan.results / "runs" / f"sft_n{n}_s{seed}.json").read_text())["wall_s"]
               for n in plan.sizes for seed in plan.seeds if _recorded(plan, n, seed))


def fit_log_linear(points: list[tuple[int, float]]) -> dict:
    """Least squares acc = a + b * log2(n) over `points`: slope b per doubling, R^2."""
    xs = [math.log2(n) for n, _ in points]
    ys = [a for _, a in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss = sum((y - my) ** 2 for y in ys)
    res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    return {"intercept": a, "slope_per_doubling": b, "r2": 1 - res / ss if ss else float("nan")}


def log_linear_stretch(means: dict[int, float], lo: float = CHANCE + 0.1, hi: float = 0.95,
                       min_sizes: int = 4) -> dict | None:
    """The longest run of >= `min_sizes` consecutive sizes (4 doublings' worth: an 8x span) whose means lie strictly
    between `lo` (above chance) and `hi` (below the ceiling) and fit a line in log2(size) with R^2 >= 0.9 and a
    positive slope; None when there is none. (Three points of a sigmoid fit a line too easily.)"""
    sizes = sorted(means)
    best = None
    for i in range(len(sizes)):
        for j in range(i + min_sizes, len(sizes) + 1):
            pts = [(n, means[n]) for n in sizes[i:j]]
            if all(lo < a < hi for _, a in pts):
                f = fit_log_linear(pts)
                if f["r2"] >= 0.9 and f["slope_per_doubling"] > 0 and (best is None or j - i > len(best["sizes"])):
                    best = {"sizes": [n for n, _ in pts], **f}
    return best


def curve_shape(means: dict[int, float], lo: float = CHANCE + 0.1, hi: float = 0.95) -> str:
    """'log-linear' (a stretch exists), 'threshold' (one doubling takes it from at most `lo` to at least 0.8),
    'floor' / 'ceiling' (every size at or below `lo` / at or above `hi`), else 'undetermined'."""
    if log_linear_stretch(means, lo, hi):
        return "log-linear"
    sizes = sorted(means)
    if all(means[n] <= lo for n in sizes):
        return "floor"
    if all(means[n] >= hi for n in sizes):
        return "ceiling"
    if any(means[a] <= lo and means[b] >= 0.8 for a, b in zip(sizes, sizes[1:], strict=False)):
        return "threshold"
    return "undetermined"


def report(plan: CurvePlan) -> dict:
    recs = [json.loads(p.read_text()) for p in sorted((plan.results / "runs").glob("*.json"))]
    recs = [r for r in recs if r["size"] in plan.sizes and r["seed"] in plan.seeds and r["steps"] == plan.steps
            and r.get("pool_reward", "answer") == plan.pool_reward]
    by_size: dict[int, list[float]] = {}
    for r in recs:
        by_size.setdefault(r["size"], []).append(r["test_at_best"])
    rows = {n: {"values": v, "mean_ci": mean_ci(v) if len(v) > 1 else (v[0], v[0], v[0])}
            for n, v in sorted(by_size.items())}
    means = {n: r["mean_ci"][0] for n, r in rows.items()}
    out = {"plan": plan.__dict__, "sizes": {str(n): r for n, r in rows.items()},
           "fit_all_above_chance": fit_log_linear([(n, m) for n, m in means.items() if m > CHANCE + 0.1])
           if sum(m > CHANCE + 0.1 for m in means.values()) >= 2 else None,
           "log_linear_stretch": log_linear_stretch(means), "shape": curve_shape(means)}
    write_json(plan.results / "sft_curve.json", out)
    if not rows:  # nothing of this plan recorded yet: no plot
        return out
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for r in recs:
        ax.plot(r["size"], r["test_at_best"], "o", color="tab:grey", alpha=0.5, ms=4)
    ns = list(rows)
    # bars: the seeds' range (a t interval over 2 seeds, t = 12.7, says little)
    ax.errorbar(ns, [rows[n]["mean_ci"][0] for n in ns],
                yerr=[[rows[n]["mean_ci"][0] - min(rows[n]["values"]) for n in ns],
                      [max(rows[n]["values"]) - rows[n]["mean_ci"][0] for n in ns]],
                marker="s", color="tab:blue", capsize=3, label="SFT, best validation step (mean; bars: seed range)")
    ax.axhline(CHANCE, color="k", ls=":", lw=1, label="chance (1/7)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="teacher-written examples (log scale)", ylabel="test accuracy (T=1)", ylim=(0, 1.02),
           title="SFT data curve, chains of " + (f"{plan.length} steps, from the base" if plan.length
                                                  else "4-6 steps"))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plan.results / "sft_curve.png", dpi=120)
    plt.close(fig)
    return out


def curve_config(plan: CurvePlan):
    """(config, teacher HF dir) of a plan: the pair's config and teacher for chains of 4-6 steps; at a length, the
    protocol's base as the student (its `hf_path`) and its RL teacher, on chains of that length with 1,024 test and
    256 validation problems."""
    from opd_jax.miniature.prepare import Recipe, prepare

    if not plan.length:
        prep = prepare(base_config([]), Recipe(), grade=False)
        return base_config(prep.overrides()), prep.teacher
    from opd_jax.miniature import protocol

    pp = protocol.prepare_protocol()
    if pp.info["teacher"]["recipe"]["length"] != plan.length:
        raise ValueError(f"the protocol's RL teacher is for chains of {pp.info['teacher']['recipe']['length']} steps, "
                         f"not {plan.length}")
    student = base_config([]).student
    cfg = base_config([*pp.pair.overrides(), *protocol.budget_overrides(plan.length),
                       f"data.source={protocol.source(plan.length)}", f"eval.source={protocol.source(plan.length)}",
                       f"student.hf_path={pp.base}", f"teachers.0.model.hf_path={pp.teacher}",
                       *[f"teachers.0.model.{k}={getattr(student, k)}" for k in protocol.STUDENT_SHAPE]])
    return cfg, pp.teacher


def run_curve(plan: CurvePlan, runs: Path, jobs: Jobs | None = None) -> None:
    """Every run of the plan (finished ones are kept); with `jobs` (`jobs.Jobs`) the runs go side by side, each
    seed's after its pool of teacher samples."""
    jobs = jobs or Jobs(0)
    cfg, teacher = jobs.call(curve_config, plan)

    def one_seed(seed: int) -> None:
        if all(_recorded(plan, n, seed) for n in plan.sizes):
            return
        rows = jobs.call(pool, cfg, teacher, max(plan.sizes), seed, plan.stream, plan.pool_reward)
        wait_all([jobs.start(jobs.call, run_one, plan, cfg, rows, size, seed, runs)
                  for size in sorted(plan.sizes, reverse=True)])

    wait_all([jobs.start(one_seed, seed) for seed in plan.seeds])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", action="store_true")
    p.add_argument("--runs", default=None, help="run directories (default runs/opd_chains/sft_curve[_L<length>])")
    p.add_argument("--length", type=int, default=0, choices=sorted(PLANS),
                   help="0: chains of 4-6 steps from random weights; 12: from the protocol's base, RL teacher's data")
    a = p.parse_args(argv)
    quiet_jax()
    plan = PLANS[a.length]
    if not a.report:
        run_curve(plan, Path(a.runs or f"runs/opd_chains/{plan.results.name}").resolve())
    out = report(plan)
    print(json.dumps({k: v for k, v in out.items() if k != "plan"}, indent=1, default=str)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
