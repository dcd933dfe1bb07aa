"""RL vs OPD across episode lengths under the published protocol (issue #22, deliverable 1): the steps ratio as a
function of the number of uncertain tokens per episode.

Protocol (the blog's): a base student; RL from the base on chains of L steps gives the teacher; OPD from the same
base distils that RL policy on the same prompt stream. For each length L (one result digit per step: L uncertain
tokens an episode) and each seed s, RL seed s gives teacher s and OPD seed s distils it, so every seed is a whole
replicate of the protocol. Steps to 50%, 80% and 90% of that RL run's gain are read off both T=1 test curves (evals
every `every` steps on 1,024 held-out problems) and the ratio RL steps / OPD steps is bracketed by the cadence
(`ratios.py`). Learning rates: each method's rate is chosen per length on the validation split (seed 0, mean of the
last two evals), from `RL_LRS` and `OPD_LRS`; OPD's sweep distils the seed-0 RL policy at the chosen RL rate.

Base: pilot 6's base, exactly (the shipped student, then SFT on clean chains of 1-16 steps from the stream
`p6_base`, 180 steps: validation T=1 0.92 / 0.83 / 0.52 / 0.11 at 2 / 4 / 8 / 16 steps, so long chains are mostly
unsolved). A first launch trained its base on chains of 1-12 from another stream (0.96 at 4 steps: too strong for
RL to gain measurably there); it was stopped and its records removed (its log: results/logs/
lengths_stopped_base_1-12.log).

Reading the curves: a fraction f of RL's gain counts as reached at the first eval that, with the next one, is at
or above the target (a single noisy eval does not count), and a fraction is "undetermined" when RL's gain is under
3 binomial standard errors of a difference of two evals. Across seeds, the interval of the ratio is a t interval
of log(ratio_lo) (its lower end) and of log(ratio_hi) (its upper end), so it carries both the cadence and the seed
spread; a seed where OPD or RL did not reach the target is censored (its bound is 0 or infinity), not dropped.

    python -m experiments.opd_chains.lengths            # every stage; finished runs are kept (resumable)
    python -m experiments.opd_chains.lengths --report   # the table and plot from the records

Records: results/lengths/runs/<name>.json (curves, wall time), results/lengths/lengths.json, the plot
results/lengths/steps_ratio_vs_length.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.opd_chains.arms import eval_curve, results_root, write_json
from experiments.opd_chains.jobs import Jobs, wait_all
from experiments.opd_chains.ratios import ratio_rule, steps_bracket
from opd_jax.miniature import protocol
from opd_jax.miniature.measure import mean_ci
from opd_jax.miniature.setup import base_config, quiet_jax

MOD = protocol.MOD

RESULTS = results_root() / "lengths"
FRACTIONS = (0.5, 0.8, 0.9)


@dataclass(frozen=True)
class LengthsPlan:
    lengths: tuple[int, ...] = (4, 8, 12)  # 16: RL from this base learns nothing in 100 steps (pilot 6)
    seeds: tuple[int, ...] = (0, 1, 2)
    base_steps: int = 180
    base_longest: int = 16  # the base's SFT data: chains of 1..base_longest steps (pilot 6's)
    base_stream: str = "p6_base"
    rl_lrs: tuple[float, ...] = (1e-4, 3e-4)
    opd_lrs: tuple[float, ...] = (3e-4, 1e-3)
    # OPD's sweep also crosses each rate with a per-token KL clip (`loss.kl_clip`, nats; 0 = off, as published)
    opd_kl_clips: tuple[float, ...] = (0.0, 5.0)
    steps: int = 100  # both methods, sweeps included
    # lengths whose seeded runs go longer, both methods: at 12 steps RL was still rising at step 100 (its plateau
    # is the protocol's teacher); the rates stay the ones the 100-step sweep chose
    long_steps: tuple[tuple[int, int], ...] = ((12, 200),)
    every: int = 5
    test: int = 1024
    val: int = 256
    # lengths that get a second protocol replicate with the every-step reward (`reward=steps`: every step's result
    # and the answer right, no 1/7 lucky-guess floor; its eval grades the same way), at the rates chosen above
    steps_reward_lengths: tuple[int, ...] = (12,)


    def steps_for(self, length: int) -> int:
        return dict(self.long_steps).get(length, self.steps)


PLAN = LengthsPlan()
QUICK = LengthsPlan(lengths=(2, 4), seeds=(0, 1), base_steps=4, rl_lrs=(1e-4,), opd_lrs=(3e-4,), opd_kl_clips=(0.0,),
                    steps=4, steps_reward_lengths=(4,),
                    long_steps=((4, 6),), every=2, test=32, val=16)


def source(plan: LengthsPlan, length: int, lo: int | None = None, reward: str = "answer") -> str:
    return protocol.source(length, lo, test=plan.test, val=plan.val) + (f":reward={reward}" if reward != "answer"
                                                                         else "")


def _curve(run_dir: Path) -> list[dict]:
    """Per eval step: T=1 accuracy on val and test (`arms.eval_curve`, accuracies only, as the eval graded them),
    and `test_steps`: the share of test completions with every step's result and the answer right in the reference
    layout (`chains.steps_correct`: no 1/7 lucky-guess floor), from the same eval rows."""
    return [{"step": c["step"], **{sp: c[sp]["accuracy"] for sp in ("val", "test")},
             "test_steps": steps_accuracy(run_dir / "eval" / f"eval_step{c['step']}.jsonl")}
            for c in eval_curve(str(run_dir))]


def steps_accuracy(path: Path) -> float:
    """Share of the test rows of an eval JSONL whose (first) completion has every step's result and the answer
    right in the reference layout (`chains.steps_correct`)."""
    from opd_jax.data.chains import parse_chain, split_of, steps_answer, steps_correct

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    test = [r for r in rows if split_of(r["text"]) == "test"]
    ok = sum(steps_correct(r["completions"][0], steps_answer(parse_chain(r["text"], MOD))) for r in test)
    return ok / max(1, len(test))


def rescore(plan: LengthsPlan, runs: Path) -> int:
    """Add `test_steps` to the curves of the records whose run directories are still on disk (records written
    before it existed); returns how many records changed. The other curve values are recomputed and must agree."""
    changed = 0
    for record in sorted((RESULTS / "runs").glob("*.json")):
        rec = json.loads(record.read_text())
        run_dir = runs / rec["name"]
        if "test_steps" in rec["curve"][0] or not (run_dir / "eval").exists():
            continue
        curve = _curve(run_dir)
        old = [(c["step"], c["val"], c["test"]) for c in rec["curve"]]
        if [(c["step"], c["val"], c["test"]) for c in curve] != old:
            raise ValueError(f"{record}: the eval rows under {run_dir} do not give the recorded curve")
        rec["curve"] = curve
        write_json(record, rec)
        changed += 1
    return changed


def build_base(plan: LengthsPlan, runs: Path, overrides: list[str]) -> Path:
    """The base student (cached under `runs`): the shipped student, SFT on clean chains of 1-16 steps
    (`protocol.train_base`, the same base `opd-jax demo` ships)."""
    from opd_jax.miniature.prepare import Recipe, prepare

    out = runs / f"base_{plan.base_steps}_1-{plan.base_longest}_{plan.base_stream}"
    if (out / "config.json").exists():
        return out
    prep = prepare(base_config(overrides), Recipe(), grade=False)
    recipe = protocol.BaseRecipe(steps=plan.base_steps, longest=plan.base_longest, stream=plan.base_stream)
    protocol.train_base(base_config([*overrides, *prep.overrides()]), recipe, out, str(runs), test=plan.test,
                        val=plan.val)
    return out


def weights_digest(hf_dir: Path) -> str:
    """sha256 (12 hex digits) of an HF dir's `model.safetensors`: which weights a run distilled."""
    import hashlib

    return hashlib.sha256((hf_dir / "model.safetensors").read_bytes()).hexdigest()[:12]


