"""The `opd-jax` command line: sweep --print, clear errors for typos and reused run directories."""

import os
import shlex

import pytest

from opd_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_print_emits_one_launch_command_per_run(capsys):
    sweep = os.path.join(REPO, "configs", "sweeps", "example.yaml")
    assert cli.main(["sweep", sweep, "--print"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 8  # 2 x 2 grid x 2 zipped
    run_dirs = set()
    for ln in lines:
        argv = shlex.split(ln)
        assert argv[:2] == ["opd-jax", "train"]
        run_dirs.update(a for a in argv if a.startswith("run_dir="))
        assert any(a.startswith("optim.learning_rate=") for a in argv)
    assert len(run_dirs) == 8  # every run writes to its own directory


def test_config_typo_is_one_clear_error(capsys):
    rc = cli.main(["train", os.path.join(REPO, "configs", "base.yaml"), "optim.learnig_rate=1e-4"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "optim.learnig_rate" in err and "optim.learning_rate" in err


def test_existing_run_dir_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    rc = cli.main(["train", os.path.join(REPO, "configs", "base.yaml"), f"run_dir={run}"])
    assert rc == 2
    assert "resume=true" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == "{}\n"  # nothing already saved is lost


@pytest.mark.parametrize("args", [["--help"]])
def test_help(args):
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 0


def test_overrides_may_follow_options():
    args = cli.parse(["compile", "c.yaml", "a=1", "--topology", "v5p-64", "b.c=2", "--json", "r.json", "--fast"])
    assert (args.overrides, args.topology, args.json, args.fast) == (["a=1", "b.c=2"], "v5p-64", "r.json", True)
    with pytest.raises(SystemExit) as e:  # anything else stays an error
        cli.parse(["compile", "c.yaml", "--topology", "v5p-64", "stray"])
    assert e.value.code == 2


def test_convert_help():
    for flag in ("-h", "--help"):
        with pytest.raises(SystemExit) as e:
            cli.main(["convert", flag])
        assert e.value.code == 0


def test_train_help_lists_the_schema(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("optim.learning_rate", "sampling.max_new_tokens", "teachers.N.model.hf_path", "loss.kl_penalty_coef",
                "checkpoint.fallback_to_intact", "compilation_cache"):
        assert key in out, key
    assert "gradient accumulation inside the step" in out  # the schema's own comments


def test_config_reference_page_is_current():
    from opd_jax.config.reference import markdown

    with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as f:
        assert f.read() == markdown(), "regenerate: python -m opd_jax.config.reference > docs/config.md"


def test_sweep_passes_overrides_to_every_run(capsys):
    sweep = os.path.join(REPO, "configs", "sweeps", "example.yaml")
    assert cli.main(["sweep", sweep, "--print", "resume=auto"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 8 and all(shlex.split(ln)[-1] == "resume=auto" for ln in lines)
    rc = cli.main(["sweep", sweep, "--print", "resume=maybe"])  # checked before any run starts
    assert rc == 2 and "resume" in capsys.readouterr().err


def test_base_config_says_it_is_a_smoke_test(tmp_path, capsys):
    with open(os.path.join(REPO, "configs", "base.yaml"), encoding="utf-8") as f:
        assert "SMOKE TEST" in f.read()
    rc = cli.main(["train", os.path.join(REPO, "configs", "base.yaml"), f"run_dir={tmp_path / 'run'}", "steps=1",
                   "logging.progress=false", "logging.tensorboard=false", "eval.source=", "eval.every=0"])
    out = capsys.readouterr().out
    assert rc == 0 and "random init" in out and "smoke test" in out


def test_compilation_cache_hit_on_a_second_start(tmp_path, capsys):
    """Two starts of the same config: the second loads the step program from the persistent cache, and says so."""
    from opd_jax.config import load_config
    from opd_jax.trainer import Trainer

    over = ["steps=1", "groups_per_batch=3", "group_size=3", "logging.progress=false", "logging.tensorboard=false",
            "sampling.max_new_tokens=5", "eval.source=", "eval.every=0"]  # shapes no other test compiles
    for i, want in enumerate(("miss", "hit")):
        cfg = load_config(os.path.join(REPO, "configs", "base.yaml"), [*over, f"run_dir={tmp_path / f'r{i}'}"])
        Trainer(cfg).run()
        assert f"compilation cache: {want}" in capsys.readouterr().out


def test_visualize_shows_every_token(tmp_path, capsys):
    """`opd-jax visualize` on the base.yaml smoke run rendered every token as an empty string: its random student
    samples ids past the arithmetic task's small vocabulary. Every token now shows, as its text or `<id N>`."""
    from opd_jax.config import load_config
    from opd_jax.visualize import token_kl

    base = os.path.join(REPO, "configs", "base.yaml")
    overrides = [f"run_dir={tmp_path / 'run'}", "sampling.max_new_tokens=8"]
    r = token_kl(load_config(base, overrides))
    assert len(r["pieces"]) == len(r["tokens"]) > 0 and all(r["pieces"])
    assert any(p.startswith("<id ") for p in r["pieces"]) and all(r["teacher_top"])
    out = tmp_path / "kl.html"
    assert cli.main(["visualize", base, *overrides, "--out", str(out)]) == 0
    assert "&lt;id " in out.read_text()
