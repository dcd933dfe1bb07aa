"""The package's shape: no import loops, imports that run downward only, every subpackage packaged, and one step
builder shared by the trainer, `opd-jax compile` and the benchmarks."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "opd_jax"

# The method's core: it must never reach up into the run machinery above it.
CORE = ("opd_jax.config", "opd_jax.mesh", "opd_jax.kernels", "opd_jax.models", "opd_jax.losses", "opd_jax.sampling",
        "opd_jax.train_state", "opd_jax.step", "opd_jax.data.task")
ABOVE_CORE = ("opd_jax.trainer", "opd_jax.baselines", "opd_jax.eval", "opd_jax.checkpoint", "opd_jax.metrics",
              "opd_jax.aot", "opd_jax.cli", "opd_jax.visualize", "opd_jax.miniature")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str, known: set[str]) -> str | None:
    """The opd_jax module an import of `name` loads (its longest known prefix), or None outside opd_jax."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the opd_jax modules it imports, at any depth of its code (function-level imports included).
    `from a.b import c` counts as an import of `a.b.c` when that is a module, else of `a.b`."""
    mods = _modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges: set[str] = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    pkg = name if is_pkg else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in known] or [base]  # `from pkg import module` loads the module
            for t in targets:
                if t.split(".")[0] == "experiments":
                    edges.add(t)
                    continue
                r = _resolve(t, known)
                if r is not None and r != name:
                    edges.add(r)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20, sorted(graph)  # the walk found the package
    assert _cycles(graph) == []


def test_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_run_downward():
    graph = import_graph()
    bad = []
    for mod, deps in graph.items():
        for dep in deps:
            if dep.split(".")[0] == "experiments":
                bad.append(f"{mod} -> {dep} (the package never imports experiments/)")
            elif any(mod == c or mod.startswith(c + ".") for c in CORE) and \
                    any(dep == a or dep.startswith(a + ".") for a in ABOVE_CORE):
                bad.append(f"{mod} -> {dep} (core importing the run machinery above it)")
    # the task contract is the data layer's floor: it imports no task implementation
    bad += [f"opd_jax.data.task -> {d}" for d in graph["opd_jax.data.task"] if d.startswith("opd_jax.data.")]
    assert bad == []


def test_every_subpackage_has_an_init():
    """`find_packages` skips a directory without `__init__.py`: a wheel would miss it (it once missed data/)."""
    missing = [str(d.relative_to(ROOT)) for d in PKG.rglob("*") if d.is_dir() and d.name != "__pycache__"
               and any(d.glob("*.py")) and not (d / "__init__.py").exists()]
    assert missing == []


def test_setup_packages_every_subpackage():
    from setuptools import find_packages

    spec = importlib.util.spec_from_file_location("_setup_probe", ROOT / "setup.py")
    assert spec is not None
    text = (ROOT / "setup.py").read_text()
    assert "find_packages(" in text
    found = set(find_packages(str(ROOT), include=["opd_jax", "opd_jax.*"]))
    dirs = {_module_name(p.parent / "__init__.py") for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}
    assert dirs <= found, sorted(dirs - found)


# ---- one step builder ------------------------------------------------------------------------------------------
def _tiny_cfg(tmp_path, algorithm: str = "opd"):
    from opd_jax.config import load_config

    return load_config(None, [
        f"algorithm={algorithm}", f"run_dir={tmp_path / 'run'}", "steps=2", "groups_per_batch=8", "group_size=2",
        "student.vocab_size=32", "student.hidden_size=16", "student.intermediate_size=32", "student.num_layers=1",
        "student.num_heads=2", "student.num_kv_heads=1", "student.head_dim=8",
        "teachers.0.model.vocab_size=32", "teachers.0.model.hidden_size=24", "teachers.0.model.intermediate_size=32",
        "teachers.0.model.num_layers=1", "teachers.0.model.num_heads=2", "teachers.0.model.num_kv_heads=1",
        "teachers.0.model.head_dim=8", "mesh.data=2", "mesh.fsdp=4", "sampling.max_prompt_len=12",
        "sampling.max_new_tokens=6", "sampling.stop_token_ids=[2]", "data.source=synthetic:arithmetic:1:9",
        "logging.tensorboard=false", "logging.progress=false",
    ] + (["loss.kl_penalty_coef=0", "loss.task_reward_coef=1"] if algorithm == "rl" else []))


def _main_signature(lowered) -> list[str]:
    """The lowered program's entry signature: every argument and result with its shape, dtype and sharding."""
    return [line.split(" loc(")[0] for line in lowered.as_text().splitlines() if "func.func public @main" in line]