def run_name(method: str, length: int, lr: float, seed: int, steps: int, plan: LengthsPlan, kl_clip: float = 0.0,
             reward: str = "answer") -> str:
    return (f"{method}_L{length}_lr{lr:g}" + (f"_klc{kl_clip:g}" if kl_clip else "") + f"_s{seed}"
            + (f"_n{steps}" if steps != plan.steps else "") + ("_rsteps" if reward == "steps" else ""))


def run_one(plan: LengthsPlan, method: str, length: int, lr: float, seed: int, base: Path, teacher: Path | None,
            runs: Path, overrides: list[str], steps: int | None = None, kl_clip: float = 0.0,
            reward: str = "answer") -> dict:
    """One RL or OPD run from the base (resumable: a finished run's record is reused); returns its record.
    `kl_clip` (OPD only): `loss.kl_clip`, the per-token bound on kl_t in nats (0 = off). `reward`: the chains
    reward RL trains on and the eval grades with ('answer' or 'steps')."""
    from opd_jax.miniature.prepare import export

    steps = steps or plan.steps
    name = run_name(method, length, lr, seed, steps, plan, kl_clip, reward)
    record = RESULTS / "runs" / f"{name}.json"
    # the teacher by name and by its weights: an RL run retrained with other results is a new teacher
    key = {"steps": steps, "every": plan.every, "test": plan.test, "val": plan.val, "base": base.name,
           "teacher": None if teacher is None else teacher.parent.name,
           "teacher_weights": None if teacher is None else weights_digest(teacher)}
    run_dir = runs / name
    if record.exists():
        rec = json.loads(record.read_text())
        # a record of another plan (or base, or teacher) is rerun, not reused; so is an RL run whose policy (the
        # teacher of OPD) is no longer on disk
        if rec.get("key") == key and (method != "rl" or (run_dir / "export" / "config.json").exists()):
            return rec
    cfg0 = base_config(overrides)
    cfg = base_config([*overrides, *protocol.run_overrides(
        cfg0, method, length=length, lr=lr, seed=seed, steps=steps, base=str(base),
        teacher=None if teacher is None else str(teacher), run_dir=str(run_dir),
        eval_source=source(plan, length, reward=reward),
        eval_every=plan.every, kl_clip=kl_clip), "eval.split=val+test"])
    t0 = time.time()
    # RL and OPD of a seed: the same prompts (the stream lengths_<length> at the seed)
    tr, checked = protocol.train_run(cfg, f"lengths_{length}", seed)
    export(tr, run_dir / "export")
    rec = {"name": name, "key": key, "method": method, "length": length, "lr": lr, "kl_clip": kl_clip, "seed": seed,
           "steps": steps, "reward": reward,
           "every": plan.every, "test_problems": plan.test, "teacher": None if teacher is None else str(teacher),
           "train_rows_checked": checked,
           "wall_s": time.time() - t0, "curve": _curve(run_dir)}
    write_json(record, rec)
    print(f"[{name}] test T=1 {rec['curve'][0]['test']:.3f} -> {rec['curve'][-1]['test']:.3f}; "
          f"{rec['wall_s']:.0f}s", flush=True)
    return rec


