"""Ratio rules that can see the effect: "method B needs >= R times the steps of method A to reach a target", judged
with what the eval cadence and the run lengths can resolve.

Steps-to-target are read off eval curves, so a run that first shows the target at eval step `t` reached it somewhere
in `(t - every, t]`, and a run that never shows it within its `steps` reached it (if ever) after `steps`. The ratio
`steps_B / steps_A` is therefore an interval, and a rule is decided only when that whole interval is on one side of
the threshold:

    holds               the smallest ratio the evals allow is >= the threshold
    does not hold       the largest is < the threshold
    undetermined at     the threshold is inside the interval (a finer cadence or longer runs would decide)
    this eval cadence

`measurable_range` gives the smallest and largest ratios a design can establish with both runs reaching the target:
with evals every 10 steps and 60-step runs the largest is 5x, so a ">= 7x" rule could pass only if B never reached
the target (issue #22's measurement cap). `check_rule_decidable` says whether a threshold can both pass and fail
under a design.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepsBracket:
    """Where on the step axis a run reached its target: in `(lo, hi]`; `hi = inf` when it did not within its run."""

    lo: float
    hi: float

    @property
    def reached(self) -> bool:
        return math.isfinite(self.hi)


def steps_bracket(curve: Sequence[dict], target: float, *, every: int, steps: int, key: str = "mean",
                  sustained: int = 1) -> StepsBracket:
    """The bracket of the first eval step after the start whose `key` reaches `target` and stays there for
    `sustained` evals in a row (the last evals of a run count as far as they go), so one noisy eval above a target
    the run then falls below does not count.

    curve: rows `{"step": int, key: float}` (step 0 = the start), evaluated every `every` steps up to `steps`. A run
    that never reaches it: `(last step evaluated, inf)` (a run stopped early is not credited with steps it did not
    run). Raises ValueError when `every`, `steps` or `sustained` is not positive."""
    if every <= 0 or steps <= 0 or sustained <= 0:
        raise ValueError(f"every, steps and sustained must be positive, got {every}, {steps}, {sustained}")
    rows = sorted(curve, key=lambda r: r["step"])
    for i, row in enumerate(rows):
        if row["step"] > 0 and all(r[key] >= target for r in rows[i:i + sustained]):
            return StepsBracket(max(row["step"] - every, 0), row["step"])
    return StepsBracket(rows[-1]["step"] if rows else steps, math.inf)


@dataclass(frozen=True)
class RatioVerdict:
    """`ratio_lo`/`ratio_hi`: the interval of steps_B / steps_A the curves allow; `verdict` as in the module doc."""

    ratio_lo: float
    ratio_hi: float
    threshold: float
    verdict: str


def ratio_rule(a: StepsBracket, b: StepsBracket, threshold: float) -> RatioVerdict:
    """Whether B needs >= `threshold` x the steps of A to reach the target (A: OPD, B: RL in the published claim).

    A that never reached the target: "does not hold" (there is nothing to compare). Raises ValueError for a
    threshold <= 0."""
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    if not a.reached and not b.reached:
        return RatioVerdict(0.0, math.inf, threshold, "undetermined at this eval cadence (neither reached it)")
    if not a.reached:
        return RatioVerdict(0.0, b.hi / max(a.lo, 1e-9), threshold, "does not hold (A did not reach the target)")
    # A reached in (a.lo, a.hi], B in (b.lo, b.hi]; a step count is at least 1 (step 0 is the start)
    lo = max(b.lo, 1.0) / a.hi
    hi = b.hi / max(a.lo, 1.0)
    if lo >= threshold:
        verdict = "holds"
    elif hi < threshold:
        verdict = "does not hold"
    else:
        verdict = "undetermined at this eval cadence"
    return RatioVerdict(lo, hi, threshold, verdict)


def measurable_range(*, every_a: int, steps_a: int, every_b: int, steps_b: int) -> tuple[float, float]:
    """(smallest, largest) ratio steps_B / steps_A that the evals can establish *for certain* with both runs reaching
    the target: the largest is B's lower bracket at its last eval over A's first eval; the smallest is B's first
    eval over A's lower bracket at its last eval. Raises ValueError when a cadence exceeds its run."""
    for name, every, steps in (("a", every_a, steps_a), ("b", every_b, steps_b)):
        if not 0 < every <= steps:
            raise ValueError(f"need 0 < every_{name} <= steps_{name}, got {every} and {steps}")
    last_a, last_b = steps_a - steps_a % every_a, steps_b - steps_b % every_b
    return every_b / max(last_a - every_a, 1), (last_b - every_b) / every_a


def check_rule_decidable(threshold: float, *, every_a: int, steps_a: int, every_b: int, steps_b: int) -> str | None:
    """None when a ">= threshold" rule can both pass and fail under this design, with both runs reaching the
    target (a pass that needs B to fail is no measurement of the ratio); else the reason in one line."""
    lo, hi = measurable_range(every_a=every_a, steps_a=steps_a, every_b=every_b, steps_b=steps_b)
    design = f"evals every {every_a}/{every_b} steps over {steps_a}/{steps_b} steps"
    if hi < threshold:
        return f"a >= {threshold:g}x rule cannot pass: {design} establish ratios up to {hi:g}x"
    if lo >= threshold:
        return f"a >= {threshold:g}x rule cannot fail: {design} establish no ratio below {lo:g}x"
    return None
