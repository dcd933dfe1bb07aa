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