@pytest.mark.parametrize("algorithm", ["opd", "rl"])
def test_trainer_compile_and_benchmark_share_the_step_builder(tmp_path, monkeypatch, algorithm):
    """The trainer and `opd-jax compile` both call `step.build_opd_step`, with the same builder inputs, and lower
    the same program for the same config: the same entry signature (arguments, results, shardings, donation) and
    the same compiled memory. (The private helper functions of the two lowerings are numbered and inlined
    differently depending on what the process traced before, so their full texts are not compared.) The
    benchmark calls the same builder."""
    import jax

    from opd_jax import aot, step
    from opd_jax.trainer import Trainer

    calls = []
    real = step.build_opd_step

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "build_opd_step", spy)
    monkeypatch.setattr("opd_jax.trainer.build_opd_step", spy)
    cfg = _tiny_cfg(tmp_path, algorithm)
    tr = Trainer(cfg)
    lowered_aot, _ = aot.lower_step(dataclasses.replace(cfg), jax.devices())
    assert len(calls) == 2
    (a_tr, k_tr), (a_aot, k_aot) = calls
    assert a_tr[0] == a_aot[0] and a_tr[1] == a_aot[1]  # config, mesh
    assert a_tr[2].graphdef == a_aot[2].graphdef and [t.graphdef for t in a_tr[3]] == [t.graphdef for t in a_aot[3]]
    assert k_tr["state_shardings"] == k_aot["state_shardings"]
    assert k_tr["teacher_shardings"] == k_aot["teacher_shardings"]
    assert list(k_tr["stop_token_ids"]) == list(k_aot["stop_token_ids"]) == [2]
    shapes = lambda b: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), b)  # noqa: E731

    p = tr.program
    if algorithm == "rl":  # the run reads its answer tokens for the in-program reward; compile stands in zeros
        assert p.feed.example.answer.shape[1] > 0 and k_aot["example_batch"].answer.shape[1] == 0
        return
    assert shapes(k_tr["example_batch"]) == shapes(k_aot["example_batch"])
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))  # noqa: E731
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), p.feed.example,
                         p.feed.shardings)
    lowered_tr = p.jitted.lower(jax.tree.map(sds, tr.state), jax.tree.map(sds, p.teacher_params), batch,
                                sds(p.key), jax.tree.map(sds, p.sampling_params))
    assert _main_signature(lowered_tr) == _main_signature(lowered_aot) != []
    assert str(lowered_tr.compile().memory_analysis()) == str(lowered_aot.compile().memory_analysis())
    bench = (ROOT / "benchmarks" / "opd_step.py").read_text()
    assert "build_opd_step(" in bench and "make_opd_step(" not in bench


def test_ci_installs_the_lowest_supported_versions():
    """setup.py declares ranges, not pins; CI's constraints are exactly the ranges' floors, so the floor is what
    the test suite runs on; and the versions installed here lie inside the ranges."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    text = (ROOT / "setup.py").read_text()
    tree = ast.parse(text)
    consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    reqs_node = next(k.value for k in call.keywords if k.arg == "install_requires")
    reqs = []
    for elt in reqs_node.elts:
        if isinstance(elt, ast.JoinedStr):  # f"jax{JAX_RANGE}"
            reqs.append("".join(v.value if isinstance(v, ast.Constant) else consts[v.value.id] for v in elt.values))
        else:
            reqs.append(elt.value)
    parsed = {Requirement(r).name.lower(): Requirement(r) for r in reqs}
    assert not [r for r in reqs if "==" in r], "exact pins in install_requires"
    lowest = dict(line.split("==") for line in (ROOT / ".ci" / "constraints-lowest.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    for name in ("jax", "flax", "optax", "orbax-checkpoint"):
        floor = next(s.version for s in parsed[name].specifier if s.operator == ">=")
        assert lowest[name] == floor, (name, lowest[name], floor)
        assert parsed[name].specifier.contains(version(name)), (name, version(name), parsed[name].specifier)
    assert "jax[cuda12]" in text and "jax[cuda13]" in text


def test_reading_order_sizes_are_current():
    """The README's reading-order table gives each file's size in lines: within 10% of the file today."""
    import re

    root = Path(__file__).resolve().parent.parent
    rows = re.findall(r"^\| \d+ \| `(opd_jax/[^`]+)` \| (\d+) \|", (root / "README.md").read_text(), re.M)
    assert len(rows) >= 8, rows
    for path, stated in rows:
        actual = len((root / path).read_text().splitlines())
        assert abs(actual - int(stated)) <= 0.1 * actual, f"README says {path} has {stated} lines; it has {actual}"
