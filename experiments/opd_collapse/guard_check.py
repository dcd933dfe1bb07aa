"""The length-collapse guard's rule (`opd_jax.guards.CollapseGuard`, default `GuardConfig`), replayed offline on every
committed run's training metrics: the collapse controls here and the `experiments/opd_chains` runs (OPD and RL from
the student near its teacher, where nothing collapsed).

    python -m experiments.opd_collapse.guard_check      # writes results/guard_check.json and .md

For each run: the step at which the guard would first fire (None if never), the first step with a training
truncation rate >= 0.5, and, for the controls, the run's verdict (`controls.collapse_verdict`). A rule passes
when it fires in every "collapse" run, no later than its first step of truncation >= 0.5, and in no "stable" run
nor any opd_chains run (PREDICTIONS.md, addendum; a "partial" run may go either way). Two rules are replayed: the
one predicted before the runs (`PREREGISTERED`: a rise of 0.3) and the shipped default (`GuardConfig()`: a rise of
0.15, chosen after seeing this check).
"""

from __future__ import annotations

import glob
import json
import os

from experiments.opd_collapse.controls import HERE, RESULTS, summarize_run
from opd_jax.config.schema import GuardConfig
from opd_jax.guards import CollapseGuard

CHAINS_RUNS = os.path.join(HERE, "..", "opd_chains", "results", "runs")
PREREGISTERED = GuardConfig(window=5, truncation_rise=0.3, kl_fall=0.0)  # PREDICTIONS.md, addendum
RULES = {"preregistered": PREREGISTERED, "default": GuardConfig()}


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def replay(metrics: list[dict], cfg: GuardConfig | None = None) -> int | None:
    """The step at which the guard fires on these metrics.jsonl rows, or None."""
    guard = CollapseGuard(cfg or GuardConfig())
    for row in metrics:
        _, report = guard.update(int(row["step"]), row)
        if report is not None:
            return report.step
    return None


def first_truncated(metrics: list[dict], level: float = 0.5) -> int | None:
    return next((int(r["step"]) for r in metrics if r.get("truncation_rate", 0.0) >= level), None)


def check(cfg: GuardConfig) -> dict:
    """Replay `cfg` on every run; the runs, and the names of those it missed (or caught late) or fired on wrongly."""
    rows = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "runs", "*.metrics.jsonl"))):
        name = os.path.basename(path)[: -len(".metrics.jsonl")]
        metrics = read_jsonl(path)
        with open(path[: -len(".metrics.jsonl")] + ".json", encoding="utf-8") as f:
            verdict = summarize_run(json.load(f), metrics)["verdict"]
        rows.append({"run": name, "source": "opd_collapse", "verdict": verdict, "fires_at": replay(metrics, cfg),
                     "first_truncation_0.5": first_truncated(metrics)})
    for path in sorted(glob.glob(os.path.join(CHAINS_RUNS, "*.metrics.jsonl"))):
        metrics = read_jsonl(path)
        if not any("truncation_rate" in r for r in metrics):  # SFT and the prepared models: no rollouts
            continue
        rows.append({"run": os.path.basename(path)[: -len(".metrics.jsonl")], "source": "opd_chains",
                     "verdict": "near the teacher", "fires_at": replay(metrics, cfg),
                     "first_truncation_0.5": first_truncated(metrics)})
    missed = [r["run"] for r in rows if r["verdict"] == "collapse" and (
        r["fires_at"] is None or (r["first_truncation_0.5"] is not None and r["fires_at"] > r["first_truncation_0.5"]))]
    # "partial" runs (truncation above 0.1 but not a full collapse) may fire or not: the rule is judged on the others
    false_alarms = [r["run"] for r in rows if r["verdict"] in ("stable", "near the teacher") and r["fires_at"]]
    return {"rule": vars(cfg), "runs": rows, "missed_or_late": missed, "fired_without_collapse": false_alarms}


def main() -> int:
    out = {name: check(cfg) for name, cfg in RULES.items()}
    with open(os.path.join(RESULTS, "guard_check.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    pre, new = out["preregistered"], out["default"]
    lines = ["| run | source | verdict | fires at step, preregistered rule (rise 0.3) | fires at step, default rule "
             "(rise 0.15) | first step with truncation >= 0.5 |", "|---|---|---|---|---|---|"]
    lines += [f"| {a['run']} | {a['source']} | {a['verdict']} | {a['fires_at']} | {b['fires_at']} | "
              f"{a['first_truncation_0.5']} |" for a, b in zip(pre["runs"], new["runs"], strict=True)]
    for name, o in out.items():
        lines += ["", f"{name} rule {o['rule']}: missed or late: {o['missed_or_late'] or 'none'}; fired without a "
                      f"collapse: {o['fired_without_collapse'] or 'none'}"]
    with open(os.path.join(RESULTS, "guard_check.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
