"""The report of the OPD-claims miniature, computed only from the committed metrics files in results/:
`results.md` (every table), `claims.json` (each claim's numbers and verdict), the plots, and the claims section of
README.md (between the `claims:start` / `claims:end` markers, here and in the top-level README).

    python -m experiments.opd_chains.report [--results DIR] [--no-readme]

Definitions (the ones the predictions in README.md were written against):
- accuracy: share of the 512 held-out test problems whose final answer is right, one sample at T=1 (the curves and
  the claims) or greedy; per run a 95% Wilson interval over problems, per method a 95% t interval over seeds;
- target: halfway from the student to the teacher, in test accuracy at T=1 (both measured by `prepare`);
- steps to target: the first eval step at which the mean over seeds reaches the target;
- FLOPs: `opd_jax.flops` per step times steps, the student's (sampling + training) and the teacher's (OPD: scoring;
  SFT on fresh samples: sampling them, divided by the share kept) shown apart.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re

from experiments.opd_chains.arms import LABELS, METHODS
from experiments.opd_chains.ratios import check_rule_decidable, ratio_rule, steps_bracket
from opd_jax.miniature.measure import mean_ci

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
COLORS = {"opd": "tab:blue", "rl": "tab:red", "sft_fresh": "tab:green", "sft_fixed": "tab:olive",
          "opd_clean_teacher": "tab:purple"}
PUBLISHED = {
    "rl_steps": "OPD needs 7-10x fewer gradient steps than RL (dense vs sparse reward)",
    "sft_flops": "OPD reaches the SFT-extrapolated score with 9x fewer FLOPs (SFT data free) and ~30x fewer "
                 "(teacher sampling counted)",
    "single_prompt": "one prompt, many samples per step, comes close to the teacher's score",
    "recovery": "after mid-training on new knowledge, OPD against the earlier model recovers the lost skill and "
                "keeps the new knowledge",
    "on_policy_states": "on-policy training teaches the student in the states it reaches itself, which SFT on the "
                        "teacher's samples never visits",
    "rl_steps_by_length": "with an RL policy as the teacher and a student from the same base, OPD reaches the "
                          "teacher in 7-10x fewer steps than RL took; the reason given (O(N) bits per episode for "
                          "OPD, O(1) for RL) predicts a gap that grows with the uncertain tokens per episode",
    "sft_data_curve": "SFT's score grows log-linearly in its data (SFT-400K -> 60%; ~2M prompts extrapolated for "
                      "70%): the basis of the 9x / ~30x FLOPs comparison",
}


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def ci_str(m: float, lo: float, hi: float) -> str:
    """An accuracy-like mean with its interval, the interval clipped to [0, 1]."""
    return f"{m:.3f} [{max(lo, 0.0):.3f}, {min(hi, 1.0):.3f}]"


def acc(d: dict) -> str:
    """`ci_str` of a graded summary (accuracy, ci_low, ci_high)."""
    return ci_str(d["accuracy"], d["ci_low"], d["ci_high"])


def mci(d: dict) -> str:
    """`ci_str` of a mean over seeds (mean, lo, hi)."""
    return ci_str(d["mean"], d["lo"], d["hi"])


def sci(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2e}"


# ---- aggregation -----------------------------------------------------------------------------------------------
def group(records: dict[str, dict], method: str, lr: float, seeds: list[int],
          prefix: str | None = None) -> list[dict]:
    out = []
    for seed in seeds:
        name = f"{prefix or method}_lr{lr:g}_s{seed}"
        if name in records:
            out.append(records[name])
    return out


def mean_curve(recs: list[dict], split: str = "test") -> list[dict]:
    """Per eval step: mean test T=1 accuracy over the runs with its t interval (steps all runs share)."""
    if not recs:
        return []
    steps = sorted(set.intersection(*[{c["step"] for c in r["curve"]} for r in recs]))
    out = []
    for s in steps:
        vals = [next(c for c in r["curve"] if c["step"] == s)[split]["accuracy"] for r in recs]
        m, lo, hi = mean_ci(vals)
        out.append({"step": s, "mean": m, "lo": lo, "hi": hi, "n": len(vals)})
    return out


def steps_to(curve: list[dict], target: float) -> int | None:
    """The first eval step after the start at which the mean reaches `target` (None: never)."""
    return next((c["step"] for c in curve if c["step"] > 0 and c["mean"] >= target), None)


def final_stats(recs: list[dict], kind: str = "t1", split: str = "test") -> dict:
    vals = [r["final"][kind][split]["accuracy"] for r in recs]
    m, lo, hi = mean_ci(vals)
    return {"mean": m, "lo": lo, "hi": hi, "values": vals,
            "per_run": [r["final"][kind][split] for r in recs]}


def wall_sentence(w: dict) -> str:
    """How long `run_all` took, from summary/timing fields `wall_s` (None: not measured), `workers`, `measured`."""
    if not w.get("wall_s"):
        return "`run_all`'s wall time is not measured yet (no run of it that reused nothing)"
    return (f"`run_all` took {w['wall_s'] / 60:.0f} min on this 2-core machine ({w.get('workers') or 1} worker "
            f"processes, from the shipped models, measured {w.get('measured')})")


def summarize(results: str) -> dict:
    summary = load(os.path.join(results, "summary.json"))
    timing = os.path.join(results, "timing.json")
    if os.path.exists(timing):  # as last measured (a stage rerun alone updates only this file)
        t = load(timing)
        summary.update(wall_s=t.get("run_all_wall_s"), workers=t.get("workers"), measured=t.get("measured"),
                       stage_s=t["stage_s"])
    setting = load(os.path.join(results, "setting.json"))
    records = {os.path.basename(p)[:-5]: load(p) for p in glob.glob(os.path.join(results, "runs", "*.json"))}
    best = summary["best_lr"]
    seeds = summary["plan"]["seeds"]
    teacher_t1 = setting["teacher"]["test"]["t1"]["accuracy"]
    student_t1 = setting["student"]["test"]["t1"]["accuracy"]
    target = student_t1 + 0.5 * (teacher_t1 - student_t1)
    out: dict = {"teacher_t1": teacher_t1, "student_t1": student_t1, "target": target, "methods": {}}
    for m in METHODS:
        recs = group(records, m, best[m], seeds)
        if not recs:
            continue
        curve = mean_curve(recs)
        f = recs[0]["flops_per_step"]
        st = steps_to(curve, target)
        out["methods"][m] = {
            "lr": best[m], "seeds": [r["seed"] for r in recs], "curve": curve, "steps_to_target": st,
            "eval_every": recs[0]["spec"]["eval_every"], "steps": recs[0]["steps"],
            "flops_per_step": f,
            "flops_to_target": None if st is None else {"student": f["student"] * st, "teacher": f["teacher"] * st,
                                                         "total": (f["student"] + f["teacher"]) * st},
            "final_t1": final_stats(recs, "t1"), "final_greedy": final_stats(recs, "greedy"),
            "final_val_t1": final_stats(recs, "t1", "val"),
            "kl": mean_ci([r["kl_test"]["kl_exact"] for r in recs]),
            "kl_sampled": mean_ci([r["kl_test"]["kl_sampled"] for r in recs]),
            "probe_mark_after_slip": mean_ci([r["probe"]["p_mark_slip"] for r in recs]),
            "probe_mark_after_clean": mean_ci([r["probe"]["p_mark_clean"] for r in recs]),
            "genuine_corrections": mean_ci([r["errors_test_t1"]["genuine_corrections_per_completion"] for r in recs]),
            "first_error_kind": [r["errors_test_t1"]["first_error_kind"] for r in recs],
            "wall_s": [r["wall_s"] for r in recs],
        }
    # RL run long (one seed at its chosen rate)
    long_name = next((n for n in records if n.startswith("rl_long_")), None)
    if long_name:
        r = records[long_name]
        out["rl_long"] = {"name": long_name, "curve": [(c["step"], c["test"]["accuracy"], c["test"]["ci_low"],
                                                        c["test"]["ci_high"]) for c in r["curve"]],
                          "steps_to_target": next((c["step"] for c in r["curve"]
                                                   if c["step"] > 0 and c["test"]["accuracy"] >= target), None),
                          "steps": r["steps"], "eval_every": r["spec"]["eval_every"],
                          "final_t1": r["final"]["t1"]["test"],
                          "final_greedy": r["final"]["greedy"]["test"]}
    # single prompt
    # single prompt, by budget shape (steps, samples per step); the headline is the published shape, 20 x 256
    shapes: dict[tuple[int, int], list[dict]] = {}
    for n in sorted(records):
        if n.startswith("single_prompt_"):
            r = records[n]
            shapes.setdefault((r["steps"], r["sequences_per_step"]), []).append(r)
    by_shape = [{"steps": st, "samples_per_step": sm, "curve": mean_curve(rs), "final_t1": final_stats(rs, "t1"),
                 "final_greedy": final_stats(rs, "greedy"), "prompts": [r.get("single_prompt_text") for r in rs]}
                for (st, sm), rs in sorted(shapes.items(), key=lambda kv: (kv[0] != (20, 256), kv[0]))]
    if by_shape:
        out["single_prompt"] = {**by_shape[0], "shapes": by_shape}
    # control: OPD against a teacher that never saw a correction
    controls = [records[n] for n in sorted(records) if n.startswith("opd_clean_teacher_")]
    if controls:
        out["control"] = {"curve": mean_curve(controls), "final_t1": final_stats(controls, "t1"),
                          "final_greedy": final_stats(controls, "greedy"),
                          "kl": mean_ci([r["kl_test"]["kl_exact"] for r in controls]),
                          "probe_mark_after_slip": mean_ci([r["probe"]["p_mark_slip"] for r in controls])}
    out["records"] = records
    out["summary"] = summary
    out["setting"] = setting
    for name in ("recovery", "negative_control", "capacity", "diagnostics"):
        p = os.path.join(results, f"{name}.json")
        out[name] = load(p) if os.path.exists(p) else None
    for name in ("lengths", "sft_curve"):  # issue #22's stages (`lengths.py`, `sft_curve.py`)
        p = os.path.join(results, name, f"{name}.json")
        out[name] = load(p) if os.path.exists(p) else None
    p = os.path.join(results, "sft_curve_L12", "sft_curve.json")  # `sft_curve.py --length 12`
    out["sft_curve_L12"] = load(p) if os.path.exists(p) else None
    return out


# ---- claims ----------------------------------------------------------------------------------------------------
def claims(s: dict) -> list[dict]:
    """Each claim with its numbers and a verdict, by the criteria stated in README.md before the runs."""
    M = s["methods"]
    out = []
    opd, rl = M.get("opd"), M.get("rl")
    if opd and rl:
        # steps to the target as brackets (the eval cadence's resolution); RL that does not reach it within the
        # compared run is read off its long run; the 7x rule is decided only when the whole ratio interval is on
        # one side of 7 (experiments.opd_chains.ratios)
        so, sr = opd["steps_to_target"], rl["steps_to_target"]
        a = steps_bracket(opd["curve"], s["target"], every=opd["eval_every"], steps=opd["steps"])
        b = steps_bracket(rl["curve"], s["target"], every=rl["eval_every"], steps=rl["steps"])
        long = s.get("rl_long")
        if not b.reached and long:
            b = steps_bracket([{"step": c[0], "mean": c[1]} for c in long["curve"]], s["target"],
                              every=long["eval_every"], steps=long["steps"])
        bound = not b.reached
        if sr is None:
            sr = long["steps_to_target"] if long and long["steps_to_target"] is not None else b.lo
        size, direction = ratio_rule(a, b, 7.0), ratio_rule(a, b, 1.0)
        ratio = None if so is None else sr / so
        rl_design = long if long else rl  # B's design: the compared RL run, continued by its long run
        cannot = check_rule_decidable(7.0, every_a=opd["eval_every"], steps_a=opd["steps"],
                                      every_b=rl_design["eval_every"], steps_b=rl_design["steps"])
        if not a.reached:
            verdict = "does not hold (OPD did not reach the target)"
        elif size.verdict == "holds":
            verdict = "holds (RL never reached the target)" if bound else "holds"
        elif size.verdict == "does not hold":
            verdict = ("direction holds, size does not (< 7x)" if direction.verdict == "holds" else
                       "does not hold")
        else:
            verdict = "undetermined at this eval cadence"
        out.append({"claim": "rl_steps", "published": PUBLISHED["rl_steps"],
                    "numbers": {"target": s["target"], "opd_steps": so, "rl_steps": sr, "rl_lower_bound": bound,
                                "ratio": ratio, "ratio_interval": [size.ratio_lo, size.ratio_hi],
                                "rule_7x_decidable": cannot or "yes",
                                "opd_final": opd["final_t1"], "rl_final": rl["final_t1"],
                                "rl_long_final": (long or {}).get("final_t1")},
                    "verdict": verdict})
    sft = M.get("sft_fresh")
    if opd and sft:
        fo, fs = opd["flops_to_target"], sft["flops_to_target"]
        if fo is None:
            verdict, r9, r30 = "does not hold (OPD did not reach the target)", None, None
        elif fs is None:
            last = sft["curve"][-1]["step"]
            r9 = sft["flops_per_step"]["student"] * last / fo["total"]
            r30 = (sft["flops_per_step"]["student"] + sft["flops_per_step"]["teacher"]) * last / fo["total"]
            verdict = "direction holds (SFT did not reach the target); size lower bound only"
        else:
            r9, r30 = fs["student"] / fo["total"], fs["total"] / fo["total"]
            verdict = ("holds" if r9 >= 9 and r30 >= 30 else
                       "direction holds, size does not" if r30 > 1 else "does not hold")
        out.append({"claim": "sft_flops", "published": PUBLISHED["sft_flops"],
                    "numbers": {"opd_flops_to_target": fo, "sft_flops_to_target": fs,
                                "ratio_sft_student_over_opd_total": r9, "ratio_sft_total_over_opd_total": r30,
                                "opd_steps": opd["steps_to_target"], "sft_steps": sft["steps_to_target"],
                                "sft_fixed_steps": (M.get("sft_fixed") or {}).get("steps_to_target"),
                                "opd_final": opd["final_t1"], "sft_final": sft["final_t1"],
                                "sft_fixed_final": (M.get("sft_fixed") or {}).get("final_t1")},
                    "verdict": verdict})
    sp = s.get("single_prompt")
    if sp and opd:
        gap = s["teacher_t1"] - s["student_t1"]
        closed = (sp["final_t1"]["mean"] - s["student_t1"]) / gap if gap > 0 else float("nan")
        others = [{"steps": o["steps"], "samples": o["samples_per_step"], "final": o["final_t1"],
                   "gap_closed": (o["final_t1"]["mean"] - s["student_t1"]) / gap if gap > 0 else float("nan")}
                  for o in sp["shapes"][1:]]
        closed_full = (opd["final_t1"]["mean"] - s["student_t1"]) / gap if gap > 0 else float("nan")
        verdict = "holds" if closed >= 0.75 else ("partly: it helps, but not close" if closed > 0.25 else
                                                  "does not hold")
        out.append({"claim": "single_prompt", "published": PUBLISHED["single_prompt"],
                    "numbers": {"single_final": sp["final_t1"], "full_opd_final": opd["final_t1"],
                                "samples": sp["samples_per_step"], "steps": sp["steps"],
                                "prompts": sp["prompts"], "other_shapes": others,
                                "gap_closed": closed, "gap_closed_full_opd": closed_full,
                                "teacher": s["teacher_t1"], "student": s["student_t1"]},
                    "verdict": verdict})
    rec = s.get("recovery")
    if rec and "after_opd" in rec:
        b, m, o = rec["before"], rec["after_midtrain"], rec["after_opd"]
        # per seed (one seed in the first run): share of the lost skill regained, share of the new facts kept; the
        # verdict takes the interval over seeds: decided only when it is on one side of the threshold
        per_seed = rec.get("per_seed") or [{"after_midtrain": m, "after_opd": o}]
        b_acc = b["t1"]["accuracy"]
        regained_s, kept_s = [], []
        for one in per_seed:
            m1, o1 = one["after_midtrain"], one["after_opd"]
            lost1 = b_acc - m1["t1"]["accuracy"]
            regained_s.append((o1["t1"]["accuracy"] - m1["t1"]["accuracy"]) / lost1 if lost1 > 0 else float("nan"))
            mf = m1["facts_greedy"]["accuracy"]
            kept_s.append(o1["facts_greedy"]["accuracy"] / mf if mf else 0.0)
        regained, kept = mean_ci(regained_s), mean_ci(kept_s)

        def side(ci: tuple[float, float, float], threshold: float) -> bool | None:
            if len(per_seed) == 1:
                return ci[0] >= threshold
            return True if ci[1] >= threshold else False if ci[2] < threshold else None

        skill, knowledge = side(regained, 0.5), side(kept, 0.8)
        verdict = ("holds" if skill and knowledge else
                   "partly: skill recovered, knowledge lost" if skill and knowledge is False else
                   "partly: skill recovered, knowledge kept undetermined (interval spans 80%)" if skill else
                   "partly: knowledge kept, skill not recovered" if knowledge else
                   "undetermined" if skill is None or knowledge is None else "does not hold")
        regained, kept = regained[0], kept[0]
        intervals = {"share_regained_ci": mean_ci(regained_s), "facts_kept_ci": mean_ci(kept_s),
                     "share_regained_per_seed": regained_s, "facts_kept_per_seed": kept_s, "seeds": len(per_seed),
                     "old_fraction": rec.get("old_fraction")}
        so = rec.get("after_sft_fresh")
        out.append({"claim": "recovery", "published": PUBLISHED["recovery"],
                    "numbers": {"chains_t1": [b["t1"], m["t1"], o["t1"]], "facts_greedy": [b["facts_greedy"],
                                                                                           m["facts_greedy"],
                                                                                           o["facts_greedy"]],
                                "share_regained": regained, "facts_kept": kept, **intervals,
                                "sft_chains_t1": so and so["t1"], "sft_facts_greedy": so and so["facts_greedy"]},
                    "verdict": verdict})
    lengths_claim = length_claim(s.get("lengths"))
    if lengths_claim:
        out.append(lengths_claim)
    base_12 = ((s.get("lengths") or {}).get("lengths", {}).get("12") or {}).get("base", [float("nan")])[0]
    curve_claim = sft_curve_claim(s.get("sft_curve"), s.get("sft_curve_L12"), base_12)
    if curve_claim:
        out.append(curve_claim)
    if opd and sft:
        slips = {k: M[k]["probe_mark_after_slip"] for k in ("opd", "sft_fresh") if k in M}
        before = s["setting"]["diagnostics"]["probe_student"]["p_mark_slip"]
        learned = opd["probe_mark_after_slip"][1] > max(before, sft["probe_mark_after_slip"][2])
        ctrl = s.get("control")
        gain = opd["final_t1"]["mean"] - s["student_t1"]
        ctrl_gain = None if not ctrl else ctrl["final_t1"]["mean"] - s["student_t1"]
        matters = None if not ctrl else (opd["final_t1"]["lo"] > ctrl["final_t1"]["hi"])
        if learned and matters:
            verdict = "holds: OPD taught corrections, and the recovering teacher made the difference"
        elif learned:
            verdict = "partly: OPD taught corrections, but a teacher without them did as well"
        else:
            verdict = "does not hold as a recovery mechanism (no corrections learned); see the control"
        out.append({"claim": "on_policy_states", "published": PUBLISHED["on_policy_states"],
                    "numbers": {"p_mark_after_slip_before": before, "p_mark_after_slip": slips,
                                "opd_gain": gain, "opd_clean_teacher_gain": ctrl_gain,
                                "opd_final": opd["final_t1"], "control_final": ctrl and ctrl["final_t1"],
                                "teacher_p_mark_after_slip": s["setting"]["diagnostics"]["probe_teacher"][
                                    "p_mark_slip"]},
                    "verdict": verdict})
    return out


def length_claim(lengths: dict | None) -> dict | None:
    """RL vs OPD steps across episode lengths (`lengths.py`): per length, at 80% of RL's gain, the geometric-mean
    ratio with its interval (cadence and seed spread together). "Grows" needs the point estimates to rise with
    length and the longest length's interval to lie above the shortest's; the 7x rule per length as `lengths.py`
    combines it over seeds."""
    if not lengths or not lengths.get("lengths"):
        return None
    rows = {int(k): v for k, v in lengths["lengths"].items()}
    at80 = {k: v["80%"] for k, v in rows.items()}
    known = sorted(k for k, r in at80.items() if r["point"] is not None)
    rising = len(known) >= 2 and all(at80[a]["point"] < at80[b]["point"] for a, b in zip(known, known[1:],
                                                                                         strict=False))
    separated = rising and (at80[known[-1]]["lo"] or 0.0) > (at80[known[0]]["hi"] or math.inf)
    growth = ("the ratio grows with episode length" if separated else
              "the ratio rises with episode length in the point estimates; the intervals overlap" if rising else
              "no growth with episode length shown")
    sevens = {k: r["rule_7x"] for k, r in at80.items()}
    holds = [k for k, v in sevens.items() if v == "holds"]
    fails = [k for k, v in sevens.items() if v == "does not hold"]
    # every seed's brackets below 7x, yet the interval over seeds reaching 7x: said, not hidden in "does not hold"
    reach = [k for k in fails if at80[k]["hi"] is None or at80[k]["hi"] >= 7]
    seven = ("; 7x holds at " + ", ".join(map(str, holds)) + " steps" if holds else "") + \
        ("; 7x does not hold at " + ", ".join(map(str, fails)) + " steps (every seed below 7x" +
         ("; at " + ", ".join(map(str, reach)) + " the interval over seeds reaches 7x" if reach else "") + ")"
         if fails else "") + \
        ("; 7x undetermined at " + ", ".join(str(k) for k in sevens if k not in holds + fails) + " steps"
         if len(holds) + len(fails) < len(sevens) else "")
    return {"claim": "rl_steps_by_length", "published": PUBLISHED["rl_steps_by_length"],
            "numbers": {"per_length": {k: {"base": v["base"], "rl_final": v["rl_final"], "opd_final": v["opd_final"],
                                           "ratio_50": v["50%"], "ratio_80": v["80%"], "ratio_90": v["90%"],
                                           "lrs": [v["chosen"]["rl_lr"], v["chosen"]["opd_lr"]],
                                           "opd_kl_clip": v["chosen"].get("opd_kl_clip", 0.0)}
                                       for k, v in sorted(rows.items())},
                        # the same runs read without the 1/7 guess floor (every step's result right), and the
                        # replicates trained on that reward (lengths.py `lengths_steps_metric` / `_steps_reward`)
                        "steps_metric": {int(k): {"base": v["base"], "ratio_80": v["80%"]}
                                         for k, v in sorted(lengths.get("lengths_steps_metric", {}).items())},
                        "steps_reward": {int(k): {"base": v["base"], "rl_final": v["rl_final"],
                                                  "opd_final": v["opd_final"], "ratio_80": v["80%"]}
                                         for k, v in sorted(lengths.get("lengths_steps_reward", {}).items())}},
            "verdict": growth + seven}


def sft_curve_claim(curve: dict | None, curve_12: dict | None = None, base_12: float | None = None
                    ) -> dict | None:
    """SFT's data curve (`sft_curve.py`): log-linear stretch or not, at 4-6 steps and (when measured) at 12 steps,
    where `base_12` is the 12-step base student's test T=1 accuracy."""
    if not curve or not curve.get("sizes"):
        return None
    from opd_jax.miniature.protocol import shipped_record

    teacher_12 = (shipped_record("rl_teacher") or {}).get("test", {}).get("t1", {}).get("accuracy", float("nan"))

    def verdict_of(c: dict, where: str) -> str:
        st = c.get("log_linear_stretch")
        return (f"a log-linear stretch at {where} over " + "-".join(map(str, (st["sizes"][0], st["sizes"][-1])))
                + f" samples ({st['slope_per_doubling']:+.3f} per doubling)") if st else \
            f"no log-linear stretch at {where} (shape: {c.get('shape', 'undetermined')})"

    parts = [verdict_of(curve, "4-6 steps")] + ([verdict_of(curve_12, "12 steps")] if curve_12 else [])
    stretch = curve.get("log_linear_stretch") or (curve_12 or {}).get("log_linear_stretch")
    verdict = "; ".join(parts) + ("" if stretch else ": the published FLOPs comparison cannot be made here")
    return {"claim": "sft_data_curve", "published": PUBLISHED["sft_data_curve"],
            "numbers": {"sizes": {int(k): v["mean_ci"] for k, v in curve["sizes"].items()},
                        "stretch": curve.get("log_linear_stretch"),
                        "sizes_12": {int(k): v["mean_ci"] for k, v in (curve_12 or {}).get("sizes", {}).items()},
                        "stretch_12": (curve_12 or {}).get("log_linear_stretch"),
                        # the start and the data's writer: the 12-step base (lengths.py, test T=1) and the shipped RL
                        # teacher's record
                        "base_12": base_12, "teacher_12": teacher_12},
            "verdict": verdict}


