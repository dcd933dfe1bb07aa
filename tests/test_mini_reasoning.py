"""The mini reasoning experiment end to end, scaled down: tiny teacher and student prepared into a tmp cache,
a few steps of SFT, RL and OPD from the same student, then the report (table + plots). OPD must lower teacher_kl."""

from __future__ import annotations

import json
import os

import pytest

TINY = [
    "student.hidden_size=32", "student.intermediate_size=64", "student.num_layers=1", "student.head_dim=8",
    "teachers.0.model.hidden_size=48", "teachers.0.model.intermediate_size=96", "teachers.0.model.num_layers=1",
    "teachers.0.model.head_dim=12", "data.source=synthetic:arithmetic:1:9", "eval.source=synthetic:arithmetic:1:9",
    "eval.num_problems=16", "sampling.max_prompt_len=8", "sampling.max_new_tokens=12", "eval.max_new_tokens=12",
    "groups_per_batch=4", "group_size=4", "optim.learning_rate=3e-3",
]
RECIPE = {"teacher_steps": 40, "teacher_batch": 16, "student_examples": 16, "student_steps": 5, "student_batch": 8,
          "only_correct": False}  # the tiny teacher is not accurate enough for rejection sampling


@pytest.mark.slow
def test_mini_reasoning_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_JAX_CACHE", str(tmp_path / "cache"))
    from experiments.mini_reasoning import run_all
    from experiments.mini_reasoning.common import metric_curve

    results, runs = tmp_path / "results", tmp_path / "runs"
    rc = run_all.main(["--seeds", "0", "--steps", "12", "--eval-every", "6", "--results", str(results),
                       "--runs", str(runs), "--recipe", json.dumps(RECIPE), "--target", "0.3", "--midtrain-steps", "8",
                       *TINY])
    assert rc == 0

    # the cache: HF dirs of both models and their accuracies
    dirs = {p.name.split("-")[0] if p.name.startswith("teacher-") else "key": p
            for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "xla_cache"}
    assert set(dirs) == {"teacher", "key"}, dirs
    info = json.loads((dirs["key"] / "prep.json").read_text())
    assert 0.0 <= info["teacher_accuracy"] <= 1.0 and 0.0 <= info["student_accuracy"] <= 1.0
    assert (dirs["teacher"] / "teacher" / "config.json").exists() and (dirs["key"] / "student" / "config.json").exists()
    assert info["teacher_eval"]["num_problems"] == info["student_eval"]["num_problems"] == 16

    # other eval settings reuse the cached models but re-measure their accuracies (never a stale number)
    from experiments.mini_reasoning import common
    from experiments.mini_reasoning.prepare import PrepRecipe, prepare

    weights = sorted((tmp_path / "cache").rglob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in weights]
    logs: list[str] = []
    prep = prepare(common.load("base", [*TINY, "eval.num_problems=8"]), PrepRecipe(**RECIPE), progress=False,
                   log=logs.append)
    assert not any("training" in line for line in logs), logs
    assert sum("re-evaluated" in line for line in logs) == 2, logs
    assert [p.stat().st_mtime_ns for p in weights] == stamps
    assert prep.info["teacher_eval"]["num_problems"] == prep.info["student_eval"]["num_problems"] == 8
    for name in ("teacher_accuracy", "student_accuracy"):
        assert (prep.info[name] * 8) == round(prep.info[name] * 8), (name, prep.info[name])  # graded on 8 problems

    # every method ran and left its metrics, the table and the plots exist
    for m in ("sft", "rl", "opd"):
        assert (runs / f"{m}_s0" / "metrics.jsonl").exists()
        assert (results / "runs" / f"{m}_s0.jsonl").exists()
    for f in ("results.md", "accuracy_vs_flops.png", "accuracy_vs_steps.png", "curves.jsonl", "summary.json"):
        assert (results / f).stat().st_size > 0, f
    md = (results / "results.md").read_text()
    assert "OPD" in md and "SFT" in md and "RL" in md

    # the extras: single-prompt OPD next to all prompts, and recovery at its three points
    single = json.loads((results / "single_prompt.json").read_text())
    assert set(single["runs"]) == {"one", "full"} and single["runs"]["one"]["group_size"] == 16
    assert all(r["curve"][0][0] == 0 and r["curve"][-1][0] == 12 for r in single["runs"].values())
    rec = json.loads((results / "recovery.json").read_text())
    for point in ("before", "after_midtrain", "after_opd"):
        assert 0.0 <= rec[point]["arithmetic"] <= 1.0 and 0.0 <= rec[point]["facts"] <= 1.0
    assert "Single-prompt" in md and "Recovery" in md

    # OPD pulls the student towards the teacher: teacher_kl falls (fixed seeds, first vs last steps)
    kl = [v for _, v in metric_curve(os.fspath(runs / "opd_s0"), "teacher_kl")]
    assert len(kl) == 12
    first, last = sum(kl[:4]) / 4, sum(kl[-4:]) / 4
    assert last < first, kl


def test_prep_key_ignores_how_a_cpu_runs_decode():
    """The prepared-model cache is keyed by what the models compute: the CPU decode-kernel switch (which changes
    only how XLA:CPU runs a step) keeps the key, so caches made before the field existed stay valid."""
    from experiments.mini_reasoning.common import prep_key
    from opd_jax.config import load_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "mini_reasoning", "base.yaml"), [])
    key, teacher_key = prep_key(cfg, {"seed": 0}), prep_key(cfg, {"seed": 0}, teacher_only=True)
    cfg.student.cpu_decode_kernel = cfg.teachers[0].model.cpu_decode_kernel = False
    assert prep_key(cfg, {"seed": 0}) == key and prep_key(cfg, {"seed": 0}, teacher_only=True) == teacher_key
    cfg.student.num_layers += 1
    assert prep_key(cfg, {"seed": 0}) != key and prep_key(cfg, {"seed": 0}, teacher_only=True) == teacher_key


def test_imports_run_one_way():
    """No import loop inside the package, function-level imports included (common <- prepare <- the stages)."""
    import ast
    import graphlib
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "experiments" / "mini_reasoning"
    mods = {p.stem: p for p in pkg.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "experiments.mini_reasoning":
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("experiments.mini_reasoning."):
                edges.add(node.module.rpartition(".")[2])
            elif isinstance(node, ast.Import):
                edges |= {a.name.rpartition(".")[2] for a in node.names
                          if a.name.startswith("experiments.mini_reasoning.")}
        graph[name] = edges & set(mods)
    assert graph["common"] == set() and graph["prepare"] == {"common"}, graph
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a loop
