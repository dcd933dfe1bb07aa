"""Config system: YAML extends, overrides, validation errors, sweeps, save/load."""

from __future__ import annotations

import os
import shlex
import textwrap

import pytest

from opd_jax.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    TeacherConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    expand_sweep,
    load_config,
    save_config,
    to_yaml,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


# --- loading and extends ---------------------------------------------------------------------------------------------


def test_defaults_and_partial_yaml(tmp_path):
    assert load_config(None) == ExperimentConfig()
    cfg = load_config(write(tmp_path / "a.yaml", "steps: 7\noptim: {learning_rate: 1e-4}\n"))
    assert cfg.steps == 7
    assert cfg.optim.learning_rate == 1e-4 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.optim.b2 == 0.95  # untouched fields keep schema defaults
    assert load_config(write(tmp_path / "empty.yaml", "")) == ExperimentConfig()


def test_extends_chain_and_relative_paths(tmp_path):
    write(tmp_path / "base.yaml", "steps: 1\nseed: 1\noptim: {learning_rate: 0.1, warmup_steps: 5}\n")
    write(tmp_path / "mid" / "mid.yaml", "extends: ../base.yaml\nseed: 2\noptim: {learning_rate: 0.2}\n")
    leaf = write(tmp_path / "mid" / "exp" / "leaf.yaml", "extends: ../mid.yaml\noptim: {schedule: cosine}\n")
    cfg = load_config(leaf)
    assert (cfg.steps, cfg.seed) == (1, 2)
    assert cfg.optim.learning_rate == 0.2  # mid overrides base
    assert cfg.optim.warmup_steps == 5  # nested mappings merge key by key
    assert cfg.optim.schedule == "cosine"


