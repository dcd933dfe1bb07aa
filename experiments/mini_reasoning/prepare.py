"""Stage 0: the teacher (SFT from scratch on reference scratchpad solutions) and the student (mid-trained by SFT
on a limited set of teacher samples: off-policy distillation), cached as HF checkpoint dirs.

    python -m experiments.mini_reasoning.prepare [--fresh] [key=value ...]

Cache: <cache_root()>/teacher-<hash of teacher + task + teacher recipe>/teacher/ and
<cache_root()>/<hash of both models + task + recipe>/student/ (config.json + safetensors), each with a JSON of its
held-out accuracy (greedy decoding) and the eval settings it was measured with (other settings re-evaluate the
cached models): a new student recipe reuses the cached teacher.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from experiments.mini_reasoning import common


@dataclass
class PrepRecipe:
    teacher_steps: int = 1500
    teacher_batch: int = 32
    teacher_lr: float = 6e-3
    student_examples: int = 4096  # the limited off-policy set: this many correct teacher samples
    student_steps: int = 500
    student_batch: int = 32
    student_lr: float = 6e-3
    seed: int = 0
    only_correct: bool = True  # keep only graded-correct teacher samples (off for the CI test's tiny teacher)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        if d["only_correct"]:  # the default, left out of the cache key (keys written before the field existed)
            d.pop("only_correct")
        return d


@dataclass
class Prepared:
    teacher: str
    student: str
    info: dict

    def overrides(self) -> list[str]:
        """Config overrides that start a stage from the cached pair."""
        return [f"student.hf_path={self.student}", f"teachers.0.model.hf_path={self.teacher}"]


def _sft_cfg(cfg, model, *, steps: int, batch: int, lr: float, run_dir: str, seed: int, progress: bool):
    c = common.load("base")
    c.__dict__.update({k: copy.deepcopy(getattr(cfg, k)) for k in ("sampling", "data", "eval", "mesh")})
    c.algorithm, c.run_dir, c.steps, c.seed = "sft", run_dir, steps, seed
    c.groups_per_batch, c.group_size = batch, 1
    c.student = model
    c.teachers = []
    c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps = lr, "cosine", min(20, steps // 10)
    c.eval.every, c.eval.source = 0, ""  # no eval at step 0: one eval after training (`_final_accuracy`)
    c.logging.progress = progress
    c.logging.tensorboard = False
    c.checkpoint.every = 0
    return c


def _export(trainer, model_cfg, out: Path) -> None:
    from opd_jax.models.hf_io import export_hf

    if out.exists():
        shutil.rmtree(out)
    export_hf(trainer.state.trainable, trainer.student.cfg if model_cfg is None else model_cfg, out,
              dtype="float32")


def _check_finished(history: dict) -> None:
    if "preempted_at" in history:  # SIGTERM: never cache a half-trained model
        raise SystemExit(f"[prepare] stopped at step {history['preempted_at']}; nothing cached")


def _final_accuracy(trainer) -> float:
    """Greedy accuracy on the task's held-out eval problems (written to the run's eval/ dir)."""
    return float(trainer.run_eval("eval_final")["eval_accuracy"])


def eval_signature(cfg) -> dict:
    """What a cached accuracy was measured with. The models do not depend on it (only `eval.source` enters the
    cache key), so when it changes the cached models are re-evaluated, not retrained."""
    e = cfg.eval
    return {"num_problems": e.num_problems, "max_new_tokens": e.max_new_tokens, "temperature": e.temperature,
            "top_k": e.top_k, "top_p": e.top_p, "k": e.k}


def _evaluate_cached(cfg, model, hf_dir: Path, run_dir: str) -> float:
    """Accuracy of a cached HF dir on `cfg`'s eval set, with the eval settings `_final_accuracy` uses."""
    from opd_jax.eval.run import run_eval

    model = copy.deepcopy(model)
    model.hf_path = str(hf_dir)
    c = _sft_cfg(cfg, model, steps=0, batch=1, lr=0.0, run_dir=run_dir, seed=0, progress=False)
    result, _ = run_eval(c, out_name="eval_cached")
    if result is None:
        raise ValueError(f"the task of {cfg.data.source!r} has no eval problems to grade {hf_dir} on")
    return float(result.avg_at_k)


