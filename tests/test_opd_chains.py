"""The OPD-claims miniature (experiments/opd_chains, opd_jax.miniature): the held-out guarantee over every training
stream the full experiment uses, a real trainer run's prompts checked the same way, and the config kept in sync."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from experiments.opd_chains import plan as plan_mod
from opd_jax.data.chains import ChainsTask, assert_held_out, split_of, stream_position
from opd_jax.miniature.demo import DEMO_STEPS, DEMO_TEST_PROBLEMS
from opd_jax.miniature.protocol import TeacherRecipe
from opd_jax.miniature.protocol import source as protocol_source
from opd_jax.miniature.setup import BASE, TASK, base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _task(source: str = TASK, seed: int = 0) -> ChainsTask:
    from opd_jax.data import build_task

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
           # the demo's RL and OPD arms: lengths.py's seed-0 stream at 12 steps (checked below with lengths')
           "demo": (f"lengths_{TeacherRecipe().length}", 0, (DEMO_STEPS + 1) * 16, "prompts",
                    protocol_source(TeacherRecipe().length, test=DEMO_TEST_PROBLEMS, val=16))}
    for seed in {*p.seeds, p.sweep_seed}:
        out[f"opd_s{seed}"] = ("opd", seed, (p.steps + 1) * p.prompts, "prompts", TASK)
        out[f"rl_s{seed}"] = ("rl", seed, (max(p.steps, p.rl_long_steps) + 1) * p.prompts, "prompts", TASK)
        out[f"sft_fresh_s{seed}"] = ("sft_fresh", seed, 2 * p.steps * seq + 64, "prompts", TASK)
    from experiments.opd_chains import lengths, sft_curve

    lp = lengths.PLAN
    out["lengths_base"] = (lp.base_stream, 0, lp.base_steps * 32, "sft", lengths.source(lp, lp.base_longest, 1))
    for length in lp.lengths:
        for seed in lp.seeds:
            out[f"lengths_{length}_s{seed}"] = (f"lengths_{length}", seed, (lp.steps_for(length) + 1) * 16,
                                                "prompts", lengths.source(lp, length))
    for seed in sft_curve.PLAN.seeds:  # correct teacher samples: at most twice the kept rows, plus a batch
        out[f"sft_curve_s{seed}"] = ("sft_curve", seed, 2 * max(sft_curve.PLAN.sizes) + 64, "prompts", TASK)
    c12 = sft_curve.PLAN_L12
    for seed in c12.seeds:
        out[f"sft_curve_L12_s{seed}"] = (c12.stream, seed, 2 * max(c12.sizes) + 64, "prompts",
                                         lengths.source(lp, c12.length))
    for length in lp.steps_reward_lengths:  # the every-step reward replicate: the same prompts as its length's
        for seed in lp.seeds:
            out[f"lengths_{length}_steps_s{seed}"] = (f"lengths_{length}", seed, (lp.steps_for(length) + 1) * 16,
                                                      "prompts", lengths.source(lp, length, reward="steps"))
    for seed in p.recovery_seeds:
        out[f"recovery_midtrain_s{seed}"] = ("recovery_midtrain", seed, p.recovery_midtrain_steps * 32, "sft",
                                             r.teacher_source)
        out[f"recovery_opd_s{seed}"] = ("recovery_opd", seed, (p.recovery_steps + 1) * p.prompts, "prompts", TASK)
        out[f"recovery_sft_fresh_s{seed}"] = ("recovery_sft_fresh", seed, 2 * p.recovery_steps * seq + 64, "prompts",
                                              TASK)
    for seed in p.single_prompt_seeds:
        out[f"single_prompt_s{seed}"] = ("single_prompt", seed, 1, "prompts", f"{TASK}:single={seed + 1}")
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
    from opd_jax.data import build_task

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


def test_error_profile_reads_slips_corrections_and_first_errors():
    from experiments.opd_chains.analysis import error_profile, walk

    text = "3a+4b*2c-6d+5"  # a3+40 b0*20 c0-61 d1+56 #6
    assert walk(text, "a3+40b0*20c0-61d1+56#6", 7) == {"first_error": None, "genuine": 0, "spurious": 0,
                                                       "slips_fixed": 0}
    fixed = walk(text, "a3+45!0b0*20c0-61!1d1+56#6", 7)
    assert fixed["first_error"] is None and fixed["genuine"] == 1 and fixed["spurious"] == 1
    assert walk(text, "a3+40b0*23c3-64d4+52#2", 7)["first_error"] == ("fact", 1)
    assert walk(text, "a3+40b0*20c0-51d1+56#6", 7)["first_error"] == ("copy", 2)
    rows = [{"text": text, "correct": 1, "k": 2, "completions": ["a3+45!0b0*20c0-61d1+56#6", "a3+41b1*22c2-63d3+51#1"]}]
    p = error_profile(rows, 7)
    assert p["completions"] == 2 and p["accuracy"] == 0.5 and p["first_error_kind"] == {"fact": 1}
    assert p["share_right_after_fixing_a_slip"] == 0.5 and p["genuine_corrections_per_completion"] == 0.5


def test_intervals():
    from opd_jax.miniature.measure import accuracy_of_rows, mean_ci, wilson

    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and abs((0.5 - lo) - (hi - 0.5)) < 1e-9 and 0.09 < hi - lo < 0.2
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] > 1 - 1e-9
    m, lo, hi = mean_ci([0.8, 0.82, 0.84])
    assert abs(m - 0.82) < 1e-9 and lo < 0.8 and hi > 0.84
    assert mean_ci([0.7]) == (0.7, 0.7, 0.7)
    a = accuracy_of_rows([{"correct": 1, "k": 1}] * 3 + [{"correct": 0, "k": 1}])
    assert a["accuracy"] == 0.75 and a["problems"] == 4 and a["ci_low"] < 0.75 < a["ci_high"]


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, monkeypatch, capsys):
    """`opd-jax demo`'s code path with tiny models and a small test set: it prepares the pair into a fresh cache,
    trains OPD and SFT, and prints held-out accuracy (with intervals) and KL before and after."""
    import json

    monkeypatch.setenv("OPD_JAX_CACHE", str(tmp_path / "cache"))
    from opd_jax.miniature import demo

    tiny = ["student.hidden_size=16", "student.intermediate_size=32", "student.head_dim=4", "student.num_layers=1",
            "teachers.0.model.hidden_size=16", "teachers.0.model.intermediate_size=32",
            "teachers.0.model.head_dim=4", "teachers.0.model.num_layers=1", "sampling.max_new_tokens=40",
            "eval.max_new_tokens=40", "data.source=synthetic:chains:4:6:mod=7:test=32:val=16",
            "groups_per_batch=4", "group_size=2"]
    recipe = {"teacher_steps": 3, "teacher_batch": 8, "student_examples": 8, "student_steps": 2, "student_batch": 4,
              "teacher_source": "synthetic:chains:4:6:mod=7:test=32:val=16:slips=0.3"}
    protocol = {"base": {"steps": 2, "batch": 4, "longest": 5}, "teacher": {"length": 5, "steps": 2}}
    monkeypatch.setattr(demo, "DEMO_TEST_PROBLEMS", 32)
    rc = demo.main(["--steps", "2", "--run-dir", str(tmp_path / "demo"), "--recipe", json.dumps(recipe),
                    "--protocol", json.dumps(protocol), *tiny])
    assert rc == 0
    out = capsys.readouterr().out
    assert "base student" in out and "after 2 RL steps" in out and "after 2 OPD steps" in out and "KL" in out
    assert "the teacher scores every token" in out
    s = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    for point in ("before", "rl", "opd"):
        assert s[point]["t1"]["problems"] == 32 and 0 <= s[point]["t1"]["ci_low"] <= s[point]["t1"]["ci_high"] <= 1
        assert s[point]["kl"]["tokens"] > 0 and s[point]["kl"]["kl_exact"] >= 0
    assert s["length"] == 5 and s["teacher"]["recipe"]["steps"] == 2
    made = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.is_dir() and "-" in p.name)
    assert made == ["base", "rl_teacher", "student", "teacher"], made


def test_demo_uses_the_committed_length_results():
    """The demo's closing line quotes lengths.py's seed-mean RL/OPD steps ratios at 80% of RL's gain, and it trains
    at the rates (and KL clip) the validation sweep chose at its length: the committed ones
    (results/lengths/lengths.json, chosen_L12.json)."""
    from opd_jax.miniature import demo

    res = Path(REPO) / "experiments/opd_chains/results/lengths"
    out = json.loads((res / "lengths.json").read_text())
    assert demo.LENGTHS_RATIO_80 == {int(k): round(v["80%"]["point"], 2) for k, v in out["lengths"].items()}
    chosen = json.loads((res / f"chosen_L{TeacherRecipe().length}.json").read_text())
    assert (demo.RL_LR, demo.OPD_LR, demo.OPD_KL_CLIP) == (chosen["rl_lr"], chosen["opd_lr"], chosen["opd_kl_clip"])
    assert TeacherRecipe().lr == chosen["rl_lr"]


def test_shipped_pair_is_the_current_default_pair():
    """The teacher and student shipped in `opd_jax/miniature/pretrained/` carry the cache keys of today's default
    config and recipe (a change to either retrains instead of using stale weights, and this test asks for a new
    pair), and their JSON records say the same keys."""
    import json

    from opd_jax.miniature.prepare import PRETRAINED, Recipe, cache_keys
    from opd_jax.miniature.protocol import BaseRecipe, TeacherRecipe, protocol_keys

    t_key, s_key = cache_keys(base_config(), Recipe())
    b_key, r_key = protocol_keys(base_config(), Recipe(), BaseRecipe(), TeacherRecipe())
    assert sorted(p.name for p in PRETRAINED.iterdir() if p.is_dir()) == [
        f"base-{b_key}", f"rl_teacher-{r_key}", f"student-{s_key}", f"teacher-{t_key}"]
    b_info = json.loads((PRETRAINED / f"base-{b_key}" / "base.json").read_text())
    r_info = json.loads((PRETRAINED / f"rl_teacher-{r_key}" / "rl_teacher.json").read_text())
    assert b_info["key"] == b_key and b_info["recipe"] == dataclasses.asdict(BaseRecipe())
    assert r_info["key"] == r_key and r_info["base_key"] == b_key
    assert r_info["recipe"] == dataclasses.asdict(TeacherRecipe())
    assert r_info["test"]["t1"]["accuracy"] > 0.8  # the RL plateau at 12 steps (lengths.py: 0.93 in seed 0)
    t_info = json.loads((PRETRAINED / f"teacher-{t_key}" / "teacher.json").read_text())
    s_info = json.loads((PRETRAINED / f"student-{s_key}" / "student.json").read_text())
    assert t_info["key"] == t_key and s_info["key"] == s_key and s_info["teacher_key"] == t_key
    assert s_info["recipe"] == dataclasses.asdict(Recipe())
    for name, key in (("teacher", t_key), ("student", s_key)):
        cfg = json.loads((PRETRAINED / f"{name}-{key}" / name / "config.json").read_text())
        m = base_config().student if name == "student" else base_config().teachers[0].model
        assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (
            m.hidden_size, m.num_layers, m.vocab_size)


def test_prepare_copies_the_shipped_pair_into_an_empty_cache(tmp_path, monkeypatch):
    """A fresh cache gets the shipped pair without training (the demo's first minute); the copy loads."""
    from opd_jax.miniature import prepare as prep_mod

    def no_training(*a, **k):
        raise AssertionError("trained although the shipped pair matches")

    monkeypatch.setattr(prep_mod, "train_teacher", no_training)
    monkeypatch.setattr(prep_mod, "train_student", no_training)
    logs: list[str] = []
    p = prep_mod.prepare(root=tmp_path, grade=False, log=logs.append)
    assert p.info["trained_now"] == [] and sum("shipped" in m for m in logs) == 2, logs
    assert p.info["teacher"]["test"]["t1"]["accuracy"] > 0.9  # the record travels with the weights
    from safetensors.numpy import load_file

    assert load_file(os.path.join(p.student, "model.safetensors"))  # a readable HF dir
    assert not list(tmp_path.glob("*.tmp"))
    # the protocol's base student and RL teacher (the demo's models) come the same way
    from opd_jax.miniature import protocol

    monkeypatch.setattr(protocol, "train_base", no_training)
    monkeypatch.setattr(protocol, "train_teacher", no_training)
    logs.clear()
    pp = protocol.prepare_protocol(root=tmp_path, log=logs.append)
    assert sum("shipped" in m for m in logs) == 2, logs
    assert pp.info["teacher"]["test"]["t1"]["accuracy"] > 0.8
    assert load_file(os.path.join(pp.teacher, "model.safetensors")) and load_file(
        os.path.join(pp.base, "model.safetensors"))


def test_prepare_takes_turns_on_one_cache_root(tmp_path):
    """Two preparers on one cache root: the second waits for the first's lock."""
    import threading
    import time

    from opd_jax.miniature.prepare import _locked

    order: list[str] = []
    held = threading.Event()

    def first():
        with _locked(tmp_path):
            held.set()
            time.sleep(0.3)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    held.wait()
    with _locked(tmp_path):
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]


