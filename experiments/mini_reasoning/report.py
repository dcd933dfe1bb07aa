"""Table and plots of the comparison from results/curves.jsonl (written by run_all.py).

    python -m experiments.mini_reasoning.report [--results DIR] [--target 0.8]

Writes results.md (steps and FLOPs to reach the target accuracy, student and teacher FLOPs in separate columns,
final accuracy with its spread over seeds), accuracy_vs_flops.png (log x) and accuracy_vs_steps.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections import defaultdict

from experiments.mini_reasoning import common

LABELS = {"sft": "SFT on teacher samples", "rl": "RL (GRPO, exact match)", "opd": "OPD (reverse KL)"}


def load_curves(path: str) -> dict[str, dict[int, list[dict]]]:
    """method -> seed -> eval rows sorted by step."""
    out: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in common.read_jsonl(path):
        if "accuracy" in r:
            out[r["method"]][int(r["seed"])].append(r)
    for m in out.values():
        for rows in m.values():
            rows.sort(key=lambda r: r["step"])
    return out


def first_reach(rows: list[dict], target: float) -> dict | None:
    return next((r for r in rows if r["accuracy"] >= target - 1e-9), None)


def gain_target(curves: dict, gain: float = 0.03) -> float:
    """A modest target: the mean step-0 accuracy plus `gain`, so methods that improve at all get a row too."""
    starts = [rows[0]["accuracy"] for seeds in curves.values() for rows in seeds.values() if rows and
              rows[0]["step"] == 0]
    return round((statistics.mean(starts) if starts else 0.0) + gain, 2)


def default_target(meta: dict) -> float:
    """Halfway from the student's start to the teacher, rounded down to 0.05."""
    s, t = meta.get("student_accuracy", 0.5), meta.get("teacher_accuracy", 0.9)
    return math.floor((s + 0.5 * (t - s)) * 20) / 20