def prepare(cfg=None, recipe: PrepRecipe | None = None, *, root: str | os.PathLike | None = None,
            fresh: bool = False, progress: bool = True, log=print) -> Prepared:
    """The cached (teacher, student) pair for `cfg` (default configs/mini_reasoning/base.yaml), training what is
    missing."""

    cfg = cfg or common.load("base")
    recipe = recipe or PrepRecipe()
    key = common.prep_key(cfg, recipe.as_dict())
    root = Path(root) if root else common.cache_root()
    out, t_out = root / key, root / f"teacher-{common.prep_key(cfg, recipe.as_dict(), teacher_only=True)}"
    info_path, t_info_path = out / "prep.json", t_out / "teacher.json"
    t_dir, s_dir = t_out / "teacher", out / "student"
    for d in (out, t_out) if fresh else ():
        if d.exists():
            shutil.rmtree(d)
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    t_info = json.loads(t_info_path.read_text()) if t_info_path.exists() else {}
    if t_info.get("teacher_accuracy") is not None and info.get("teacher_dir") != str(t_dir):
        info.pop("student_accuracy", None)  # a student sampled from another teacher
    info.update(t_info)
    out.mkdir(parents=True, exist_ok=True)
    t_out.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="opd_mini_prep_")
    sig = eval_signature(cfg)

    from opd_jax.baselines.sft import SFTTrainer, teacher_sft_examples
    from opd_jax.data import build_task
    from opd_jax.sampling import SamplingParams
    from opd_jax.train_state import load_model

    try:
        if "teacher_accuracy" not in info or not (t_dir / "config.json").exists():
            t_model = copy.deepcopy(cfg.teachers[0].model)
            t_model.hf_path = None
            c = _sft_cfg(cfg, t_model, steps=recipe.teacher_steps, batch=recipe.teacher_batch,
                         lr=recipe.teacher_lr, run_dir=os.path.join(work, "teacher"), seed=recipe.seed,
                         progress=progress)
            log(f"[prepare] training the teacher from scratch: {t_model.num_layers} layers, hidden "
                f"{t_model.hidden_size}, SFT on reference solutions, {recipe.teacher_steps} steps x "
                f"{recipe.teacher_batch} rows")
            t0 = time.time()
            tr = SFTTrainer(c)
            _check_finished(tr.run())
            _export(tr, None, t_dir)
            t_info = dict(teacher_accuracy=_final_accuracy(tr), teacher_eval=sig, teacher_seconds=time.time() - t0,
                          teacher_steps=recipe.teacher_steps, teacher_batch=recipe.teacher_batch)
            t_info_path.write_text(json.dumps(t_info, indent=1))
            info.update(t_info)
            info.pop("student_accuracy", None)  # a new teacher invalidates the student
            info_path.write_text(json.dumps(info, indent=1))
            log(f"[prepare] teacher: held-out greedy accuracy {info['teacher_accuracy']:.3f} "
                f"({info['teacher_seconds']:.0f}s) -> {t_dir}")
        elif info.get("teacher_eval") != sig:  # cached teacher, accuracy measured with other eval settings
            t_info.update(teacher_accuracy=_evaluate_cached(cfg, cfg.teachers[0].model, t_dir,
                                                            os.path.join(work, "teacher_eval")), teacher_eval=sig)
            t_info_path.write_text(json.dumps(t_info, indent=1))
            info.update(t_info)
            log(f"[prepare] cached teacher re-evaluated with the current eval settings: accuracy "
                f"{info['teacher_accuracy']:.3f}")
        if "student_accuracy" not in info or not (s_dir / "config.json").exists():
            s_model = copy.deepcopy(cfg.student)
            s_model.hf_path = None
            c = _sft_cfg(cfg, s_model, steps=recipe.student_steps, batch=recipe.student_batch,
                         lr=recipe.student_lr, run_dir=os.path.join(work, "student"), seed=recipe.seed,
                         progress=progress)
            t0 = time.time()
            import jax

            from opd_jax.mesh import make_mesh

            mesh = make_mesh(c.mesh)
            t_cfg = copy.deepcopy(cfg.teachers[0].model)
            t_cfg.hf_path = str(t_dir)
            teacher = load_model(t_cfg, seed=0, mesh=mesh)
            task = build_task(c)
            stats: dict = {}
            sp = SamplingParams.create(1.0, 0, 1.0, False)
            log(f"[prepare] sampling {recipe.student_examples} correct teacher solutions for the student's "
                "mid-training (off-policy distillation)")
            examples = teacher_sft_examples(teacher, task, recipe.student_examples, sp,
                                            max_new_tokens=c.sampling.max_new_tokens,
                                            max_prompt_len=c.sampling.max_prompt_len, mesh=mesh,
                                            key=jax.random.key(recipe.seed + 123), batch_size=64, stats=stats,
                                            only_correct=recipe.only_correct)
            log(f"[prepare] training the student: {s_model.num_layers} layers, hidden {s_model.hidden_size}, "
                f"SFT on the {len(examples)} teacher samples, {recipe.student_steps} steps x {recipe.student_batch}")
            tr = SFTTrainer(c, task, examples)
            _check_finished(tr.run())
            _export(tr, None, s_dir)
            info.update(student_accuracy=_final_accuracy(tr), student_eval=sig, student_seconds=time.time() - t0,
                        student_examples=len(examples), student_steps=recipe.student_steps,
                        student_batch=recipe.student_batch, teacher_sample_stats=stats,
                        teacher_prompt_len=c.sampling.max_prompt_len)
            info_path.write_text(json.dumps(info, indent=1))
            log(f"[prepare] student: held-out greedy accuracy {info['student_accuracy']:.3f} "
                f"({info['student_seconds']:.0f}s) -> {s_dir}")
        elif info.get("student_eval") != sig:
            info.update(student_accuracy=_evaluate_cached(cfg, cfg.student, s_dir, os.path.join(work, "student_eval")),
                        student_eval=sig)
            log(f"[prepare] cached student re-evaluated with the current eval settings: accuracy "
                f"{info['student_accuracy']:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info.update(key=key, teacher_dir=str(t_dir), recipe={**recipe.as_dict(), "only_correct": recipe.only_correct})
    info_path.write_text(json.dumps(info, indent=1))
    return Prepared(str(t_dir), str(s_dir), info)


def start_stage(a):
    """For a stage with `common.add_stage_args`: absolute runs dir, results/runs/ created, the base config and the
    cached (teacher, student) pair."""
    os.makedirs(os.path.join(a.results, "runs"), exist_ok=True)
    base = common.load("base", a.overrides)
    return os.path.abspath(a.runs), base, prepare(base, PrepRecipe(**json.loads(a.recipe)))


def main(argv: list[str] | None = None) -> int:
    common.quiet_jax()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fresh", action="store_true", help="retrain even when cached")
    p.add_argument("--recipe", default="{}", help="JSON of PrepRecipe fields, e.g. '{\"teacher_steps\": 800}'")
    p.add_argument("overrides", nargs="*", help="config overrides of configs/mini_reasoning/base.yaml")
    a = p.parse_args(argv)
    prep = prepare(common.load("base", a.overrides), PrepRecipe(**json.loads(a.recipe)), fresh=a.fresh)
    print(json.dumps(prep.info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