def test_demo_replaces_only_its_own_run_dir(tmp_path):
    """A rerun replaces the demo's directory (no `.old` copies pile up); a directory the demo did not make is
    refused with one line naming it, and left as it is."""
    from opd_jax.errors import RunDirError
    from opd_jax.miniature.demo import MARKER, claim_run_dir

    d = tmp_path / "demo"
    claim_run_dir(str(d))
    (d / "opd").mkdir()
    (d / "demo_summary.json").write_text("{}")
    claim_run_dir(str(d))
    assert sorted(p.name for p in d.iterdir()) == [MARKER]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not a demo's directory"):
        claim_run_dir(str(other))
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(RunDirError, match="is a file"):
        claim_run_dir(str(other / "notes.txt"))


@pytest.mark.parametrize("args, culprit", [
    (["--steps", "0"], "argument --steps: must be >= 1"),
    (["--steps", "-3"], "argument --steps: must be >= 1"),
    (["--recipe", "{bad"], "argument --recipe: Expecting property name"),
    (["--recipe", '{"no_such_field": 1}'], "argument --recipe: "),
    (["--protocol", '{"base": {"nope": 1}}'], "argument --protocol: "),
    (["--protocol", '{"teachers": {}}'], "argument --protocol: expected an object"),
    (["--protocol", '{"teacher": {"length": 17}}'], "argument --protocol: teacher.length: chains have at most 16"),
    (["--protocol", '{"teacher": {"length": "12"}}'], "argument --protocol: teacher.length: expected int"),
    (["--protocol", '{"base": {"steps": 0}}'], "argument --protocol: base.steps: must be > 0"),
])
def test_bad_demo_arguments_are_one_line_and_keep_the_previous_demo(tmp_path, capsys, args, culprit):
    """Issue #22: `opd-jax demo --steps 0` ran until SFT raised a traceback, after deleting the previous demo.
    Every argument is checked before the demo's directory is replaced."""
    from opd_jax import cli
    from opd_jax.miniature.demo import MARKER
    from opd_jax.miniature.demo import main as demo_main

    d = tmp_path / "demo"
    d.mkdir()
    (d / MARKER).write_text("made by `opd-jax demo`")
    (d / "demo_summary.json").write_text('{"steps": 40}')
    if args[0] == "--steps":  # through the CLI as a user types it
        with pytest.raises(SystemExit) as e:
            cli.main(["demo", *args, "--run-dir", str(d)])
        code = e.value.code
    else:
        try:
            code = demo_main(["--run-dir", str(d), *args])
        except SystemExit as e:
            code = e.code
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert code == 2 and len(errors) == 1 and culprit in errors[0] and "Traceback" not in err, err
    assert (d / "demo_summary.json").read_text() == '{"steps": 40}'
    from opd_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="student.nope"):  # a config override: the CLI's one line, exit 2
        demo_main(["--run-dir", str(d), "student.nope=1"])
    assert (d / "demo_summary.json").read_text() == '{"steps": 40}'