def test_extends_list_merges_in_order(tmp_path):
    write(tmp_path / "a.yaml", "steps: 1\nseed: 10\nlora: {rank: 4, targets: [q, k]}\n")
    write(tmp_path / "b.yaml", "steps: 2\nlora: {targets: [v]}\n")
    top = write(tmp_path / "top.yaml", "extends: [a.yaml, b.yaml]\ngroup_size: 3\n")
    cfg = load_config(top)
    assert (cfg.steps, cfg.seed, cfg.group_size) == (2, 10, 3)
    assert cfg.lora.rank == 4
    assert cfg.lora.targets == ["v"]  # lists are replaced, not merged


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: c.yaml\n")
    write(tmp_path / "c.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as e:
        load_config(str(tmp_path / "a.yaml"))
    assert "a.yaml -> " in str(e.value) and "c.yaml" in str(e.value)
    # a diamond (two bases sharing a base) is not a cycle
    write(tmp_path / "d.yaml", "steps: 4\n")
    write(tmp_path / "e.yaml", "extends: d.yaml\n")
    write(tmp_path / "f.yaml", "extends: d.yaml\nseed: 5\n")
    assert load_config(write(tmp_path / "g.yaml", "extends: [e.yaml, f.yaml]\n")).steps == 4


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(write(tmp_path / "a.yaml", "extends: nope.yaml\n"))


def test_interpolation(tmp_path):
    path = write(tmp_path / "a.yaml", "sampling: {temperature: 0.7}\neval: {temperature: '${sampling.temperature}'}\n")
    assert load_config(path).eval.temperature == 0.7
    assert load_config(path, ["sampling.temperature=0.3"]).eval.temperature == 0.3  # overrides come first
    with pytest.raises(ConfigError, match=r"^eval\.source: interpolation failed"):
        load_config(None, ["eval.source=${nowhere.key}"])


# --- overrides -------------------------------------------------------------------------------------------------------


def test_override_coercion():
    cfg = load_config(
        None,
        [
            "steps=100",
            "optim.learning_rate=1e-4",
            "optim.b1=0",  # an int is fine for a float field
            "logging.wandb=true",
            "sampling.stop_token_ids=[1,2]",
            "lora.targets=[q,v]",
            "distributed.num_processes=null",
            "student.hf_path=gs://bucket/qwen3-0.6b",
            "data.name=123",  # a str field keeps the text
            "data.source=jsonl:/tmp/a=b.jsonl",  # '=' in the value
            "loss.kind=reverse_kl",
            "topology=v5p-64",
        ],
    )
    assert cfg.steps == 100 and type(cfg.steps) is int
    assert cfg.optim.learning_rate == 1e-4 and type(cfg.optim.learning_rate) is float
    assert cfg.optim.b1 == 0.0 and type(cfg.optim.b1) is float
    assert cfg.logging.wandb is True
    assert cfg.sampling.stop_token_ids == [1, 2]
    assert cfg.lora.targets == ["q", "v"]
    assert cfg.distributed.num_processes is None
    assert cfg.student.hf_path == "gs://bucket/qwen3-0.6b"
    assert cfg.data.name == "123"
    assert cfg.data.source == "jsonl:/tmp/a=b.jsonl"
    assert cfg.loss.kind == "reverse_kl"
    assert cfg.topology == "v5p-64"
    assert load_config(None, ["topology=null"]).topology is None


def test_apply_overrides_returns_new_config():
    cfg = ExperimentConfig()
    new = apply_overrides(cfg, ["seed=3", "eval.every=5"])
    assert (new.seed, new.eval.every) == (3, 5)
    assert (cfg.seed, cfg.eval.every) == (0, 0)
    assert apply_overrides(new, ["seed=-1"]).seed == -1


def test_teacher_list_indexing(tmp_path):
    path = write(
        tmp_path / "t.yaml",
        """
        algorithm: sft   # teachers of other vocabularies than the student's are fine when nothing scores with them
        teachers:
          - name: math
            model: {preset: qwen3-4b}
          - name: code
            datasets: [code]
        """,
    )
    cfg = load_config(path, ["teachers.0.model.preset=qwen3-8b", "teachers.1.model.num_layers=3"])
    assert [t.name for t in cfg.teachers] == ["math", "code"]
    # the preset is expanded at load: the config lists qwen3-8b's dimensions (not qwen3-4b's) and names no preset
    assert cfg.teachers[0].model.preset is None
    assert (cfg.teachers[0].model.num_layers, cfg.teachers[0].model.hidden_size) == (36, 4096)
    assert cfg.teachers[1].model.num_layers == 3
    assert cfg.teachers[1].model.hidden_size == 64  # schema default filled in
    assert cfg.teachers[1].datasets == ["code"]
    # one past the end appends a default teacher
    cfg = load_config(None, ["teachers.1.name=second", "teachers.1.model.preset=tiny", "algorithm=sft"])
    assert cfg.teachers == [TeacherConfig(), TeacherConfig(name="second", model=cfg.teachers[1].model)]
    assert cfg.teachers[1].model == ModelConfig()  # `tiny` is the ModelConfig defaults
    with pytest.raises(ConfigError, match="out of range"):
        load_config(None, ["teachers.5.name=x"])
    with pytest.raises(ConfigError, match="integer index"):
        load_config(None, ["teachers.first.name=x"])
    typo = r"unknown key 'teachers\.0\.model\.presett' — did you mean 'teachers\.0\.model\.preset'"
    with pytest.raises(ConfigError, match=typo):
        load_config(None, ["teachers.0.model.presett=x"])


def test_preset_explicit_fields_win_whatever_they_equal(tmp_path):
    """Issue #23: `student.num_layers=2` after `student.preset=bench-3m` (4 layers) trained 4 layers and config.yaml
    said 2, because 2 is the ModelConfig default. A preset expands where it is set; fields set there or later win."""
    from opd_jax.config.presets import get_preset
    from opd_jax.models.weights import num_params

    bench = get_preset("bench-3m")
    cfg = load_config(os.path.join(REPO, "configs", "base.yaml"), ["student.preset=bench-3m", "student.num_layers=2"])
    want = ModelConfig(**{**bench, "num_layers": 2, "param_dtype": "float32", "dtype": "float32"})
    assert bench["num_layers"] == 4 and ModelConfig().num_layers == 2
    assert cfg.student == want  # the YAML's hidden_size 64 gave way to the preset set after it
    assert num_params(cfg.student) == num_params(want)  # what trains
    saved = load_config(save_config(cfg, str(tmp_path / "run")))  # config.yaml describes the model that trained
    assert saved.student == want
    # in one YAML layer, and across `extends:`
    one = write(tmp_path / "one.yaml", "student: {preset: bench-3m, num_layers: 2}\nalgorithm: sft\n")
    assert load_config(one).student.num_layers == 2
    child = write(tmp_path / "child.yaml", "extends: one.yaml\nstudent: {hidden_size: 64}\n")
    assert (load_config(child).student.num_layers, load_config(child).student.hidden_size) == (2, 64)
    over = write(tmp_path / "over.yaml", "extends: one.yaml\nstudent: {preset: qwen3-0.6b}\n")
    assert load_config(over).student.num_layers == 28  # a later preset replaces the earlier layer's fields
    # a ModelConfig built in Python (never expanded): fields that differ from the defaults are the explicit ones
    py = apply_overrides(ExperimentConfig(algorithm="sft", student=ModelConfig(preset="bench-3m", num_layers=3)),
                         ["steps=2"])
    assert (py.student.num_layers, py.student.hidden_size) == (3, bench["hidden_size"])


# --- errors ----------------------------------------------------------------------------------------------------------


def test_typo_in_cli_override_suggests_key():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.learnig_rate=1e-4"])
    assert str(e.value) == "unknown key 'optim.learnig_rate' — did you mean 'optim.learning_rate'?"
    # a key in the wrong section points at where it lives
    with pytest.raises(ConfigError, match="did you mean 'optim.learning_rate'"):
        load_config(None, ["learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["steps"])
    with pytest.raises(ConfigError, match="has no key"):
        load_config(None, ["steps.x=1"])


def test_typo_in_yaml_suggests_key_and_names_file(tmp_path):
    write(tmp_path / "base.yaml", "sampling:\n  max_new_tokns: 8\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    msg = str(e.value)
    assert "base.yaml" in msg
    assert "unknown key 'sampling.max_new_tokns' — did you mean 'sampling.max_new_tokens'?" in msg
    with pytest.raises(ConfigError, match=r"unknown key 'teachers\.0\.modle' — did you mean 'teachers\.0\.model'"):
        load_config(write(tmp_path / "t.yaml", "teachers: [{modle: {}}]\n"))
    with pytest.raises(ConfigError, match="duplicate key 'steps'"):
        load_config(write(tmp_path / "dup.yaml", "steps: 1\nsteps: 2\n"))


def test_type_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.learning_rate=abc"])
    assert str(e.value) == "optim.learning_rate: expected float, got str 'abc'"
    with pytest.raises(ConfigError, match=r"^steps: expected int, got float 1\.5$"):
        load_config(None, ["steps=1.5"])
    with pytest.raises(ConfigError, match=r"^logging\.wandb: expected bool, got str 'yes please'$"):
        load_config(None, ["logging.wandb=yes please"])
    with pytest.raises(ConfigError, match=r"^steps: expected int, got NoneType None$"):
        load_config(None, ["steps=null"])
    with pytest.raises(ConfigError, match=r"sampling\.stop_token_ids\.1: expected int, got str 'x'"):
        load_config(None, ["sampling.stop_token_ids=[1,x]"])
    with pytest.raises(ConfigError, match=r"^student\.num_layers: expected int, got str 'two'$"):
        load_config(write(tmp_path / "a.yaml", "student: {num_layers: two}\n"))
    with pytest.raises(ConfigError, match=r"^optim: expected mapping \(OptimConfig\), got int 3$"):
        load_config(write(tmp_path / "b.yaml", "optim: 3\n"))
    with pytest.raises(ConfigError, match=r"^seed: expected int, got bool True$"):
        config_from_dict({"seed": True})


def test_literal_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["loss.kind=reverse_kll"])
    msg = str(e.value)
    assert msg.startswith("loss.kind: expected one of 'importance_sampling', 'ppo', 'reverse_kl'")
    assert msg.endswith("got 'reverse_kll'")
    with pytest.raises(ConfigError, match=r"^student\.dtype: expected one of 'float32', 'bfloat16', got 'fp16'$"):
        load_config(write(tmp_path / "a.yaml", "student: {dtype: fp16}\n"))
    assert load_config(None, ["student.dtype=bfloat16"]).student.dtype == "bfloat16"


# --- save / load -----------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        os.path.join(REPO, "configs", "base.yaml"),
        [
            "optim.learning_rate=3e-5",
            "optim.eps=1e-12",
            "teachers.1.name=second",
            "teachers.1.datasets=[other]",
            "data.tokenizer=null",
            "student.hf_path=/ckpt/qwen3",
            "sampling.stop_token_ids=[151645]",
            "data.name=true",  # strings that look like other types survive
            "eval.source=jsonl:'quoted'",  # quotes survive as part of the string
        ],
    )
    path = save_config(cfg, str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with open(path) as f:
        text = f.read()
    assert text == to_yaml(cfg) and "learning_rate: 3.0e-05" in text
    assert load_config(path).data.name == "true"


def test_repo_configs_load():
    cfg = load_config(os.path.join(REPO, "configs", "base.yaml"))
    assert cfg.algorithm == "opd" and cfg.student.hidden_size == 64 and len(cfg.teachers) == 1
    runs = expand_sweep(os.path.join(REPO, "configs", "sweeps", "example.yaml"))
    assert len(runs) == 8
    assert len({r.config.run_dir for r in runs}) == 8


# --- sweeps ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def base(tmp_path):
    return write(tmp_path / "base.yaml", "steps: 2\nrun_dir: runs/ignored\n")


def test_sweep_grid(tmp_path, base):
    sweep = write(
        tmp_path / "sweeps" / "lr.yaml",
        """
        base: ../base.yaml
        overrides: {seed: 7}
        grid:
          loss.kl_penalty_coef: [0.5, 1.0]
          optim.learning_rate: [1e-4, 3e-4, 0.001]
        """,
    )
    runs = expand_sweep(sweep)
    assert len(runs) == 6
    assert runs[0].name == "lr/kl_penalty_coef=0.5,learning_rate=1e-4"
    assert [r.name.split("/")[1] for r in runs[3:]] == [
        "kl_penalty_coef=1.0,learning_rate=1e-4",
        "kl_penalty_coef=1.0,learning_rate=3e-4",
        "kl_penalty_coef=1.0,learning_rate=1e-3",  # shortest spelling
    ]
    r = runs[4]
    assert (r.config.loss.kl_penalty_coef, r.config.optim.learning_rate) == (1.0, 3e-4)
    assert r.config.seed == 7 and r.config.steps == 2
    assert r.config.run_dir == "runs/lr/kl_penalty_coef=1.0,learning_rate=3e-4"
    assert r.overrides == [
        "seed=7",
        "loss.kl_penalty_coef=1.0",
        "optim.learning_rate=3e-4",
        "run_dir=runs/lr/kl_penalty_coef=1.0,learning_rate=3e-4",
    ]
    # the command reproduces the run exactly
    argv = shlex.split(r.command())
    assert argv[:3] == ["opd-jax", "train", base]
    assert load_config(argv[2], argv[3:]) == r.config


def test_sweep_zip_and_grid_cross(tmp_path, base):
    sweep = write(
        tmp_path / "sweeps" / "cross.yaml",
        """
        name: my sweep
        base: ../base.yaml
        run_dir: /data/sweeps/cross/
        grid: {optim.learning_rate: [1e-4, 2e-4]}
        zip:
          sampling.temperature: [1.0, 0.7, 0.5]
          eval.temperature: [1.0, 0.7, 0.5]
          lora.targets: [[q, v], [q], [o]]
        """,
    )
    runs = expand_sweep(sweep)
    assert len(runs) == 2 * 3
    r = runs[1]
    assert r.name == "my_sweep/learning_rate=1e-4,sampling.temperature=0.7,eval.temperature=0.7,targets=q"
    assert (r.config.sampling.temperature, r.config.eval.temperature, r.config.lora.targets) == (0.7, 0.7, ["q"])
    assert runs[0].config.lora.targets == ["q", "v"] and "targets=q+v" in runs[0].name
    assert r.config.run_dir == "/data/sweeps/cross/" + r.name.split("/", 1)[1]
    assert len({run.name for run in runs}) == 6
    assert all("/" not in run.name.split("/", 1)[1] for run in runs)

    # zip only
    only = write(tmp_path / "sweeps" / "zip.yaml", "base: ../base.yaml\nzip: {seed: [1, 2], steps: [10, 20]}\n")
    runs = expand_sweep(only)
    assert [r.name for r in runs] == ["zip/seed=1,steps=10", "zip/seed=2,steps=20"]
    assert [(r.config.seed, r.config.steps) for r in runs] == [(1, 10), (2, 20)]


def test_sweep_pinned_run_dir_and_no_axes(tmp_path, base):
    pinned = write(tmp_path / "s" / "p.yaml", "base: ../base.yaml\ngrid: {run_dir: [out/a, out/b]}\n")
    assert [r.config.run_dir for r in expand_sweep(pinned)] == ["out/a", "out/b"]
    single = write(tmp_path / "s" / "one.yaml", "base: ../base.yaml\noverrides: {steps: 9}\n")
    (run,) = expand_sweep(single)
    assert run.name == "one/base" and run.config.run_dir == "runs/one/base" and run.config.steps == 9


def test_sweep_errors(tmp_path, base):
    def sweep(text):
        return expand_sweep(write(tmp_path / "s" / "bad.yaml", text))

    with pytest.raises(ConfigError, match="equal lengths"):
        sweep("base: ../base.yaml\nzip: {seed: [1, 2], steps: [1]}\n")
    with pytest.raises(ConfigError, match="did you mean 'grid'"):
        sweep("base: ../base.yaml\ngird: {seed: [1]}\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.learnig_rate' — did you mean 'optim.learning_rate'"):
        sweep("base: ../base.yaml\ngrid: {optim.learnig_rate: [1e-4]}\n")
    with pytest.raises(ConfigError, match="non-empty list"):
        sweep("base: ../base.yaml\ngrid: {seed: 3}\n")
    for key in ("grid", "zip"):  # an empty mapping is no axis: an error, not one silent run
        with pytest.raises(ConfigError, match=f"bad.yaml: '{key}' is empty"):
            sweep(f"base: ../base.yaml\n{key}: {{}}\n")
    with pytest.raises(ConfigError, match="'base'.*required"):
        sweep("grid: {seed: [1]}\n")
    with pytest.raises(ConfigError, match="both 'grid' and 'zip'"):
        sweep("base: ../base.yaml\ngrid: {seed: [1]}\nzip: {seed: [2]}\n")
    with pytest.raises(ConfigError, match=r"loss\.kind: expected one of"):
        sweep("base: ../base.yaml\ngrid: {loss.kind: [ppo, bogus]}\n")