def fmt_flops(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "—"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def table(curves: dict, target: float, meta: dict) -> tuple[str, dict]:
    s_acc, t_acc = meta.get("student_accuracy", float("nan")), meta.get("teacher_accuracy", float("nan"))
    lines = [f"Target: held-out greedy accuracy ≥ {target:.2f} (student starts at {s_acc:.3f}, teacher {t_acc:.3f})."
             " Steps / FLOPs: mean over the seeds that reached the target (k/n reached).", "",
             "| method | seeds reaching target | steps to target | student FLOPs to target | teacher FLOPs to target "
             "| total FLOPs to target | final accuracy (mean ± sd) | best accuracy (mean) |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for method, seeds in curves.items():
        hits = [first_reach(rows, target) for rows in seeds.values()]
        hit = [h for h in hits if h is not None]
        finals = [rows[-1]["accuracy"] for rows in seeds.values()]
        best = [max(r["accuracy"] for r in rows) for rows in seeds.values()]
        avg = {k: statistics.mean(h[k] for h in hit) if hit else None
               for k in ("step", "student_flops", "teacher_flops")}
        s = {"reached": len(hit), "seeds": len(hits), "steps": avg["step"], "student_flops": avg["student_flops"],
             "teacher_flops": avg["teacher_flops"], "final": finals, "best": best}
        s["total_flops"] = None if not hit else s["student_flops"] + s["teacher_flops"]
        summary[method] = s
        steps = "—" if s["steps"] is None else f"{s['steps']:.0f}"
        lines.append(f"| {LABELS.get(method, method)} | {len(hit)}/{len(hits)} | {steps} | "
                     f"{fmt_flops(s['student_flops'])} | {fmt_flops(s['teacher_flops'])} | "
                     f"{fmt_flops(s['total_flops'])} | {mean_std(finals)} | {statistics.mean(best):.3f} |")
    ratios = []
    ref = summary.get("opd")
    for m in ("sft", "rl"):
        o = summary.get(m)
        if ref and o and ref["steps"] and o["steps"]:
            ratios.append(f"- {LABELS[m]} vs OPD: {o['steps'] / ref['steps']:.1f}x the steps, "
                          f"{o['total_flops'] / ref['total_flops']:.1f}x the total FLOPs, "
                          f"{o['student_flops'] / ref['student_flops']:.1f}x the student FLOPs to the target.")
        elif ref and o and ref["steps"] and not o["steps"]:
            ratios.append(f"- {LABELS[m]}: no seed reached the target within the run; OPD did in "
                          f"{ref['steps']:.0f} steps.")
        elif ref and o and o["steps"] and not ref["steps"]:
            ratios.append(f"- {LABELS[m]} reached the target in {o['steps']:.0f} steps "
                          f"({fmt_flops(o['total_flops'])} FLOPs); OPD did not within the run.")
    if ratios:
        lines += ["", *ratios]
    return "\n".join(lines), summary


def plots(curves: dict, out_dir: str, target: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for xkey, xlabel, name, logx in (("flops", "cumulative FLOPs (student + teacher)", "accuracy_vs_flops.png", True),
                                     ("step", "gradient steps", "accuracy_vs_steps.png", False)):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for i, (method, seeds) in enumerate(curves.items()):
            color = f"C{i}"
            for j, rows in enumerate(seeds.values()):
                xs = [(r["student_flops"] + r["teacher_flops"]) if xkey == "flops" else r["step"] for r in rows]
                if logx:  # step 0 has no FLOPs: start the log axis at the first eval after it
                    pts = [(x, r["accuracy"]) for x, r in zip(xs, rows, strict=True) if x > 0]
                else:
                    pts = [(x, r["accuracy"]) for x, r in zip(xs, rows, strict=True)]
                if pts:
                    ax.plot(*zip(*pts, strict=True), color=color, alpha=0.8, marker=".",
                            label=LABELS.get(method, method) if j == 0 else None)
        ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"target {target:.2f}")
        if logx:
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel="held-out accuracy (greedy)", ylim=(0, 1))
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(common.RESULTS_DIR))
    p.add_argument("--target", type=float, default=None)
    a = p.parse_args(argv)
    meta_path = os.path.join(a.results, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    curves = load_curves(os.path.join(a.results, "curves.jsonl"))
    if not curves:
        print(f"no curves in {a.results}/curves.jsonl: run experiments.mini_reasoning.run_all first")
        return 1
    target = a.target if a.target is not None else default_target(meta)
    text, summary = table(curves, target, meta)
    low = gain_target(curves)
    if low < target:
        low_text, low_summary = table(curves, low, meta)
        text += "\n\nA modest target, step-0 accuracy + 0.03:\n\n" + low_text
    else:
        low_summary = None
    pngs = plots(curves, a.results, target)
    runs = meta.get("runs", {})
    wall = "".join(f"\n| {k} | {v['wall_s']:.0f} |" for k, v in runs.items())
    md = (f"# Mini reasoning comparison\n\n{text}\n\n![accuracy vs FLOPs](accuracy_vs_flops.png)\n"
          f"![accuracy vs steps](accuracy_vs_steps.png)\n\nCurves: `curves.jsonl` (from `runs/*.jsonl`, each run's "
          f"metrics.jsonl). Seeds: {meta.get('seeds')}.\nSteps per run: {meta.get('steps')}, eval every "
          f"{meta.get('eval_every')} steps on "
          f"{meta.get('eval_problems', '?')} held-out problems (greedy).\n\n| run | wall seconds |\n|---|---|"
          f"{wall}\n")
    if meta.get("wall_s"):
        md += f"\nWhole `run_all` (preparation included when not cached): {meta['wall_s']:.0f}s.\n"
    for extra in ("single_prompt.md", "recovery.md"):  # written by single_prompt.py / recovery.py
        path = os.path.join(a.results, extra)
        if os.path.exists(path):
            md += "\n" + open(path, encoding="utf-8").read().replace("\n# ", "\n## ").replace("# ", "## ", 1)
    with open(os.path.join(a.results, "results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    with open(os.path.join(a.results, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"target": target, "methods": summary, "gain_target": low, "gain_methods": low_summary}, f,
                  indent=1)
    print(text)
    print(f"wrote {a.results}/results.md, {', '.join(pngs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