def test_every_model_field_is_keyed_or_declared_execution_only():
    """The miniature's cache keys hash every ModelConfig field except the declared execution-only ones; a new field
    must be put in one class or the other here (else the shipped pair silently goes stale, or a model change reuses
    an old cache)."""
    from opd_jax.config.schema import ModelConfig
    from opd_jax.miniature.prepare import EXECUTION_FIELDS

    keyed = {"preset", "hf_path", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
             "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_embeddings", "param_dtype", "dtype",
             "remat", "attention_chunk"}  # (remat and attention_chunk run the same model too; kept, conservatively)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(EXECUTION_FIELDS) <= fields
    assert fields - set(EXECUTION_FIELDS) == keyed, sorted(fields ^ (keyed | set(EXECUTION_FIELDS)))


def test_cache_keys_hash_the_resolved_training_config():
    """An override that changes what a model learns (sampling, loss, optimizer moments, data) gets its own models;
    one that only says where a run writes, how it is graded or split, or what a recipe sets anyway, reuses them; the
    teacher's key ignores the student. Every config field is keyed unless `OUTSIDE_KEYS` names it."""
    from opd_jax.miniature.prepare import OUTSIDE_KEYS, Recipe, cache_keys

    t0, s0 = cache_keys(base_config(), Recipe())
    for changes in (["sampling.temperature=0.5"], ["loss.kl_clip=5"], ["optim.b2=0.99"], ["data.shuffle_seed=3"],
                    ["teachers.0.model.num_layers=2"]):
        t, s = cache_keys(base_config(changes), Recipe())
        assert t != t0 and s != s0, changes
    assert cache_keys(base_config(["student.hidden_size=32"]), Recipe())[0] == t0
    assert cache_keys(base_config(["student.hidden_size=32"]), Recipe())[1] != s0
    same = ["run_dir=/elsewhere", "eval.every=5", "mesh.fsdp=2", "steps=7", "optim.learning_rate=0.5",
            "checkpoint.every=3", "student.hf_path=/x", "teachers.0.model.hf_path=/y", "student.decode_unroll=true"]
    assert cache_keys(base_config(same), Recipe()) == (t0, s0)
    from opd_jax.config import config_to_dict

    top = config_to_dict(base_config())
    for path in OUTSIDE_KEYS:  # every declared field exists (a renamed field must not silently become keyed)
        node = top
        for part in path.split("."):
            assert part in node, path
            node = node[part]


