"""The length-collapse guard: a watch on the step's own metrics for the failure of OPD far from its teacher.

What it watches for (issue #26, `experiments/opd_collapse/`): a student far below its teacher, trained with the
published per-token reverse KL (discount 0), drifts into loops that the teacher scores well token by token (a wrong
value, the correction marker, a value, the marker, ...). Its rollouts then run to `sampling.max_new_tokens`: the
truncation rate climbs from 0 to 1 and the mean length to the limit, while the per-token KL falls a little (the loop's
tokens are cheap) and the KL per rollout does not fall at all. Held-out accuracy goes to 0.

The rule (`CollapseGuard.update`, each step): over the last `guard.window` steps, the mean truncation rate has risen
by at least `guard.truncation_rise` above its level in the run's first `guard.window` steps, and the mean reverse KL
per rollout (`teacher_kl` x `mean_length`, nats) has not fallen below `(1 - guard.kl_fall)` of its first-window level.
A run that lengthens *because* it moves towards a longer-writing teacher has its per-rollout KL falling, and does not
fire. Runs whose step has no teacher KL (pure RL, SFT) are not watched.

`guard.on_collapse`: "warn" (default) prints one line once when the rule first holds; "stop" also stops the run after
that step with a checkpoint (`Trainer.run` returns `collapsed_at`, `opd-jax train` exits with code 3); "off" skips the
watch. Every watched step logs `guard/truncation_rise`, `guard/rollout_kl_ratio` and `guard/collapse` (0/1).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from opd_jax.config.schema import GuardConfig

EXIT_COLLAPSED = 3  # `opd-jax train` after `guard.on_collapse: stop` fired


@dataclass
class CollapseReport:
    step: int
    truncation_start: float
    truncation_now: float
    rollout_kl_start: float
    rollout_kl_now: float
    length_start: float
    length_now: float

    def message(self, cfg: GuardConfig) -> str:
        return (f"length collapse at step {self.step}: truncation rate {self.truncation_start:.2f} -> "
                f"{self.truncation_now:.2f}, mean length {self.length_start:.1f} -> {self.length_now:.1f} tokens, "
                f"while the reverse KL per rollout did not fall ({self.rollout_kl_start:.1f} -> "
                f"{self.rollout_kl_now:.1f} nats; means over {cfg.window} steps). The student is drifting into loops "
                "its teacher scores well token by token (experiments/opd_collapse/README.md); mitigation: "
                + MITIGATION)


MITIGATION = ("loss.discount=0.9 (charge each token the KL of what follows it; it prevented the collapse in every run "
              "of experiments/opd_collapse and cost nothing near the teacher), or a student closer to its teacher")


class CollapseGuard:
    """Feed it each step's metrics (`update`); it returns the guard metrics to log and, once, a `CollapseReport`."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.first: list[tuple[float, float, float]] = []  # (truncation, rollout KL, length) of the first window
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=cfg.window)
        self.report: CollapseReport | None = None

    def state(self) -> dict:
        """What a checkpoint keeps, so a resumed run compares with the same first window and does not warn twice."""
        return {"first": [list(r) for r in self.first], "recent": [list(r) for r in self.recent],
                "fired_at": None if self.report is None else self.report.step}

    def restore(self, state: dict) -> None:
        self.first = [tuple(r) for r in state.get("first", [])][: self.cfg.window]
        self.recent = deque((tuple(r) for r in state.get("recent", [])), maxlen=self.cfg.window)
        if state.get("fired_at") is not None:  # already warned (or stopped) before the resume: not again
            self.report = CollapseReport(int(state["fired_at"]), *(float("nan"),) * 6)

    @staticmethod
    def watches(metrics: dict) -> bool:
        """Whether the step's metrics carry what the rule reads (a teacher KL and the rollouts' truncation)."""
        return all(k in metrics for k in ("truncation_rate", "mean_length", "teacher_kl"))

    def update(self, step: int, metrics: dict) -> tuple[dict, CollapseReport | None]:
        """(guard metrics for this step, a report the first time the rule holds, else None)."""
        if self.cfg.on_collapse == "off" or not self.watches(metrics):
            return {}, None
        row = (float(metrics["truncation_rate"]), float(metrics["teacher_kl"]) * float(metrics["mean_length"]),
               float(metrics["mean_length"]))
        if not all(math.isfinite(x) for x in row):  # a skipped (non-finite) step says nothing about the rollouts
            return {}, None
        if len(self.first) < self.cfg.window:
            self.first.append(row)
        self.recent.append(row)
        if len(self.first) < self.cfg.window or len(self.recent) < self.cfg.window:
            return {}, None
        n = self.cfg.window
        t0, kl0, len0 = (sum(r[i] for r in self.first) / n for i in range(3))
        t1, kl1, len1 = (sum(r[i] for r in self.recent) / n for i in range(3))
        rise = t1 - t0
        ratio = kl1 / kl0 if kl0 > 0 else float("nan")
        fired = rise >= self.cfg.truncation_rise and kl0 > 0 and ratio >= 1.0 - self.cfg.kl_fall
        out = {"guard/truncation_rise": rise, "guard/rollout_kl_ratio": ratio, "guard/collapse": float(fired)}
        new = None
        if fired and self.report is None:
            self.report = new = CollapseReport(step, t0, t1, kl0, kl1, len0, len1)
        return out, new