def plan_runs(plan: LengthsPlan) -> list[str] | None:
    """The names of every run `run_all` makes under `plan` (sweeps, seeds, every-step replicates), or None while a
    length has no chosen rates yet."""
    names: list[str] = []
    for length in plan.lengths:
        path = RESULTS / f"chosen_L{length}.json"
        if not path.exists():
            return None
        c = json.loads(path.read_text())
        names += [run_name("rl", length, lr, 0, plan.steps, plan) for lr in plan.rl_lrs]
        names += [run_name("opd", length, lr, 0, plan.steps, plan, clip) for lr in plan.opd_lrs
                  for clip in plan.opd_kl_clips]
        rewards = ("answer", "steps") if length in plan.steps_reward_lengths else ("answer",)
        for reward in rewards:
            for seed in plan.seeds:
                for method, lr, clip in (("rl", c["rl_lr"], 0.0), ("opd", c["opd_lr"], c.get("opd_kl_clip", 0.0))):
                    names.append(run_name(method, length, lr, seed, plan.steps_for(length), plan, clip, reward))
    return list(dict.fromkeys(names))  # seed 0 of the sweep and of the seeds is one run where the names agree


def all_recorded(plan: LengthsPlan) -> bool:
    """Whether every run of the plan is recorded (a rerun would only reuse them)."""
    names = plan_runs(plan)
    return names is not None and all((RESULTS / "runs" / f"{n}.json").exists() for n in names)


def recorded_wall_s(plan: LengthsPlan) -> float:
    """The stage's time as measured: the wall time of every run of the plan (each recorded when it ran), plus the
    base student's training (`protocol`'s record of it)."""
    runs = sum(json.loads((RESULTS / "runs" / f"{n}.json").read_text())["wall_s"] for n in plan_runs(plan) or [])
    base = protocol.shipped_record("base")
    return runs + (base["base_seconds"] if base else 0.0)