def test_prepare_command_reports_the_pair(tmp_path, capsys, monkeypatch):
    """`python -m opd_jax.miniature.prepare --root DIR`: the pair into DIR (here: the shipped one, copied) and each
    model's recorded test accuracy."""
    from opd_jax.miniature import prepare as prep_mod

    monkeypatch.setattr(prep_mod.setup, "quiet_jax", lambda: None)
    assert prep_mod.main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "teacher: " in out and "student: " in out and "test accuracy T=1 0.8" in out
    assert "trained now: nothing" in out


def _curve(reach_step: int | None, every: int, steps: int) -> list[dict]:
    """A synthetic eval curve: 0.5 until `reach_step`, 0.9 from it on (never when None)."""
    return [{"step": s, "mean": 0.9 if reach_step is not None and s >= reach_step else 0.5}
            for s in range(0, steps + 1, every)]


def test_steps_ratio_rule_can_pass_fail_and_stay_undetermined_on_synthetic_curves():
    """Issue #22: a ratio rule must be able to both pass and fail at the planned cadence; where the evals cannot
    decide it, it says so instead of "does not hold"."""
    from experiments.opd_chains.ratios import ratio_rule, steps_bracket

    def verdict(a_reach, b_reach, *, every=5, a_steps=60, b_steps=150, threshold=7.0):
        a = steps_bracket(_curve(a_reach, every, a_steps), 0.8, every=every, steps=a_steps)
        b = steps_bracket(_curve(b_reach, every, b_steps), 0.8, every=every, steps=b_steps)
        return ratio_rule(a, b, threshold)

    passed = verdict(5, 100)  # A in (0, 5], B in (95, 100]: >= 19x
    assert passed.verdict == "holds" and passed.ratio_lo == 19.0
    failed = verdict(30, 40)  # A in (25, 30], B in (35, 40]: at most 1.6x
    assert failed.verdict == "does not hold" and failed.ratio_hi == 40 / 25
    assert verdict(10, 40).verdict == "undetermined at this eval cadence"  # [3.5x, 8x] straddles 7
    assert verdict(None, 40).verdict.startswith("does not hold (A did not reach")
    never = verdict(5, None)  # B never within 150 steps: at least 30x, a lower bound only
    assert never.verdict == "holds" and never.ratio_lo == 30.0 and never.ratio_hi == float("inf")
    # the old design (evals every 10 over 60 steps for both): A at its first eval and B at its last give [5x, 60x]
    assert verdict(10, 60, every=10, a_steps=60, b_steps=60).verdict == "undetermined at this eval cadence"


