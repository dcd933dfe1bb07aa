"""The OPD-claims miniature (experiments/opd_chains, opd_jax.miniature): the held-out guarantee over every training
stream the full experiment uses, a real trainer run's prompts checked the same way, and the config kept in sync."""

from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from experiments.opd_chains import plan as plan_mod
from opd_jax.miniature.chains import ChainsTask, assert_held_out, split_of, stream_position
from opd_jax.miniature.setup import BASE, TASK, base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _task(source: str = TASK, seed: int = 0) -> ChainsTask:
    from opd_jax.tasks import build_task

    task = build_task(base_config([f"data.source={source}", f"data.shuffle_seed={seed}"]))
    assert isinstance(task, ChainsTask)
    return task


def _draw(task: ChainsTask, stream: str, seed: int, rows: int, kind: str = "prompts") -> list[str]:
    """The problems a consumer of `stream` draws: `rows` rows from its start, recorded by the task itself."""
    task.restore({"position": stream_position(stream, seed)})
    task.issued = []
    (task.sft_examples if kind == "sft" else task.next_prompts)(rows)
    return list(task.issued)


def plan_streams(p: plan_mod.Plan) -> dict[str, tuple[str, int, int, str, str]]:
    """Every training stream of `run_all` (and the demo) under plan `p`: name -> (stream, seed, rows, kind, source).
    Row counts are upper bounds: rejection sampling of teacher samples draws at most twice what it keeps (plus a
    batch), and each trainer peeks at one extra batch."""
    r = p.recipe
    seq = p.prompts * p.group_size
    out = {"teacher": ("teacher", r.seed, r.teacher_steps * r.teacher_batch, "sft", r.teacher_source),
           "student_pool": ("student_pool", r.seed, 2 * r.student_examples + 64, "prompts", TASK),
           "recovery_midtrain": ("recovery_midtrain", 0, p.recovery_midtrain_steps * 32, "sft", r.teacher_source),
           "recovery_opd": ("recovery_opd", 0, (p.recovery_steps + 1) * p.prompts, "prompts", TASK),
           "recovery_sft_fresh": ("recovery_sft_fresh", 0, 2 * p.recovery_steps * seq + 64, "prompts", TASK),
           "single_prompt": ("single_prompt", 0, 1, "prompts", TASK),
           "demo_opd": ("demo_opd", 0, 61 * 16, "prompts", TASK),
           "demo_sft": ("demo_sft", 0, 2 * 60 * 64 + 64, "prompts", TASK)}
    for seed in {*p.seeds, p.sweep_seed}:
        out[f"opd_s{seed}"] = ("opd", seed, (p.steps + 1) * p.prompts, "prompts", TASK)
        out[f"rl_s{seed}"] = ("rl", seed, (max(p.steps, p.rl_long_steps) + 1) * p.prompts, "prompts", TASK)
        out[f"sft_fresh_s{seed}"] = ("sft_fresh", seed, 2 * p.steps * seq + 64, "prompts", TASK)
    for seed in p.single_prompt_seeds:
        out[f"single_prompt_s{seed}"] = ("single_prompt", seed, 1, "prompts", TASK)
    return out


def test_no_eval_problem_in_any_training_stream_of_the_full_experiment():
    """The acceptance test: regenerate every training stream the full run_all uses (teacher, student pool, SFT on
    fresh samples, OPD and RL prompts of every seed, RL run long, single prompt, recovery, demo) and check each
    problem against the test and validation sets, by text and by its hash split."""
    checked = 0
    eval_texts = None
    for name, (stream, seed, rows, kind, source) in plan_streams(plan_mod.PLAN).items():
        task = _task(source)
        if eval_texts is None:
            eval_texts = {c.text for s in ("test", "val") for c in task.held_out(s)}
            assert len(eval_texts) == task.num_test + task.num_val
        issued = _draw(task, stream, seed, rows, kind)
        assert len(issued) == rows, name
        assert not set(issued) & eval_texts, name
        checked += assert_held_out(task, issued)
    assert checked > 50_000


def test_the_guarantee_is_not_luck_a_tiny_problem_space():
    """With 126 distinct problems, a stream of 3000 rows without the split would contain every eval problem. The
    task's streams hold every train problem and no eval problem; an eval problem slipped into a stream is caught."""
    task = ChainsTask(seed=0, min_len=1, max_len=1, mod=7, num_test=5, num_val=2)
    evals = [c.text for s in ("test", "val") for c in task.held_out(s)]
    assert len(evals) == 7, "the tiny space has 5 test and 2 validation problems"
    task.issued = []
    task.next_prompts(3000)
    seen = set(task.issued)
    space = {f"{a}a{op}{b}" for a in range(7) for op in "+-*" for b in range(1, 7)}
    assert seen == {t for t in space if split_of(t) == "train"}
    assert not seen & set(evals)
    with pytest.raises(AssertionError, match="eval problems"):
        assert_held_out(task, [*task.issued[:5], evals[0]])


def test_a_trainer_run_draws_only_train_problems(tmp_path):
    """OPD through the real `Trainer` (tiny models): every prompt it consumed is recorded and held out."""
    from opd_jax.trainer import Trainer

    tiny = ["student.hidden_size=16", "student.intermediate_size=32", "student.head_dim=4", "student.num_layers=1",
            "teachers.0.model.hidden_size=16", "teachers.0.model.intermediate_size=32",
            "teachers.0.model.head_dim=4", "teachers.0.model.num_layers=1", "groups_per_batch=4", "group_size=2",
            "steps=2", f"run_dir={tmp_path / 'opd'}", "sampling.max_new_tokens=8", "eval.every=0", "eval.source="]
    cfg = base_config(tiny)
    from opd_jax.tasks import build_task

    task = build_task(cfg)
    task.restore({"position": stream_position("opd", 7)})
    task.issued = []
    h = Trainer(cfg, task).run()
    assert "last" in h and len(task.issued) >= 2 * 4
    assert assert_held_out(task, task.issued) == len(task.issued)


def test_yaml_config_matches_the_package_config():
    with open(os.path.join(REPO, "configs", "opd_chains", "base.yaml"), encoding="utf-8") as f:
        assert yaml.safe_load(f) == BASE
    from opd_jax.config import config_to_dict, load_config

    assert config_to_dict(load_config(os.path.join(REPO, "configs", "opd_chains", "base.yaml"))) == \
        config_to_dict(base_config())


def test_plan_is_the_one_run_all_uses():
    p = plan_mod.PLAN
    assert set(p.lrs) == {"opd", "rl", "sft_fresh", "sft_fixed"} and all(len(v) >= 3 for v in p.lrs.values())
    assert len(p.seeds) >= 3 and p.rl_long_steps >= 4 * p.steps
    assert dataclasses.asdict(p.recipe)["teacher_source"].endswith("slips=0.3")