def val_score(rec: dict) -> float:
    return sum(c["val"] for c in rec["curve"][-2:]) / 2


def run_all(plan: LengthsPlan, runs: Path, overrides: list[str], jobs: Jobs | None = None) -> None:
    """Every run of the plan; with `jobs` (`jobs.Jobs`) the lengths, and the seeds within a length, go side by side
    (each run is one job; a seed's OPD run waits for its RL run, its teacher)."""
    jobs = jobs or Jobs(0)
    base = jobs.call(build_base, plan, runs, overrides)
    wait_all([jobs.start(_run_length, plan, length, base, runs, overrides, jobs)
              for length in sorted(plan.lengths, key=plan.steps_for, reverse=True)])  # the longest runs first


def _run_length(plan: LengthsPlan, length: int, base: Path, runs: Path, overrides: list[str], jobs: Jobs) -> None:
    """One length: RL's rate sweep (seed 0), OPD's sweep distilling the chosen rate's policy, then every seed's RL
    run and the OPD run distilling it (and the every-step-reward replicate where planned)."""
    rl = dict(zip(plan.rl_lrs, wait_all([jobs.start(jobs.call, run_one, plan, "rl", length, lr, 0, base, None, runs,
                                                    overrides) for lr in plan.rl_lrs]), strict=True))
    rl_lr = max(rl, key=lambda k: val_score(rl[k]))
    teacher0 = runs / rl[rl_lr]["name"] / "export"
    n = plan.steps_for(length)
    grid = [(lr, clip) for lr in plan.opd_lrs for clip in plan.opd_kl_clips]
    sweep = [jobs.start(jobs.call, run_one, plan, "opd", length, lr, 0, base, teacher0, runs, overrides,
                        kl_clip=clip) for lr, clip in grid]
    rewards = ("answer", "steps") if length in plan.steps_reward_lengths else ("answer",)
    # every seed's RL run needs only RL's rate: it starts beside OPD's sweep
    rl_runs = {(reward, seed): jobs.start(jobs.call, run_one, plan, "rl", length, rl_lr, seed, base, None, runs,
                                          overrides, n, reward=reward)
               for reward in rewards for seed in plan.seeds}
    opd = dict(zip(grid, wait_all(sweep), strict=True))
    opd_lr, opd_clip = max(opd, key=lambda k: val_score(opd[k]))  # ties: the first (unclipped, lower rate)

    def distil(reward: str, seed: int) -> dict:
        r = rl_runs[reward, seed].result()
        return jobs.call(run_one, plan, "opd", length, opd_lr, seed, base, runs / r["name"] / "export", runs,
                         overrides, n, kl_clip=opd_clip, reward=reward)

    wait_all([jobs.start(distil, reward, seed) for reward, seed in rl_runs])
    write_json(RESULTS / f"chosen_L{length}.json", {
        "rl_lr": rl_lr, "opd_lr": opd_lr, "opd_kl_clip": opd_clip,
        "rl_val": {str(k): val_score(v) for k, v in rl.items()},
        "opd_val": {f"{lr:g}" + (f" kl_clip {clip:g}" if clip else ""): val_score(v)
                    for (lr, clip), v in opd.items()}})


def ratios_of(rl: dict, opd: dict, key: str = "test") -> dict:
    """Per fraction f of RL's gain (RL's start to the mean of its last two test evals): the steps brackets of both
    runs (a target counts as reached when two evals in a row are at or above it) and the ratio interval RL / OPD; a
    fraction is undetermined when RL's gain is under 3 binomial standard errors of a difference of two evals. `key`:
    the curve read ('test', or 'test_steps')."""
    n = rl.get("test_problems", 1024)
    start = rl["curve"][0][key]
    final = sum(c[key] for c in rl["curve"][-2:]) / 2
    p = min(max((start + final) / 2, 1e-3), 1 - 1e-3)
    noise = 3 * math.sqrt(2 * p * (1 - p) / n)
    out = {"base": start, "rl_final": final, "opd_final": sum(c[key] for c in opd["curve"][-2:]) / 2,
           "gain": final - start, "gain_noise_3se": noise, "gain_resolved": final - start >= noise}
    for f in FRACTIONS:
        target = start + f * (final - start)
        a = steps_bracket(opd["curve"], target, every=opd["every"], steps=opd["steps"], key=key, sustained=2)
        b = steps_bracket(rl["curve"], target, every=rl["every"], steps=rl["steps"], key=key, sustained=2)
        v = ratio_rule(a, b, 7.0)
        verdict = v.verdict if out["gain_resolved"] else "undetermined (RL's gain is within the eval noise)"
        out[f"{f:.0%}"] = {"target": target, "opd": [a.lo, a.hi], "rl": [b.lo, b.hi],
                           "ratio": [v.ratio_lo, v.ratio_hi], "rule_7x": verdict,
                           "resolved": out["gain_resolved"] and a.reached}
    return out