def test_which_designs_can_decide_a_7x_rule():
    from experiments.opd_chains.ratios import check_rule_decidable, measurable_range

    assert measurable_range(every_a=10, steps_a=60, every_b=10, steps_b=60) == (0.2, 5.0)
    reason = check_rule_decidable(7.0, every_a=10, steps_a=60, every_b=10, steps_b=60)
    assert reason is not None and "cannot pass" in reason and "up to 5x" in reason
    assert check_rule_decidable(7.0, every_a=10, steps_a=60, every_b=30, steps_b=240) is None  # + the RL long run
    assert check_rule_decidable(7.0, every_a=5, steps_a=60, every_b=5, steps_b=150) is None  # issue #22's cadence
    assert "cannot fail" in check_rule_decidable(0.01, every_a=5, steps_a=60, every_b=5, steps_b=150)
    with pytest.raises(ValueError, match="every_a"):
        measurable_range(every_a=0, steps_a=60, every_b=5, steps_b=60)


def test_the_committed_report_says_what_the_cadence_resolves():
    """The committed claims carry the ratio interval the evals allow and whether the 7x rule was decidable."""
    claims = json.loads((Path(__file__).parents[1] / "experiments/opd_chains/results/claims.json").read_text())
    rl = next(c for c in claims["claims"] if c["claim"] == "rl_steps")["numbers"]
    lo, hi = rl["ratio_interval"]
    assert lo <= rl["ratio"] <= hi and rl["rule_7x_decidable"] == "yes"


