"""The miniature's teacher and student, trained once and cached as HF checkpoint dirs.

1. Teacher: SFT from scratch on reference chain solutions with slips and marked corrections (the wrong digit
   carries no loss), so it solves chains and knows how to continue after a slip it would not make.
2. Student: a smaller model mid-trained by SFT on a limited, fixed set of the teacher's own T=1 samples (only the
   graded-correct ones): off-policy distillation, like the published SFT stage before OPD.

Both are graded on the held-out test split, greedy and at T=1. Cache: `<cache_root()>/teacher-<key>/` and
`<cache_root()>/student-<key>/`, each an HF dir plus a JSON of how it was made and how it scores; the key hashes the
models, the task and the recipe, so any change retrains what it affects and nothing else.

    python -m opd_jax.miniature.prepare [--fresh] [--root DIR]   # the default pair into the cache (--fresh: train
                                                                 # it, 6-9 min on 2 cores; else copy the shipped one)

The default pair (`setup.base_config()`, `Recipe()`) ships with the package in `pretrained/<name>-<key>/` (the HF
dir and its JSON, ~2 MB): `prepare` copies it into the cache instead of training when the keys match, so a fresh
install runs the demo in about a minute; `fresh=True` (`opd-jax demo --fresh`) trains anew. A test keeps the shipped
keys equal to the current ones, and `experiments/opd_chains/retrain_check.py` retrains the pair and compares.
Concurrent `prepare` calls on one cache root take turns (a lock file), so two demos never train the same model twice
or read a half-written one.

Every training stream is a `ChainsTask` train stream started at its own `stream_position`, and each one records
the problems it hands out; `prepare` asserts that none of them is an eval problem.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from opd_jax.config import ExperimentConfig, ModelConfig, config_to_dict
from opd_jax.data.chains import assert_held_out, stream_position
from opd_jax.miniature import setup

if TYPE_CHECKING:
    from opd_jax.trainer import Trainer

CACHE_VERSION = 2  # 2: the keys hash the resolved config (`keyed_config`)
Log = Callable[[str], object]
PRETRAINED = Path(__file__).parent / "pretrained"  # the default pair, shipped: <name>-<key>/{<name>/, <name>.json}


@dataclass(frozen=True)
class Recipe:
    """How the teacher and the student are made (all of it enters the cache key)."""

    teacher_steps: int = 1200
    teacher_batch: int = 32
    teacher_lr: float = 3e-3
    teacher_source: str = setup.TEACHER_TASK  # reference solutions with slips and marked corrections
    student_examples: int = 256  # the limited off-policy set: this many correct teacher samples (T=1)
    student_steps: int = 600
    student_batch: int = 32
    student_lr: float = 3e-3
    seed: int = 0

    def teacher_part(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k.startswith("teacher_") or k == "seed"}


@dataclass
class Prepared:
    teacher: str  # HF dir
    student: str  # HF dir
    info: dict

    def overrides(self) -> list[str]:
        """Config overrides that start a run from the cached pair."""
        return [f"student.hf_path={self.student}", f"teachers.0.model.hf_path={self.teacher}"]


# ModelConfig fields that choose how a program runs, not which model it trains (same weights up to float rounding):
# left out of the cache keys. Every other field is part of the key; tests/test_opd_chains.py makes a new field choose.
EXECUTION_FIELDS = ("cpu_decode_kernel", "decode_attention", "decode_unroll")
# ExperimentConfig fields (dotted) outside the cache keys: where a run writes, how it is launched, checkpointed,
# guarded and graded, how a program is split (the same weights up to float rounding), and what every recipe sets for
# itself (`Recipe`, `protocol.BaseRecipe` / `TeacherRecipe`: its steps, batch, rate, schedule, seed). Every other
# field of the resolved config is keyed, so an override such as `sampling.temperature=0.5` or `loss.kl_clip=5`
# trains its own models instead of reusing the shipped ones (a review finding: the keys once hashed only the models,
# the task and the recipes).
OUTSIDE_KEYS = ("run_dir", "resume", "overwrite", "compilation_cache", "topology", "mesh", "micro_batches",
                "checkpoint", "logging", "distributed", "guard", "eval", "sampling.micro_batches", "sampling.layout",
                "sampling.cast_weights", "sampling.decode_segments", "loss.logprob_chunk",
                "algorithm", "steps", "seed", "groups_per_batch", "group_size", "optim.learning_rate",
                "optim.schedule", "optim.warmup_steps")


def _key(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def keyed_config(cfg: ExperimentConfig) -> dict:
    """The part of `cfg` that decides what a cached model learns: the resolved config as a dict without
    `OUTSIDE_KEYS`, and each model without its `hf_path` (where the weights come from is not what they are) and
    `EXECUTION_FIELDS`."""
    d = config_to_dict(cfg)
    for path in OUTSIDE_KEYS:
        *parents, leaf = path.split(".")
        node = d
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    for m in (d["student"], *[t["model"] for t in d["teachers"]]):
        m["hf_path"] = None
        for k in EXECUTION_FIELDS:
            m.pop(k, None)
    return d


def cache_keys(cfg: ExperimentConfig, recipe: Recipe) -> tuple[str, str]:
    """(teacher key, student key): hashes of what determines each model (`keyed_config`: not how a CPU runs it); the
    teacher's leaves out the student (and its LoRA) and the other teachers."""
    d = keyed_config(cfg)
    t = {k: v for k, v in d.items() if k not in ("student", "lora", "teachers")}
    t["teacher"] = d["teachers"][0]
    t_key = _key({"v": CACHE_VERSION, "config": t, "recipe": recipe.teacher_part()})
    s_key = _key({"v": CACHE_VERSION, "teacher_key": t_key, "config": d, "recipe": dataclasses.asdict(recipe)})
    return t_key, s_key


