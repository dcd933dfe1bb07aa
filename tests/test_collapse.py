"""The length collapse of OPD far from its teacher (issue #26, experiments/opd_collapse): the guard's rule on
metric sequences, its config, its checkpointed state and exit code, and the reproduction itself, where the guard must
stop the published recipe and stay quiet under the mitigation (loss.discount=1)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from opd_jax.config import ConfigError, apply_overrides, config_from_dict
from opd_jax.config.schema import GuardConfig
from opd_jax.guards import EXIT_COLLAPSED, CollapseGuard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(truncation: list[float], kl_per_token: list[float], length: list[float]) -> list[dict]:
    return [{"truncation_rate": t, "teacher_kl": k, "mean_length": n}
            for t, k, n in zip(truncation, kl_per_token, length, strict=True)]


def fire_step(metrics: list[dict], cfg: GuardConfig | None = None) -> int | None:
    guard = CollapseGuard(cfg or GuardConfig())
    for step, m in enumerate(metrics, 1):
        _, report = guard.update(step, m)
        if report is not None:
            return report.step
    return None


# The shape measured in experiments/opd_collapse (reproduction, seed 0, rounded): 25 quiet steps, then the loop.
QUIET = rows([0.0] * 25, [3.4] * 25, [27.5] * 25)
LOOP = rows([0.02, 0.1, 0.25, 0.45, 0.7, 0.85, 0.95, 1.0, 1.0, 1.0], [3.3, 3.2, 3.1, 3.0, 2.9, 2.9, 2.8, 2.8, 2.7, 2.7],
            [29, 32, 36, 40, 44, 46, 47, 48, 48, 48])


def test_collapse_guard_fires_when_rollouts_hit_the_limit_and_kl_per_rollout_does_not_fall():
    # 5-step means of the truncation rate: 0.074 at step 28, (0.02 + 0.1 + 0.25 + 0.45) / 5 = 0.164 at step 29;
    # the KL per rollout then is 104.6 nats against 93.5 in steps 1-5 (not falling)
    assert fire_step(QUIET + LOOP) == 29
    # the rule as predicted before the runs (a rise of 0.3) fires a step later: 0.304 at step 30
    assert fire_step(QUIET + LOOP, GuardConfig(truncation_rise=0.3)) == 30


def test_collapse_guard_quiet_when_the_student_lengthens_towards_its_teacher():
    # truncation rises just as much, but the per-token KL falls fast enough that the KL per rollout falls
    towards = rows([r["truncation_rate"] for r in LOOP], [3.0, 2.5, 2.0, 1.6, 1.3, 1.1, 1.0, 0.9, 0.8, 0.8],
                   [r["mean_length"] for r in LOOP])
    assert fire_step(QUIET + towards) is None
    # ... and kl_fall loosens "did not fall": with kl_fall=0.9 only a 10x drop counts as falling
    assert fire_step(QUIET + towards, GuardConfig(kl_fall=0.9)) is not None


def test_collapse_guard_needs_a_teacher_kl_and_finite_rows():
    no_teacher = rows([0.0] * 10 + [1.0] * 10, [0.0] * 20, [27.0] * 10 + [48.0] * 10)  # pure RL: KL 0
    assert fire_step(no_teacher) is None
    assert fire_step([{"loss": 1.0}] * 20) is None  # SFT: no rollouts
    nan_first = [dict(r, teacher_kl=math.nan) for r in QUIET[:5]]  # skipped steps do not poison the reference
    assert fire_step(nan_first + QUIET + LOOP) is not None
    assert fire_step(QUIET + LOOP, GuardConfig(on_collapse="off")) is None


def test_collapse_guard_warns_once_and_its_state_survives_a_resume():
    guard = CollapseGuard(GuardConfig())
    reports = [guard.update(i, m)[1] for i, m in enumerate(QUIET + LOOP, 1)]
    assert sum(r is not None for r in reports) == 1
    out, _ = guard.update(99, LOOP[-1])
    assert out["guard/collapse"] == 1.0 and out["guard/truncation_rise"] > 0.9
    # a resumed run: the same reference window, and no second warning
    state = json.loads(json.dumps(guard.state()))  # what the checkpoint's JSON meta holds
    resumed = CollapseGuard(GuardConfig())
    resumed.restore(state)
    assert resumed.first == guard.first and list(resumed.recent) == list(guard.recent)
    assert resumed.update(100, LOOP[-1])[1] is None
    fresh = CollapseGuard(GuardConfig())
    fresh.restore({})  # a checkpoint from before the guard existed: starts like a new run
    assert fresh.first == [] and fresh.report is None


@pytest.mark.parametrize("override, field", [("guard.window=0", "guard.window"),
                                             ("guard.truncation_rise=0", "guard.truncation_rise"),
                                             ("guard.truncation_rise=1.5", "guard.truncation_rise"),
                                             ("guard.kl_fall=1", "guard.kl_fall"),
                                             ("guard.on_collapse=halt", "guard.on_collapse")])
def test_collapse_guard_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(config_from_dict({}), [override])


def test_collapse_stop_exits_with_its_own_code(monkeypatch, capsys):
    """`opd-jax train` maps a guard stop to exit code 3 and says so in one line."""
    import opd_jax.trainer
    from opd_jax import cli

    monkeypatch.setattr(opd_jax.trainer, "train", lambda cfg: {"last": {}, "collapsed_at": 33, "collapse": "why"})
    assert cli.main(["train", os.path.join(REPO, "configs", "base.yaml")]) == EXIT_COLLAPSED
    assert "stopped by the length-collapse guard at step 33" in capsys.readouterr().out


@pytest.mark.slow
def test_collapse_reproduction_guard_stops_it_and_the_discount_prevents_it(tmp_path):
    """The reproduction (experiments/opd_collapse/reproduce.py, one device as in the experiment, a fresh cache): the
    published recipe (discount 0) from the far student collapses and the guard stops it with a checkpoint (exit 3);
    the same run with loss.discount=1 runs all 60 steps with no truncation (exit 0)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(OPD_JAX_CACHE=str(tmp_path / "cache"), PYTHONPATH=REPO, JAX_PLATFORMS="cpu")

    def reproduce(name: str, *overrides: str) -> tuple[int, list[dict], str]:
        run_dir = tmp_path / name
        p = subprocess.run([sys.executable, "-m", "experiments.opd_collapse.reproduce", "--run-dir", str(run_dir),
                            *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
            metrics = [json.loads(line) for line in f]
        return p.returncode, metrics, p.stdout + p.stderr

    rc, metrics, out = reproduce("published")
    assert rc == EXIT_COLLAPSED, out[-3000:]
    stopped = metrics[-1]["step"]
    assert 15 <= stopped < 60 and metrics[-1]["guard/collapse"] == 1.0, out[-3000:]
    assert "warning: length collapse at step" in out
    assert str(stopped) in os.listdir(tmp_path / "published" / "checkpoints")
    assert max(m["truncation_rate"] for m in metrics[-5:]) >= 0.3

    rc, metrics, out = reproduce("discount_1", "loss.discount=1.0")
    assert rc == 0, out[-3000:]
    assert metrics[-1]["step"] == 60 and max(m["truncation_rate"] for m in metrics) <= 0.1
    assert "length collapse" not in out