def claim_row(c: dict) -> tuple[str, str]:
    """(result in words with numbers, verdict) for the README table."""
    n = c["numbers"]
    if c["claim"] == "rl_steps":
        rl = f"> {n['rl_steps']}" if n["rl_lower_bound"] else str(n["rl_steps"])
        ratio = "n/a" if n["ratio"] is None else (f"> {n['ratio']:.1f}x" if n["rl_lower_bound"] else
                                                  f"{n['ratio']:.1f}x")
        fo, fr = n["opd_final"], n["rl_final"]
        text = (f"steps to {n['target']:.3f}: OPD {n['opd_steps']}, RL {rl} (ratio {ratio}); final test T=1: OPD "
                f"{ci_str(fo['mean'], fo['lo'], fo['hi'])}, RL {ci_str(fr['mean'], fr['lo'], fr['hi'])}")
        if n.get("rl_long_final"):
            text += f", RL after its long run {n['rl_long_final']['accuracy']:.3f}"
        if n.get("ratio_interval"):
            lo, hi = n["ratio_interval"]
            text += (f"; at the eval cadence the ratio lies in [{lo:.2f}x, {'inf' if math.isinf(hi) else f'{hi:.2f}'}"
                     f"{'' if math.isinf(hi) else 'x'}]")
            if n.get("rule_7x_decidable", "yes") != "yes":
                text += f" ({n['rule_7x_decidable']})"
    elif c["claim"] == "sft_flops":
        fo, fs = n["opd_flops_to_target"], n["sft_flops_to_target"]
        r9, r30 = n["ratio_sft_student_over_opd_total"], n["ratio_sft_total_over_opd_total"]
        text = (f"FLOPs to target: OPD {sci(fo and fo['total'])} ({n['opd_steps']} steps), SFT on fresh samples "
                f"{sci(fs and fs['student'])} student + {sci(fs and fs['teacher'])} teacher sampling "
                f"({n['sft_steps']} steps); ratios {('n/a' if r9 is None else f'{r9:.2f}x')} (SFT data free), "
                f"{('n/a' if r30 is None else f'{r30:.2f}x')} (teacher sampling counted); final test T=1 OPD "
                f"{ci_str(n['opd_final']['mean'], n['opd_final']['lo'], n['opd_final']['hi'])}, SFT "
                f"{ci_str(n['sft_final']['mean'], n['sft_final']['lo'], n['sft_final']['hi'])}")
        if n.get("sft_fixed_final"):
            f2 = n["sft_fixed_final"]
            text += f", SFT on the fixed set {ci_str(f2['mean'], f2['lo'], f2['hi'])}"
    elif c["claim"] == "single_prompt":
        a, b = n["single_final"], n["full_opd_final"]
        closed = (f"closes {n['gap_closed']:.0%} of the student-teacher gap" if n["gap_closed"] >= 0 else
                  f"{n['student'] - a['mean']:.3f} below the student's start")
        distinct = len(set(n.get("prompts") or [None]))
        text = (f"one prompt x {n['samples']} samples x {n.get('steps', 60)} steps ({distinct} distinct prompt"
                f"{'s' if distinct > 1 else ''}, interval over them): final test T=1 {mci(a)} ({closed}) vs 16 "
                f"prompts x 4 {mci(b)} (closes {n['gap_closed_full_opd']:.0%}); teacher {n['teacher']:.3f}, "
                f"student {n['student']:.3f}")
        for o in n.get("other_shapes", []):
            text += (f"; one prompt x {o['samples']} x {o['steps']} steps {mci(o['final'])} (closes "
                     f"{o['gap_closed']:.0%})")
    elif c["claim"] == "rl_steps_by_length":
        def rng(r: dict) -> str:
            if r["point"] is None:
                return f"undetermined ({r.get('why', 'not reached')})"
            hi = "inf" if r["hi"] is None or not math.isfinite(r["hi"]) else f"{r['hi']:.2f}"
            return f"{r['point']:.2f}x [{r['lo'] or 0:.2f}, {hi}]"

        parts = [f"{k} steps: base {v['base'][0]:.2f}, RL {v['rl_final'][0]:.2f}, OPD {v['opd_final'][0]:.2f}; "
                 f"RL/OPD steps to 50% / 80% / 90% of RL's gain {rng(v['ratio_50'])} / {rng(v['ratio_80'])} / "
                 f"{rng(v['ratio_90'])}" for k, v in n["per_length"].items()]
        text = "; ".join(parts) + (" (test T=1; 3 seeds, each a whole protocol replicate; rates and OPD's KL clip "
                                   "chosen per length on validation; intervals: eval cadence and seed spread)")
        if n.get("steps_metric"):
            text += ("; read without the 1/7 guess floor (every step's result right), steps to 80%: "
                     + ", ".join(f"{rng(v['ratio_80'])} at {k} (base {v['base'][0]:.2f})"
                                 for k, v in n["steps_metric"].items()))
        if n.get("steps_reward"):
            text += ("; RL trained on that every-step reward: "
                     + ", ".join(f"{k} steps: base {v['base'][0]:.2f}, RL {v['rl_final'][0]:.2f}, OPD "
                                 f"{v['opd_final'][0]:.2f}, steps to 80% {rng(v['ratio_80'])}"
                                 for k, v in n["steps_reward"].items()))
    elif c["claim"] == "sft_data_curve":
        text = ", ".join(f"{k}: {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in n["sizes"].items())
        text = "test T=1 at the best validation step, by samples: " + text + " (2 seeds)"
        if n.get("sizes_12"):
            text += (f"; at 12 steps, from the protocol's base ({n['base_12']:.2f}) on the RL teacher's samples "
                     f"with every step right (teacher T=1 {n['teacher_12']:.2f}): "
                     + ", ".join(f"{k}: {v[0]:.2f}" for k, v in n["sizes_12"].items())
                     + " (2 seeds)")
    elif c["claim"] == "recovery":
        ch, fa = n["chains_t1"], n["facts_greedy"]
        seeds = n.get("seeds", 1)
        rg, kp = n.get("share_regained_ci"), n.get("facts_kept_ci")
        over = (f"{seeds} seeds, {n['old_fraction']:.0%} old data in mid-training; means with t intervals over "
                "seeds: " if seeds > 1 else "")
        text = (f"{over}chains test T=1 {ch[0]['accuracy']:.3f} -> {ch[1]['accuracy']:.3f} (mid-training) -> "
                f"{ch[2]['accuracy']:.3f} [{ch[2]['ci_low']:.3f}, {ch[2]['ci_high']:.3f}] after OPD "
                f"({n['share_regained']:.0%}"
                + (f" [{rg[1]:.0%}, {rg[2]:.0%}]" if seeds > 1 else "")
                + f" of the loss regained); facts {fa[0]['accuracy']:.3f} -> {fa[1]['accuracy']:.3f} -> "
                f"{fa[2]['accuracy']:.3f} ({n['facts_kept']:.0%}"
                + (f" [{kp[1]:.0%}, {kp[2]:.0%}]" if seeds > 1 else "") + " kept)")
        if n.get("sft_chains_t1"):
            text += (f"; SFT instead: chains {n['sft_chains_t1']['accuracy']:.3f}, facts "
                     f"{n['sft_facts_greedy']['accuracy']:.3f}")
    else:
        p = n["p_mark_after_slip"]
        parts = ", ".join(f"{LABELS.get(k, k)} {v[0]:.3f}" for k, v in p.items())
        text = (f"P('!' after an injected slip): teacher {n['teacher_p_mark_after_slip']:.2f}, student before "
                f"{n['p_mark_after_slip_before']:.3f}, after {parts}; test T=1 gain of OPD {n['opd_gain']:+.3f}")
        if n.get("opd_clean_teacher_gain") is not None:
            text += f", with a teacher that never saw corrections {n['opd_clean_teacher_gain']:+.3f}"
    return text, c["verdict"]


# ---- plots -----------------------------------------------------------------------------------------------------
def plots(s: dict, results: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str) -> str:
        fig.tight_layout()
        path = os.path.join(results, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    out = {}
    M = s["methods"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for m, d in M.items():
        xs = [c["step"] for c in d["curve"]]
        ax[0].plot(xs, [c["mean"] for c in d["curve"]], marker="o", color=COLORS[m],
                   label=f"{LABELS[m]} (lr {d['lr']:g})")
        ax[0].fill_between(xs, [c["lo"] for c in d["curve"]], [c["hi"] for c in d["curve"]], color=COLORS[m],
                           alpha=0.15)
    if s.get("control"):
        xs = [c["step"] for c in s["control"]["curve"]]
        ax[0].plot(xs, [c["mean"] for c in s["control"]["curve"]], marker="x", ls="--",
                   color=COLORS["opd_clean_teacher"], label="OPD, teacher without corrections")
    for a in ax:
        a.axhline(s["teacher_t1"], color="k", ls=":", lw=1, label="teacher")
        a.axhline(s["target"], color="gray", ls="--", lw=1, label="target (halfway)")
    ax[0].set(xlabel="step", ylabel="test accuracy (T=1)", title="mean of 3 seeds, 95% interval over seeds")
    ax[0].legend(fontsize=7)
    if s.get("rl_long"):
        c = s["rl_long"]["curve"]
        ax[1].plot([x[0] for x in c], [x[1] for x in c], marker="o", color=COLORS["rl"], label="RL, run long")
        ax[1].fill_between([x[0] for x in c], [x[2] for x in c], [x[3] for x in c], color=COLORS["rl"], alpha=0.15)
    if "opd" in M:
        ax[1].plot([c["step"] for c in M["opd"]["curve"]], [c["mean"] for c in M["opd"]["curve"]], marker="o",
                   color=COLORS["opd"], label="OPD")
    ax[1].set(xlabel="step", ylabel="test accuracy (T=1)", title="RL run long (one seed) vs OPD")
    ax[1].legend(fontsize=7)
    out["steps"] = save(fig, "accuracy_vs_steps.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, d in M.items():
        f = d["flops_per_step"]
        xs = [c["step"] * (f["student"] + f["teacher"]) for c in d["curve"] if c["step"] > 0]
        ys = [c["mean"] for c in d["curve"] if c["step"] > 0]
        ax.plot(xs, ys, marker="o", color=COLORS[m], label=LABELS[m])
        if f["teacher"]:
            xs2 = [c["step"] * f["student"] for c in d["curve"] if c["step"] > 0]
            ax.plot(xs2, ys, ls=":", color=COLORS[m], label=f"{LABELS[m]}, student FLOPs only")
    ax.axhline(s["target"], color="gray", ls="--", lw=1, label="target")
    ax.axhline(s["teacher_t1"], color="k", ls=":", lw=1, label="teacher")
    ax.set_xscale("log")
    ax.set(xlabel="FLOPs (student + teacher; dotted: student only)", ylabel="test accuracy (T=1)",
           title="accuracy vs FLOPs (opd_jax.flops)")
    ax.legend(fontsize=7)
    out["flops"] = save(fig, "accuracy_vs_flops.png")

    sweep = s["summary"]["sweep"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m, d in sweep.items():
        lrs = sorted(float(k) for k in d["val_score"])
        ax.plot(lrs, [d["val_score"][next(k for k in d["val_score"] if float(k) == lr)] for lr in lrs], marker="o",
                color=COLORS[m], label=LABELS[m])
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (warmup, then constant)", ylabel="validation accuracy (T=1), last 2 evals",
           title="learning-rate sweep (seed 0), chosen on validation")
    ax.legend(fontsize=7)
    out["sweep"] = save(fig, "lr_sweep.png")

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    if s.get("single_prompt") and "opd" in M:
        singles = [(f"one prompt x {sh['samples_per_step']} samples", sh["curve"], color)
                   for sh, color in zip(s["single_prompt"]["shapes"], ("tab:orange", "tab:red", "tab:brown"),
                                        strict=False)]
        for label, curve, color in (*singles, ("16 prompts x 4 samples", M["opd"]["curve"], COLORS["opd"])):
            xs = [c["step"] for c in curve]
            ax[0].plot(xs, [c["mean"] for c in curve], marker="o", color=color, label=label)
            ax[0].fill_between(xs, [c["lo"] for c in curve], [c["hi"] for c in curve], color=color, alpha=0.15)
        ax[0].axhline(s["teacher_t1"], color="k", ls=":", lw=1, label="teacher")
        ax[0].set(xlabel="OPD step", ylabel="test accuracy (T=1)",
                  title=f"single-prompt OPD ({len(set(s['single_prompt']['prompts']))} prompts)")
        ax[0].legend(fontsize=7)
    rec = s.get("recovery")
    if rec:
        points = [k for k in ("before", "after_midtrain", "after_opd", "after_sft_fresh") if k in rec]
        xs = range(len(points))
        ax[1].bar([x - 0.2 for x in xs], [rec[p]["t1"]["accuracy"] for p in points], width=0.4,
                  label="chains (test, T=1)")
        ax[1].bar([x + 0.2 for x in xs], [rec[p]["facts_greedy"]["accuracy"] for p in points], width=0.4,
                  label="new facts (greedy)")
        ax[1].set_xticks(list(xs), [p.replace("after_", "after ").replace("sft_fresh", "SFT").replace("opd", "OPD")
                                    for p in points], fontsize=8)
        ax[1].set(ylim=(0, 1.15), title="recovery (mid-training on facts, then OPD)")
        ax[1].legend(fontsize=7, loc="upper center", ncol=2)
    out["extras"] = save(fig, "single_prompt_and_recovery.png")
    return out


# ---- markdown --------------------------------------------------------------------------------------------------
def claims_md(cl: list[dict], s: dict, rel: str) -> str:
    names = {"rl_steps": "Steps to a target vs RL", "sft_flops": "FLOPs to a target vs SFT",
             "single_prompt": "Single-prompt reuse", "recovery": "Recovery of a forgotten skill, keeping new knowledge",
             "on_policy_states": "Learning in the states the student reaches",
             "rl_steps_by_length": "Steps vs RL across episode lengths", "sft_data_curve": "SFT's data curve"}
    lines = ["| claim (published) | prediction (written before the runs) | result (test set, 95% intervals) | "
             "verdict |", "|---|---|---|---|"]
    pred_path = os.path.join(HERE, "predictions.json")
    preds = load(pred_path) if os.path.exists(pred_path) else {}
    for c in cl:
        text, verdict = claim_row(c)
        lines.append(f"| **{names[c['claim']]}**: {c['published']} | {preds.get(c['claim'], '')} | {text} | "
                     f"**{verdict}** |")
    w = s["summary"]
    lines += ["", f"Teacher {s['teacher_t1']:.3f}, student {s['student_t1']:.3f} (test accuracy at T=1); target "
              f"{s['target']:.3f}. {wall_sentence(w)} (`{rel}/timing.json`).", "",
              f"![accuracy vs steps]({rel}/accuracy_vs_steps.png)",
              f"![accuracy vs FLOPs]({rel}/accuracy_vs_flops.png)",
              f"![single prompt and recovery]({rel}/single_prompt_and_recovery.png)"]
    if s.get("lengths"):
        lines.append(f"![steps ratio vs episode length]({rel}/lengths/steps_ratio_vs_length.png)")
    if s.get("sft_curve"):
        lines.append(f"![SFT data curve]({rel}/sft_curve/sft_curve.png)")
    if s.get("sft_curve_L12"):
        lines.append(f"![SFT data curve, 12 steps]({rel}/sft_curve_L12/sft_curve.png)")
    return "\n".join(lines)


def results_md(s: dict, cl: list[dict]) -> str:
    st, M = s["setting"], s["methods"]
    t, u = st["teacher"], st["student"]
    L = ["# OPD-claims miniature: results", "",
         "Every number below is computed by `report.py` from the JSON files in this directory (`runs/*.json` per "
         "run, `setting.json`, `diagnostics.json`, `capacity.json`, `recovery.json`, `negative_control.json`, "
         "`summary.json`); each run's per-step metrics are in `runs/*.metrics.jsonl`.", "", "## Claims", "",
         claims_md(cl, s, "."), "", "## Setting", "",
         "| model | test accuracy T=1 | greedy | trained |", "|---|---|---|---|"]
    shapes = st.get("models", {})

    def shape(who: str) -> str:
        m = shapes.get(who)
        return f" ({m['num_layers']} layers, hidden {m['hidden_size']})" if m else ""

    for name, d in ((f"teacher{shape('teacher')}", t), (f"student{shape('student')}", u)):
        secs = d.get("teacher_seconds") or d.get("student_seconds")
        L.append(f"| {name} | {acc(d['test']['t1'])} | {acc(d['test']['greedy'])} | {secs:.0f}s |")
    cap = s.get("capacity")
    if cap:
        L.append(f"| capacity check: the student's shape trained like the teacher ({cap['steps']} steps on its data) | "
                 f"{acc(cap['test']['t1'])} | {acc(cap['test']['greedy'])} | {cap['teacher_seconds']:.0f}s |")
    if cap and cap.get("errors_t1"):
        e = cap["errors_t1"]
        spurious = e["spurious_corrections_per_completion"]
        L.append(f"\nThe capacity model matches the teacher greedily, but at T=1 it writes {spurious:.2f} spurious "
                 "corrections per completion ('!' after a right result, then a different "
                 f"digit; first errors {e['first_error_kind']}): in its 1200 steps the 2-layer shape learned the facts "
                 "but not when a result is wrong.")
    long_ = s.get("rl_long")
    if long_:
        L.append(f"\nThe student itself reaches the teacher's level with more training: RL run {long_['steps']} steps "
                 f"took it to {acc(long_['final_t1'])} at T=1 and {acc(long_['final_greedy'])} greedy.")
    dg = s.get("diagnostics") or {}
    if dg:
        pt, ps = dg["probe_teacher"], dg["probe_student"]
        L += ["", "Continuing from a slip it did not make (teacher-forced scratchpads of test problems with one wrong "
              "result; `measure.correction_probe`):", "",
              "| model | P('!' after a wrong result) | P('!' after a right result) | P(right digit after '!') |",
              "|---|---|---|---|",
              f"| teacher | {pt['p_mark_slip']:.3f} | {pt['p_mark_clean']:.3f} | {pt['p_right_after_mark']:.3f} |",
              f"| student | {ps['p_mark_slip']:.3f} | {ps['p_mark_clean']:.3f} | {ps['p_right_after_mark']:.3f} |"]
        for who in ("student", "teacher"):
            e = dg.get(f"errors_{who}_t1")
            if e:
                L.append(f"\n{who.capitalize()}'s own T=1 test completions: first errors {e['first_error_kind']} "
                         f"(by step {e['first_error_step']}), genuine corrections "
                         f"{e['genuine_corrections_per_completion']:.3f} "
                         f"and spurious ones {e['spurious_corrections_per_completion']:.3f} per completion.")
    width = max(len(d["val_score"]) for d in s["summary"]["sweep"].values())
    L += ["", "## Learning-rate sweeps (seed 0, validation split, T=1; mean of the last two evals)", "",
          "| method | " + " | ".join(["lr: val accuracy"] * width) + " | chosen |",
          "|---" * (width + 2) + "|"]
    for m, d in s["summary"]["sweep"].items():
        cells = []
        for k, v in sorted(d["val_score"].items(), key=lambda kv: float(kv[0])):
            rec = s["records"].get(f"{m}_lr{float(k):g}_s{s['summary']['plan']['sweep_seed']}")
            last = f" (last eval {acc(rec['curve'][-1]['val'])})" if rec else ""
            cells.append(f"{float(k):g}: {v:.3f}{last}")
        L.append(f"| {LABELS[m]} | " + " | ".join(cells + [""] * (width - len(cells))) + f" | {d['best_lr']:g} |")
    L += ["", "![lr sweep](lr_sweep.png)", "",
          f"## Final accuracy at the chosen rates ({len(s['summary']['plan']['seeds'])} seeds)", "",
          "| method | lr | test T=1 (mean, 95% CI over seeds) | per seed (95% Wilson CI) | test greedy | KL to teacher "
          "(nats/token) | val T=1 |", "|---|---|---|---|---|---|---|"]
    L.append(f"| student (start) | | {acc(st['student']['test']['t1'])} | | {acc(st['student']['test']['greedy'])} | "
             f"| |")
    for m, d in M.items():
        f, g, v = d["final_t1"], d["final_greedy"], d["final_val_t1"]
        per = "; ".join(f"{r['accuracy']:.3f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" for r in f["per_run"])
        L.append(f"| {LABELS[m]} | {d['lr']:g} | {ci_str(f['mean'], f['lo'], f['hi'])} | {per} | "
                 f"{ci_str(g['mean'], g['lo'], g['hi'])} | {ci_str(*d['kl'])} | {v['mean']:.3f} |")
    if s.get("control"):
        c = s["control"]
        L.append(f"| OPD, teacher without corrections (control) | {M['opd']['lr']:g} | "
                 f"{ci_str(c['final_t1']['mean'], c['final_t1']['lo'], c['final_t1']['hi'])} | | "
                 f"{ci_str(c['final_greedy']['mean'], c['final_greedy']['lo'], c['final_greedy']['hi'])} | "
                 f"{ci_str(*c['kl'])} | |")
    L += ["", "![accuracy vs steps](accuracy_vs_steps.png)", "", "## Steps and FLOPs to the target", "",
          f"Target {s['target']:.3f} (halfway from the student's {s['student_t1']:.3f} to the teacher's "
          f"{s['teacher_t1']:.3f}).", "",
          "| method | steps to target | student FLOPs/step | teacher FLOPs/step | FLOPs to target (student + "
          "teacher) |",
          "|---|---|---|---|---|"]
    for m, d in M.items():
        ft = d["flops_to_target"]
        L.append(f"| {LABELS[m]} | {d['steps_to_target'] if d['steps_to_target'] is not None else 'not reached'} | "
                 f"{sci(d['flops_per_step']['student'])} | {sci(d['flops_per_step']['teacher'])} | "
                 f"{'n/a' if ft is None else sci(ft['student']) + ' + ' + sci(ft['teacher'])} |")
    if s.get("rl_long"):
        r = s["rl_long"]
        L.append(f"\nRL run long ({r['steps']} steps, seed 0): final test T=1 {r['final_t1']['accuracy']:.3f} "
                 f"[{r['final_t1']['ci_low']:.3f}, {r['final_t1']['ci_high']:.3f}], greedy "
                 f"{r['final_greedy']['accuracy']:.3f}; target reached at step "
                 f"{r['steps_to_target'] if r['steps_to_target'] is not None else 'never'}.")
    L += ["", "![accuracy vs FLOPs](accuracy_vs_flops.png)", "", "## Mechanism: corrections after slips", "",
          "| method | P('!' after an injected slip) | P('!' after a right result) | genuine corrections per "
          "completion |",
          "|---|---|---|---|"]
    for m, d in M.items():
        L.append(f"| {LABELS[m]} | {ci_str(*d['probe_mark_after_slip'])} | {ci_str(*d['probe_mark_after_clean'])} | "
                 f"{ci_str(*d['genuine_corrections'])} |")
    sp = s.get("single_prompt")
    if sp:
        L += ["", "## Single prompt", ""]
        for sh in sp["shapes"]:
            prompts = [p for p in sh["prompts"] if p]
            which = (f"all {len(prompts)} seeds drew the same prompt, {prompts[0]}") if len(set(prompts)) == 1 else \
                f"one prompt per seed: {', '.join(prompts)}"
            per = ", ".join(f"{v:.3f}" for v in sh["final_t1"]["values"])
            L += [f"- OPD on one training prompt x {sh['samples_per_step']} samples a step for {sh['steps']} steps "
                  f"({which}): final test T=1 {mci(sh['final_t1'])} (per prompt {per}; the interval is the "
                  f"prompt-to-prompt spread), greedy {mci(sh['final_greedy'])}."]
    rec = s.get("recovery")
    if rec:
        L += ["", "## Recovery", "", f"The teacher (the 'original model') mid-trained by SFT on {rec['facts']} new "
              f"facts ({rec['old_fraction']:.0%} old chains rows, {rec['midtrain_steps']} steps, lr "
              f"{rec['midtrain_lr']:g}), then OPD on chains prompts against its own pre-mid-training weights, next to "
              "SFT on that model's samples with the same steps.", "",
              "| point | chains test T=1 | chains greedy | facts greedy | facts T=1 |", "|---|---|---|---|---|"]
        for k in ("before", "after_midtrain", "after_opd", "after_sft_fresh"):
            if k in rec:
                r = rec[k]
                L.append(f"| {k.replace('_', ' ')} | {acc(r['t1'])} | {acc(r['greedy'])} | "
                         f"{acc(r['facts_greedy'])} | {acc(r['facts_t1'])} |")
        L += ["", "![single prompt and recovery](single_prompt_and_recovery.png)"]
    nc = s.get("negative_control")
    if nc:
        arms_ = nc["arms"]
        L += ["", "## Negative control: the old arithmetic miniature's eval overlap", "",
              f"Recounted from experiments/mini_reasoning's own streams (`negative_control.py`): its "
              f"{nc['eval_problems']} eval problems ({nc['eval_distinct']} distinct, from a space of "
              f"{nc['problem_space']}) are all in the teacher's training stream ({nc['in_teacher_stream']}), "
              f"{nc['in_student_sft_prompts']} in the student's SFT prompts; the comparison's SFT arm saw the "
              f"teacher's solutions to {min(a['sft_teacher_solutions'] for a in arms_.values())}-"
              f"{max(a['sft_teacher_solutions'] for a in arms_.values())} of them, OPD/RL "
              f"{min(a['opd_rl_prompts'] for a in arms_.values())}-{max(a['opd_rl_prompts'] for a in arms_.values())}"
              " as prompts."]
    w = s["summary"]
    L += ["", "## Wall time", "", f"{wall_sentence(w)}. By stage (each stage's own wall time; with several "
          "workers the stages overlap, so these add up to more than the whole): " +
          ", ".join(f"{k} {v:.0f}s" for k, v in w["stage_s"].items()) + "."]
    return "\n".join(L) + "\n"


def replace_between(path: str, text: str, start: str = "<!-- claims:start -->",
                    end: str = "<!-- claims:end -->") -> bool:
    """Replace the text between the two markers of `path` (False when the file or the markers are missing)."""
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    pat = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pat.search(doc):
        return False
    doc = pat.sub(lambda _: f"{start}\n{text}\n{end}", doc)
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README claims sections")
    a = p.parse_args(argv)
    s = summarize(a.results)
    cl = claims(s)
    plots(s, a.results)
    slim = {k: v for k, v in s.items() if k not in ("records",)}
    with open(os.path.join(a.results, "claims.json"), "w", encoding="utf-8") as f:
        json.dump({"claims": cl, "target": s["target"], "teacher_t1": s["teacher_t1"], "student_t1": s["student_t1"],
                   "methods": {m: {k: v for k, v in d.items() if k != "curve"} for m, d in s["methods"].items()}},
                  f, indent=1, default=str)
    with open(os.path.join(a.results, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_md(s, cl))
    del slim
    if not a.no_readme and os.path.abspath(a.results) == os.path.join(HERE, "results"):
        replace_between(os.path.join(HERE, "README.md"), claims_md(cl, s, "results"))
        replace_between(os.path.join(REPO, "README.md"), claims_md(cl, s, "experiments/opd_chains/results"))
    for c in cl:
        print(f"{c['claim']}: {c['verdict']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