@contextlib.contextmanager
def _locked(root: Path):
    """Hold an exclusive lock on `root` (a cache root) for the duration: one preparer at a time."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _from_shipped(entry: Path, name: str, log: Log) -> bool:
    """Copy the shipped `PRETRAINED/<entry.name>` into `entry` when there is one; True when copied."""
    src = PRETRAINED / entry.name
    if not (src / name / "config.json").exists() or not (src / f"{name}.json").exists():
        return False
    tmp = entry.with_name(entry.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(tmp, entry)
    log(f"[prepare] {name}: the shipped weights ({src}); --fresh trains anew")
    return True


def ready_entries(entries, fresh: bool, log: Log) -> None:
    """Cache entries `(<root>/<name>-<key>, name)` made ready to read or train into: removed with `fresh`, else
    filled from the shipped copy where the cache has no model yet (`_from_shipped`)."""
    for entry, name in entries:
        if fresh:
            shutil.rmtree(entry, ignore_errors=True)
        elif not (entry / name / "config.json").exists():
            _from_shipped(entry, name, log)


def cached_info(entry: Path, name: str) -> dict | None:
    """The JSON record of a cache entry's model when both the record and the HF dir are there, else None."""
    rec = entry / f"{name}.json"
    return json.loads(rec.read_text()) if rec.exists() and (entry / name / "config.json").exists() else None