def test_single_prompt_arms_train_distinct_prompts_that_use_every_operation(tmp_path):
    """Issue #22: each single-prompt seed trains its own prompt (they had all trained `6a-1b-5c-4d-4e-5`)."""
    from experiments.opd_chains.run_all import Runner, single_prompt_spec

    runner = Runner(None, plan_mod.PLAN, str(tmp_path), str(tmp_path), False, [], None)
    prompts = {}
    for steps, samples in plan_mod.PLAN.single_prompt_shapes:
        for seed in plan_mod.PLAN.single_prompt_seeds:
            spec = single_prompt_spec(runner, plan_mod.PLAN, TASK, 3e-4, seed, steps, samples)
            assert (spec.steps, spec.prompts, spec.group_size) == (steps, 1, samples)
            chain = _task(spec.source).problem(0)
            assert {op for op, _ in chain.ops} == set("+-*"), chain.text
            prompts.setdefault((steps, samples), []).append(chain.text)
    for shape, texts in prompts.items():
        assert len(set(texts)) == len(plan_mod.PLAN.single_prompt_seeds) >= 3, (shape, texts)
    assert (20, 256) in prompts, "the published budget shape: one prompt, 20 steps x 256 samples"


def test_sft_curve_finds_a_log_linear_stretch_only_where_there_is_one():
    """Deliverable 2's test can pass and fail: a log-linear curve has a stretch, a threshold curve has none."""
    from experiments.opd_chains.sft_curve import fit_log_linear, log_linear_stretch

    log_linear = {n: 0.3 + 0.1 * i for i, n in enumerate((128, 256, 512, 1024, 2048))}
    stretch = log_linear_stretch(log_linear)
    assert stretch is not None and stretch["sizes"] == [128, 256, 512, 1024, 2048]
    assert abs(stretch["slope_per_doubling"] - 0.1) < 1e-9 and stretch["r2"] > 0.999
    threshold = {128: 0.15, 256: 0.86, 512: 0.97, 1024: 0.98, 2048: 0.98}
    assert log_linear_stretch(threshold) is None
    from experiments.opd_chains.sft_curve import curve_shape

    assert curve_shape(threshold) == "threshold" and curve_shape(log_linear) == "log-linear"
    sigmoid3 = {128: 0.2, 256: 0.5, 512: 0.8, 1024: 0.99, 2048: 0.99}  # 3 points of a sigmoid fit a line
    assert log_linear_stretch(sigmoid3) is None and curve_shape(sigmoid3) == "undetermined"
    assert fit_log_linear([(1, 0.0), (2, 1.0)])["slope_per_doubling"] == 1.0