def seed_interval(per_seed: list[dict], f: float) -> dict:
    """Across seeds, for fraction `f`: a point estimate (geometric mean of the bracket midpoints, seeds where both
    reached) and an interval whose low end is the t interval's low end of log(ratio_lo) and whose high end is the
    t interval's high end of log(ratio_hi): the cadence and the seed spread together. A seed whose ratio is
    unbounded above (RL did not reach) makes the high end infinite; a seed with an unresolved gain makes the whole
    fraction undetermined."""
    k = f"{f:.0%}"
    if not per_seed or not all(s["gain_resolved"] for s in per_seed):
        return {"point": None, "lo": None, "hi": None, "seeds": len(per_seed), "why": "gain within the eval noise"}
    los = [s[k]["ratio"][0] for s in per_seed]
    his = [s[k]["ratio"][1] for s in per_seed]
    mids = [math.sqrt(lo * hi) for lo, hi in zip(los, his, strict=True) if lo > 0 and math.isfinite(hi)]
    point = math.exp(sum(map(math.log, mids)) / len(mids)) if mids else None
    lo = 0.0 if any(x <= 0 for x in los) else (math.exp(mean_ci([math.log(x) for x in los])[1]) if len(los) > 1
                                                 else los[0])
    hi = math.inf if any(not math.isfinite(x) for x in his) else (
        math.exp(mean_ci([math.log(x) for x in his])[2]) if len(his) > 1 else his[0])
    return {"point": point, "lo": lo, "hi": hi, "seeds": len(per_seed)}


def rule_7x(per_seed: list[dict], f: float) -> str:
    """holds when every seed holds, does not hold when every seed does not, else undetermined."""
    verdicts = [s[f"{f:.0%}"]["rule_7x"] for s in per_seed]
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    if verdicts and all(v.startswith("does not hold") for v in verdicts):
        return "does not hold"
    return "undetermined"


def length_row(plan: LengthsPlan, length: int, chosen: dict, reward: str = "answer", key: str = "test"
               ) -> dict | None:
    """Per seed ratios, the interval over seeds per fraction (`seed_interval`) and the 7x rule over seeds
    (`rule_7x`) of one length's protocol replicates trained with `reward`, read on the curve `key` ('test': the
    eval's own grading; 'test_steps': every step right, no guess floor). None without records."""
    per_seed = []
    n = plan.steps_for(length)
    for seed in plan.seeds:
        rl_p = RESULTS / "runs" / f"{run_name('rl', length, chosen['rl_lr'], seed, n, plan, reward=reward)}.json"
        opd_p = RESULTS / "runs" / (run_name("opd", length, chosen["opd_lr"], seed, n, plan,
                                             chosen.get("opd_kl_clip", 0.0), reward) + ".json")
        if rl_p.exists() and opd_p.exists():
            rl, opd = json.loads(rl_p.read_text()), json.loads(opd_p.read_text())
            if key not in rl["curve"][0] or key not in opd["curve"][0]:
                return None
            per_seed.append({"seed": seed, **ratios_of(rl, opd, key)})
    if not per_seed:
        return None
    row = {"chosen": chosen, "reward": reward, "metric": key, "per_seed": per_seed}
    for f in FRACTIONS:
        row[f"{f:.0%}"] = {**seed_interval(per_seed, f), "rule_7x": rule_7x(per_seed, f),
                           "intervals": [s[f"{f:.0%}"]["ratio"] for s in per_seed]}
    for k in ("base", "rl_final", "opd_final"):
        vals = [s[k] for s in per_seed]
        row[k] = mean_ci(vals) if len(vals) > 1 else (vals[0], vals[0], vals[0])
    return row