def sft_config(cfg: ExperimentConfig, model: ModelConfig, *, steps: int, batch: int, lr: float, run_dir: str, seed: int,
               source: str | None = None, warmup: int | None = None, schedule: str = "cosine") -> ExperimentConfig:
    """An SFT run of `model` (a ModelConfig) with `cfg`'s task, sampling and eval settings: `batch` rows a step."""
    c = copy.deepcopy(cfg)
    c.algorithm, c.run_dir, c.steps, c.seed, c.overwrite = "sft", run_dir, steps, seed, True
    c.groups_per_batch, c.group_size = batch, 1
    c.student = copy.deepcopy(model)
    c.teachers = []
    c.optim.learning_rate, c.optim.schedule = lr, schedule
    c.optim.warmup_steps = min(50, steps // 10) if warmup is None else warmup
    c.eval.every = 0
    c.checkpoint.every = 0
    if source is not None:
        c.data.source = source
    return c


def export(trainer: Trainer, out: Path) -> None:
    """The trainer's current weights as an HF dir (replacing `out`)."""
    from opd_jax.models.hf_io import export_hf

    if out.exists():
        shutil.rmtree(out)
    export_hf(trainer.state.trainable, trainer.student.cfg, out, dtype="float32")


def _finished(history: dict) -> None:
    """Raise SystemExit when a training run stopped early (SIGTERM, or a collapse guard that stops): never cache a
    half-trained model."""
    for key in ("preempted_at", "collapsed_at"):
        if key in history:
            raise SystemExit(f"[prepare] stopped at step {history[key]} ({key}); nothing cached")


def grade_both(cfg: ExperimentConfig, model: ModelConfig, hf_dir: Path, work: str, name: str) -> dict:
    """Test accuracy of an HF dir at T=1 and greedily, with 95% intervals."""
    from opd_jax.miniature.measure import grade

    c = copy.deepcopy(cfg)
    c.student = copy.deepcopy(model)
    c.student.hf_path = str(hf_dir)
    c.teachers = []
    out = {}
    for label, temp in (("t1", 1.0), ("greedy", 0.0)):
        acc, rows = grade(c, temperature=temp, split="test", name=f"{name}_{label}", run_dir=os.path.join(work, name))
        out[label] = acc
        out[label]["with_correction"] = sum("!" in x for r in rows for x in r["completions"]) / max(1, len(rows))
    return out


def train_teacher(cfg: ExperimentConfig, recipe: Recipe, out: Path, work: str, log: Log = print) -> dict:
    from opd_jax.baselines.sft import SFTTrainer
    from opd_jax.data import build_task

    t_model = copy.deepcopy(cfg.teachers[0].model)
    t_model.hf_path = None
    c = sft_config(cfg, t_model, steps=recipe.teacher_steps, batch=recipe.teacher_batch, lr=recipe.teacher_lr,
                   run_dir=os.path.join(work, "teacher"), seed=recipe.seed, source=recipe.teacher_source)
    task = build_task(c)
    task.restore({"position": stream_position("teacher", recipe.seed)})
    task.issued = []
    kind = "with marked corrections" if getattr(task, "slips", 0) > 0 else "without slips"
    log(f"[prepare] teacher: {t_model.num_layers} layers, hidden {t_model.hidden_size}, SFT from scratch on reference "
        f"solutions {kind} ({recipe.teacher_source}), {recipe.teacher_steps} steps x "
        f"{recipe.teacher_batch} rows, lr {recipe.teacher_lr:g}")
    t0 = time.time()
    tr = SFTTrainer(c, task)
    _finished(tr.run())
    seconds = time.time() - t0
    assert_held_out(task, task.issued)
    export(tr, out)
    keep_metrics(c.run_dir, out)
    return {"teacher_seconds": seconds, "teacher_rows": len(task.issued)}


def keep_metrics(run_dir: str, out: Path) -> None:
    """The training run's per-step metrics next to the exported model (`<out>.metrics.jsonl`)."""
    src = Path(run_dir) / "metrics.jsonl"
    if src.exists():
        shutil.copy(src, out.parent / f"{out.name}.metrics.jsonl")


def train_student(cfg: ExperimentConfig, recipe: Recipe, teacher_dir: Path, out: Path, work: str,
                  log: Log = print) -> dict:
    import jax

    from opd_jax.baselines.sft import SFTTrainer, teacher_sft_examples
    from opd_jax.data import build_task
    from opd_jax.mesh import make_mesh
    from opd_jax.sampling import SamplingParams
    from opd_jax.train_state import load_model

    s_model = copy.deepcopy(cfg.student)
    s_model.hf_path = None
    c = sft_config(cfg, s_model, steps=recipe.student_steps, batch=recipe.student_batch, lr=recipe.student_lr,
                   run_dir=os.path.join(work, "student"), seed=recipe.seed)
    t0 = time.time()
    mesh = make_mesh(c.mesh)
    t_cfg = copy.deepcopy(cfg.teachers[0].model)
    t_cfg.hf_path = str(teacher_dir)
    teacher = load_model(t_cfg, seed=0, mesh=mesh)
    task = build_task(c)
    task.restore({"position": stream_position("student_pool", recipe.seed)})
    task.issued = []
    stats: dict = {}
    log(f"[prepare] sampling {recipe.student_examples} correct teacher solutions (T=1) for the student's "
        "mid-training (off-policy distillation)")
    examples = teacher_sft_examples(teacher, task, recipe.student_examples, SamplingParams.create(1.0),
                                    max_new_tokens=c.sampling.max_new_tokens, max_prompt_len=c.sampling.max_prompt_len,
                                    mesh=mesh, key=jax.random.key(recipe.seed + 123), batch_size=64, stats=stats,
                                    only_correct=True)
    assert_held_out(task, task.issued)
    log(f"[prepare] student: {s_model.num_layers} layers, hidden {s_model.hidden_size}, SFT on the {len(examples)} "
        f"teacher samples, {recipe.student_steps} steps x {recipe.student_batch} rows, lr {recipe.student_lr:g}")
    tr = SFTTrainer(c, task, examples)
    _finished(tr.run())
    export(tr, out)
    keep_metrics(c.run_dir, out)
    return {"student_seconds": time.time() - t0, "student_pool": len(examples), "teacher_sample_stats": stats,
            "student_pool_rows": len(task.issued)}


def prepare_teacher(cfg: ExperimentConfig, recipe: Recipe, *, name: str = "teacher",
                    root: str | os.PathLike | None = None, fresh: bool = False, log: Log = print) -> tuple[str, dict]:
    """A cached teacher alone (e.g. one trained on `recipe.teacher_source` without slips, for a control), graded on
    the test split: (HF dir, info)."""
    t_key, _ = cache_keys(cfg, recipe)
    root = Path(root) if root else setup.cache_root()
    with _locked(root):
        return _prepare_teacher(cfg, recipe, root / f"{name}-{t_key}", t_key, name, fresh, log)


def _prepare_teacher(cfg: ExperimentConfig, recipe: Recipe, t_root: Path, t_key: str, name: str, fresh: bool,
                     log: Log) -> tuple[str, dict]:
    if fresh:
        shutil.rmtree(t_root, ignore_errors=True)
    t_dir, t_json = t_root / "teacher", t_root / "teacher.json"
    info = cached_info(t_root, "teacher")
    if info is None:
        work = tempfile.mkdtemp(prefix="opd_chains_prep_")
        try:
            t_root.mkdir(parents=True, exist_ok=True)
            info = {"key": t_key, "recipe": recipe.teacher_part(), **train_teacher(cfg, recipe, t_dir, work, log)}
            info["test"] = grade_both(cfg, cfg.teachers[0].model, t_dir, work, name)
            t_json.write_text(json.dumps(info, indent=1))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return str(t_dir), {**info, "trained_now": True}
    return str(t_dir), {**info, "trained_now": False}


def prepare(cfg: ExperimentConfig | None = None, recipe: Recipe | None = None, *, root: str | os.PathLike | None = None,
            fresh: bool = False, grade: bool = True, log: Log = print) -> Prepared:
    """The cached (teacher, student) pair for `cfg` (default: `setup.base_config()`), training what is missing.
    `grade`: also measure both on the test split (T=1 and greedy) when not yet recorded."""
    cfg = cfg or setup.base_config()
    recipe = recipe or Recipe()
    t_key, s_key = cache_keys(cfg, recipe)
    root = Path(root) if root else setup.cache_root()
    with _locked(root):
        return _prepare(cfg, recipe, root, t_key, s_key, fresh, grade, log)


def _prepare(cfg: ExperimentConfig, recipe: Recipe, root: Path, t_key: str, s_key: str, fresh: bool, grade: bool,
             log: Log) -> Prepared:
    t_root, s_root = root / f"teacher-{t_key}", root / f"student-{s_key}"
    ready_entries(((t_root, "teacher"), (s_root, "student")), fresh, log)
    t_dir, s_dir = t_root / "teacher", s_root / "student"
    t_json, s_json = t_root / "teacher.json", s_root / "student.json"
    work = tempfile.mkdtemp(prefix="opd_chains_prep_")
    trained: list[str] = []  # what this call trained (the rest came from the cache)
    try:
        t_info = cached_info(t_root, "teacher")
        if t_info is None:
            t_root.mkdir(parents=True, exist_ok=True)
            t_info = {"key": t_key, "recipe": recipe.teacher_part(), **train_teacher(cfg, recipe, t_dir, work, log)}
            t_json.write_text(json.dumps(t_info, indent=1))
            trained.append("teacher")
        s_info = cached_info(s_root, "student")
        if s_info is None:
            s_root.mkdir(parents=True, exist_ok=True)
            s_info = {"key": s_key, "teacher_key": t_key, "recipe": dataclasses.asdict(recipe),
                      **train_student(cfg, recipe, t_dir, s_dir, work, log)}
            s_json.write_text(json.dumps(s_info, indent=1))
            trained.append("student")
        if grade and "test" not in t_info:
            t_info["test"] = grade_both(cfg, cfg.teachers[0].model, t_dir, work, "teacher")
            t_json.write_text(json.dumps(t_info, indent=1))
            log(f"[prepare] teacher test accuracy: T=1 {t_info['test']['t1']['accuracy']:.3f}, greedy "
                f"{t_info['test']['greedy']['accuracy']:.3f} ({t_info['teacher_seconds']:.0f}s to train)")
        if grade and "test" not in s_info:
            s_info["test"] = grade_both(cfg, cfg.student, s_dir, work, "student")
            s_json.write_text(json.dumps(s_info, indent=1))
            log(f"[prepare] student test accuracy: T=1 {s_info['test']['t1']['accuracy']:.3f}, greedy "
                f"{s_info['test']['greedy']['accuracy']:.3f} ({s_info['student_seconds']:.0f}s to train)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Prepared(str(t_dir), str(s_dir), {"teacher": t_info, "student": s_info, "trained_now": trained})


def main(argv: list[str] | None = None) -> int:
    """`python -m opd_jax.miniature.prepare`: the default pair into the cache, graded on the test split."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fresh", action="store_true", help="train the pair anew (else: the cache, or the shipped pair)")
    p.add_argument("--root", default=None, help="cache root (default: $OPD_JAX_CACHE, else "
                                                "$XDG_CACHE_HOME/opd_jax/opd_chains)")
    a = p.parse_args(argv)
    setup.quiet_jax()
    prep = prepare(root=a.root, fresh=a.fresh)
    t, s = prep.info["teacher"]["test"], prep.info["student"]["test"]
    for name, d, g in (("teacher", prep.teacher, t), ("student", prep.student, s)):
        print(f"{name}: {d}\n  test accuracy T=1 {g['t1']['accuracy']:.3f}, greedy {g['greedy']['accuracy']:.3f}")
    print(f"trained now: {', '.join(prep.info['trained_now']) or 'nothing (cache or shipped pair)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