def test_lengths_ratios_read_both_curves_against_rls_gain():
    """A target counts when two evals in a row reach it; a gain inside the eval noise decides nothing; across
    seeds the interval keeps the cadence's brackets (censored seeds make it unbounded, not dropped)."""
    from experiments.opd_chains.lengths import ratios_of, rule_7x, seed_interval

    def rec(points, every=5):
        return {"every": every, "steps": points[-1][0], "test_problems": 1024,
                "curve": [{"step": s, "test": a} for s, a in points]}

    rl = rec([(0, 0.5), (5, 0.6), (10, 0.7), (15, 0.8), (20, 0.9), (25, 0.9)])  # gain 0.4 (last two evals)
    opd = rec([(0, 0.5), (5, 0.9), (10, 0.6), (15, 0.9), (20, 0.9), (25, 0.9)])  # one noisy dip at step 10
    r = ratios_of(rl, opd)
    assert abs(r["gain"] - 0.4) < 1e-9 and r["gain_resolved"]
    assert r["80%"]["opd"] == [10, 15] and r["80%"]["rl"] == [15, 20]  # target 0.82: OPD from step 15 on
    assert r["80%"]["ratio"] == [15 / 15, 20 / 10]
    flat = ratios_of(rec([(0, 0.96), (5, 0.97), (10, 0.975), (15, 0.97)]), opd)
    assert not flat["gain_resolved"] and flat["80%"]["rule_7x"].startswith("undetermined")
    fast = ratios_of(rl, rec([(0, 0.5), (5, 0.9), (10, 0.9), (15, 0.9), (20, 0.9), (25, 0.9)]))
    seeds = [r, fast]
    iv = seed_interval(seeds, 0.8)
    assert iv["lo"] < 1.0 < iv["hi"] and iv["point"] > 1.0
    never = ratios_of(rec([(0, 0.5), (5, 0.5), (10, 0.5), (15, 0.5), (20, 0.9), (25, 0.9)]),
                      rec([(0, 0.5), (5, 0.5), (10, 0.5), (15, 0.5), (20, 0.5), (25, 0.5)]))
    assert never["80%"]["rule_7x"].startswith("does not hold")  # OPD never reached RL's level
    assert seed_interval([flat], 0.8)["point"] is None
    assert rule_7x(seeds, 0.8) == "undetermined"  # fast's [3x, 20x] straddles 7
    assert rule_7x([r, r], 0.8) == "does not hold"