def report(plan: LengthsPlan) -> dict:
    """lengths.json and the plot from the records: `lengths` (the answer reward, read on the test accuracy),
    `lengths_steps_metric` (the same runs read on every-step accuracy: no guess floor) and `lengths_steps_reward`
    (the replicates trained and graded with the every-step reward), each per length (`length_row`)."""
    out: dict = {"plan": plan.__dict__, "lengths": {}, "lengths_steps_metric": {}, "lengths_steps_reward": {}}
    for length in plan.lengths:
        chosen_path = RESULTS / f"chosen_L{length}.json"
        if not chosen_path.exists():
            continue
        chosen = json.loads(chosen_path.read_text())
        for part, reward, key in (("lengths", "answer", "test"), ("lengths_steps_metric", "answer", "test_steps"),
                                  ("lengths_steps_reward", "steps", "test")):
            row = length_row(plan, length, chosen, reward, key)
            if row is not None:
                out[part][str(length)] = row
    write_json(RESULTS / "lengths.json", out)
    plot(out)
    return out


def plot(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (f, color) in enumerate(zip(FRACTIONS, ("tab:blue", "tab:orange", "tab:green"), strict=True)):
        xs, ms, lo, hi = [], [], [], []
        for length, row in out["lengths"].items():
            r = row[f"{f:.0%}"]
            if r["point"] is None:
                continue
            xs.append(int(length) * (1 + 0.03 * (i - 1)))  # side by side
            ms.append(r["point"])
            lo.append(r["point"] - (r["lo"] or 0.0))
            hi.append((r["hi"] if r["hi"] is not None and math.isfinite(r["hi"]) else 100.0) - r["point"])
        if xs:
            ax.errorbar(xs, ms, yerr=[lo, hi], marker="o", capsize=3, color=color, label=f"{f:.0%} of RL's gain")
    for part, marker, label in (("lengths_steps_metric", "x", "80%, read without the guess floor"),
                                ("lengths_steps_reward", "D", "80%, RL on the every-step reward")):
        pts = [(int(k), r["80%"]) for k, r in out.get(part, {}).items() if r["80%"]["point"] is not None]
        if pts:
            ax.errorbar([k * (1.06 if marker == "x" else 1.09) for k, _ in pts], [r["point"] for _, r in pts],
                        yerr=[[r["point"] - (r["lo"] or 0.0) for _, r in pts],
                              [(r["hi"] if r["hi"] is not None and math.isfinite(r["hi"]) else 100.0) - r["point"]
                               for _, r in pts]],
                        fmt=marker, capsize=3, color="k", label=label)
    ax.axhline(1, color="k", lw=0.8)
    ax.axhline(7, color="grey", ls=":", lw=1, label="published 7x")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = [int(k) for k in out["lengths"]]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_ylim(0.1, 30)
    ax.set(xlabel="episode length (steps = uncertain tokens per episode)", ylabel="RL steps / OPD steps",
           title="RL steps / OPD steps to a share of RL's gain")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "steps_ratio_vs_length.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    global RESULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", action="store_true", help="only the table and plot from the records")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, separate results directory")
    p.add_argument("--runs", default=None, help="where run directories go (default runs/opd_chains/lengths)")
    p.add_argument("--rescore", action="store_true", help="add the every-step curve to records written "
                                                          "before it existed (from their run directories), then report")
    a = p.parse_args(argv)
    quiet_jax()
    plan = QUICK if a.quick else PLAN
    if a.quick:
        RESULTS = Path(a.runs or "runs/opd_chains/lengths_quick").resolve() / "results"
    runs = Path(a.runs or ("runs/opd_chains/lengths_quick" if a.quick else "runs/opd_chains/lengths")).resolve()
    if a.rescore:
        print(f"rescored {rescore(plan, runs)} records")
    elif not a.report:
        run_all(plan, runs, [])
    out = report(plan)
    for length, row in out["lengths"].items():
        print(length, {f: (row[f]["point"], row[f]["lo"], row[f]["hi"], row[f]["rule_7x"]) for f in ("50%", "80%",
                                                                                                      "90%")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
