"""Where chains completions go wrong, and whether they recover: a parser of the scratchpad against the problem.

For each completion: the first error (a wrong copy of a step's label / previous value / operation / operand, or a
wrong result that is not corrected), the corrections it makes ('!' after a wrong result followed by the right
one: genuine; '!' after a right result: spurious), and whether it ends right.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from opd_jax.data.chains import CORRECTION, LABELS, apply_op, parse_chain
from opd_jax.miniature.setup import TASK

MOD = int(dict(f.split("=") for f in TASK.split(":") if "=" in f).get("mod", 10))


def walk(text: str, comp: str, mod: int = MOD) -> dict:
    """Parse one completion of problem `text`: first error (kind, step) or None, genuine and spurious corrections,
    and slips (wrong results) the completion did / did not correct."""
    c = parse_chain(text, mod)
    v, i = c.start, 0
    out = {"first_error": None, "genuine": 0, "spurious": 0, "slips_fixed": 0}
    for k, (op, b) in enumerate(c.ops):
        if comp[i: i + 4] != f"{LABELS[k]}{v}{op}{b}":
            out["first_error"] = ("copy", k)
            return out
        i += 4
        nv = apply_op(v, op, b, mod)
        while True:
            if i >= len(comp):
                out["first_error"] = ("fact", k)
                return out
            digit = comp[i]
            if i + 1 < len(comp) and comp[i + 1] == CORRECTION:
                if digit == str(nv):
                    out["spurious"] += 1
                else:
                    out["genuine"] += 1
                    out["slips_fixed"] += 1
                i += 2
                continue
            break
        if digit != str(nv):
            out["first_error"] = ("fact", k)
            return out
        v, i = nv, i + 1
    return out


def error_profile(rows: Iterable[dict], mod: int = MOD) -> dict:
    """Over eval rows (with completions): accuracy, first-error kinds and steps, corrections."""
    n = correct = genuine = spurious = fixed = recovered = 0
    kinds: collections.Counter = collections.Counter()
    steps: collections.Counter = collections.Counter()
    for r in rows:
        per = r["correct"] / r["k"]
        correct += per * len(r["completions"])
        for comp in r["completions"]:
            n += 1
            w = walk(r["text"], comp, mod)
            genuine += w["genuine"]
            spurious += w["spurious"]
            fixed += w["slips_fixed"] > 0
            if w["first_error"] is None:
                recovered += w["slips_fixed"] > 0
            else:
                kinds[w["first_error"][0]] += 1
                steps[w["first_error"][1]] += 1
    return {"completions": n, "accuracy": correct / max(n, 1), "first_error_kind": dict(kinds),
            "first_error_step": {str(k): v for k, v in sorted(steps.items())},
            "genuine_corrections_per_completion": genuine / max(n, 1),
            "spurious_corrections_per_completion": spurious / max(n, 1),
            "share_with_a_fixed_slip": fixed / max(n, 1), "share_right_after_fixing_a_slip": recovered / max(n, 1)}
