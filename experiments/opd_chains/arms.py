"""One training run ("arm") of a compared method from the cached student, and what is measured on it.

Methods (all start from the same mid-trained student and see the same number of sequences per step):

- `opd`: on-policy distillation (the published recipe: student samples, teacher scores the same tokens, per-token
  reverse KL as the advantage of an importance-sampling loss, discount 0);
- `rl`: GRPO with the exact-match reward computed inside the step program, no teacher;
- `sft_fresh`: SFT on fresh teacher samples (T=1, graded correct), a new batch every step (the extrapolated
  "more SFT data" of the published comparison);
- `sft_fixed`: SFT on the fixed teacher-written data set the student was mid-trained on (the published setting's
  fixed SFT corpus), continued.

Every run draws its prompts from its own train stream (`stream_position(method, seed)`), records every training
problem it is handed and asserts that none is a held-out problem (`assert_held_out`). It is evaluated at T=1 on the
validation and test splits every `eval_every` steps (curves), greedily at the end, and the per-token reverse KL of
its final student against the teacher is measured on its own T=1 samples of the test problems.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from experiments.opd_chains.analysis import error_profile
from opd_jax.config import ExperimentConfig
from opd_jax.data.chains import ChainsTask, assert_held_out, split_of, stream_position
from opd_jax.miniature import measure
from opd_jax.miniature.prepare import Prepared
from opd_jax.miniature.setup import base_config

METHODS = ("sft_fresh", "sft_fixed", "rl", "opd")
LABELS = {"opd": "OPD", "rl": "RL (GRPO)", "sft_fresh": "SFT, fresh teacher samples",
          "sft_fixed": "SFT, fixed teacher data set"}


@dataclass
class ArmSpec:
    method: str
    lr: float
    seed: int = 0
    steps: int = 60
    eval_every: int = 10
    warmup: int = 5
    prompts: int = 16  # prompts per step (OPD / RL); SFT trains on prompts x group_size rows a step
    group_size: int = 4
    source: str | None = None  # data.source override (e.g. the single-prompt task)
    teacher: str | None = None  # teacher HF dir override (e.g. recovery: the model's own earlier checkpoint)
    student: str | None = None  # student HF dir override
    tag: str = ""
    stream: str = ""  # name of the prompt stream (default: the method)
    extra: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.tag or f"{self.method}_lr{self.lr:g}_s{self.seed}"


def arm_config(spec: ArmSpec, prep: Prepared, run_dir: str) -> ExperimentConfig:
    ov = [*prep.overrides(), f"run_dir={run_dir}", f"steps={spec.steps}", f"seed={spec.seed}", "overwrite=true",
          f"eval.every={spec.eval_every}", "eval.split=val+test", "eval.temperature=1.0",
          f"optim.learning_rate={spec.lr}", "optim.schedule=constant", f"optim.warmup_steps={spec.warmup}",
          f"groups_per_batch={spec.prompts}", f"group_size={spec.group_size}", "logging.progress=false"]
    if spec.source:
        ov.append(f"data.source={spec.source}")
    if spec.teacher:
        ov.append(f"teachers.0.model.hf_path={spec.teacher}")
    if spec.student:
        ov.append(f"student.hf_path={spec.student}")
    if spec.method == "opd":
        ov.append("algorithm=opd")
    elif spec.method == "rl":
        ov += ["algorithm=rl", "loss.kl_penalty_coef=0", "loss.task_reward_coef=1"]
    elif spec.method == "sft_fresh":
        ov.append("algorithm=sft")
    elif spec.method == "sft_fixed":  # the seed orders the fixed set (SFT starts from the same weights, no sampling)
        ov += ["algorithm=sft", f"data.shuffle_seed={spec.seed}"]
    else:
        raise ValueError(f"unknown method {spec.method!r}")
    cfg = base_config([*ov, *spec.extra])
    if spec.method.startswith("sft"):  # the same sequences per step as OPD / RL, as one SFT batch
        cfg.groups_per_batch, cfg.group_size = spec.prompts * spec.group_size, 1
    return cfg


def step_flops(method: str, cfg: ExperimentConfig, keep_rate: float = 1.0) -> dict:
    """FLOPs of one step as `opd_jax.flops` counts them: student (sampling + training) and teacher (OPD: scoring;
    SFT on fresh samples: sampling its rows, divided by the share rejection sampling keeps; otherwise 0)."""
    from opd_jax import flops
    from opd_jax.models.hf_io import load_hf_config

    s = load_hf_config(cfg.student.hf_path)
    t = load_hf_config(cfg.teachers[0].model.hf_path)
    B, P, N = cfg.batch_size, cfg.sampling.max_prompt_len, cfg.sampling.max_new_tokens
    if method == "opd":
        f = flops.opd_step_flops(s, t, B, P, N)
        return {"student": f["student_total"], "teacher": f["teacher_total"]}
    if method == "rl":
        f = flops.rl_step_flops(s, B, P, N)
        return {"student": f["student_total"], "teacher": 0.0}
    f = flops.sft_flops(s, B, P + N, teacher=t, prompt_len=P)
    teacher = f["teacher_total"] / max(keep_rate, 1e-6) if method == "sft_fresh" else 0.0
    return {"student": f["student_total"], "teacher": teacher}


def results_root() -> Path:
    """Where the miniature's results go: $OPD_CHAINS_RESULTS (`run_all --results` sets it, and its worker processes
    inherit it), else the committed `experiments/opd_chains/results/`."""
    env = os.environ.get("OPD_CHAINS_RESULTS")
    return Path(env) if env else Path(__file__).resolve().parent / "results"


def split_rows(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"val": [], "test": []}
    for r in rows:
        out[split_of(r["text"])].append(r)
    return out


def _finite(obj: object) -> object:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: object) -> None:
    """`obj` as indented JSON at `path`, atomically (a temporary file, then a rename), parents made; JSON without
    Infinity / NaN: a non-finite float (e.g. an unbounded ratio) is written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=1, allow_nan=False))
    tmp.replace(path)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_curve(run_dir: str) -> list[dict]:
    """Per eval step: T=1 accuracy (with intervals) on val and test, from the run's eval/eval_step*.jsonl."""
    d = os.path.join(run_dir, "eval")
    out = []
    for name in os.listdir(d):
        if name.startswith("eval_step") and name.endswith(".jsonl"):
            step = int(name[len("eval_step"): -len(".jsonl")])
            parts = split_rows(read_jsonl(os.path.join(d, name)))
            out.append({"step": step, **{s: measure.summarize_eval(r) for s, r in parts.items()}})
    return sorted(out, key=lambda r: r["step"])


def sample_teacher_rows(cfg: ExperimentConfig, task: ChainsTask, n: int, seed: int) -> tuple[list, dict]:
    """`n` SFT rows of correct teacher samples (T=1) on the task's next prompts, and the sampling counts."""
    import jax

    from opd_jax.baselines.sft import teacher_sft_examples
    from opd_jax.mesh import make_mesh
    from opd_jax.sampling import SamplingParams
    from opd_jax.train_state import load_model

    mesh = make_mesh(cfg.mesh)
    teacher = load_model(cfg.teachers[0].model, seed=0, mesh=mesh)
    stats: dict = {}
    rows = teacher_sft_examples(teacher, task, n, SamplingParams.create(1.0),
                                max_new_tokens=cfg.sampling.max_new_tokens,
                                max_prompt_len=cfg.sampling.max_prompt_len, mesh=mesh,
                                key=jax.random.key(seed + 1000), batch_size=64, stats=stats, only_correct=True)
    return rows, stats


def run_arm(spec: ArmSpec, prep: Prepared, runs_root: str, *, pool: list | None = None,
            log: Callable[[str], object] = print) -> dict:
    """Train one arm, then measure it. `pool`: the fixed SFT data set (`sft_fixed`)."""
    from opd_jax.data import build_task

    run_dir = os.path.abspath(os.path.join(runs_root, spec.name))
    cfg = arm_config(spec, prep, run_dir)
    task = build_task(cfg)
    task.restore({"position": stream_position(spec.stream or spec.method, spec.seed)})
    task.issued = []
    t0 = time.time()
    keep = 1.0
    if spec.method == "sft_fresh":
        from opd_jax.baselines.sft import SFTTrainer

        rows, stats = sample_teacher_rows(cfg, task, spec.steps * cfg.batch_size, spec.seed)
        keep = stats["kept"] / max(1, stats["sampled"])
        h = SFTTrainer(cfg, task, rows).run()
    elif spec.method == "sft_fixed":
        from opd_jax.baselines.sft import SFTTrainer

        if not pool:
            raise ValueError("sft_fixed needs the fixed data set (pool)")
        h = SFTTrainer(cfg, task, pool).run()
    elif spec.method == "rl":
        from opd_jax.baselines.rl import make_rl_trainer

        h = make_rl_trainer(cfg, task).run()
    else:
        from opd_jax.trainer import Trainer

        h = Trainer(cfg, task).run()
    train_s = time.time() - t0
    if "preempted_at" in h:
        raise SystemExit(f"{spec.name}: stopped at step {h['preempted_at']}")
    checked = assert_held_out(task, task.issued)
    curve = eval_curve(run_dir)
    final_t1 = split_rows(read_jsonl(os.path.join(run_dir, "eval", f"eval_step{spec.steps}.jsonl")))
    _, g_rows = measure.grade(cfg, temperature=0.0, split="val+test", name="final_greedy", run_dir=run_dir)
    final_greedy = split_rows(g_rows)
    kl = measure.heldout_kl(cfg, final_t1["test"], run_dir=run_dir)
    probe = measure.correction_probe(cfg, cfg.student, run_dir=run_dir)
    f = step_flops(spec.method, cfg, keep)
    rec = {
        "name": spec.name, "spec": asdict(spec), "method": spec.method, "lr": spec.lr, "seed": spec.seed,
        "steps": spec.steps, "sequences_per_step": cfg.batch_size, "curve": curve,
        "final": {"t1": {s: measure.summarize_eval(r) for s, r in final_t1.items()},
                  "greedy": {s: measure.summarize_eval(r) for s, r in final_greedy.items()}},
        "kl_test": kl, "probe": probe, "errors_test_t1": error_profile(final_t1["test"]), "flops_per_step": f,
        "keep_rate": keep, "train_rows_checked": checked,
        "train_s": train_s, "wall_s": time.time() - t0,
        "single_prompt_text": task.problem(0).text if task.single else None,
    }
    t1, g = rec["final"]["t1"]["test"], rec["final"]["greedy"]["test"]
    log(f"[{spec.name}] test T=1 {curve[0]['test']['accuracy']:.3f} -> {t1['accuracy']:.3f}, greedy "
        f"{g['accuracy']:.3f}, KL {kl['kl_exact']:.3f}; {rec['wall_s']:.0f}s")
    return rec


def copy_metrics(rec: dict, runs_root: str, results_dir: str) -> None:
    """The run's metrics.jsonl and its record into results/runs/."""
    os.makedirs(os.path.join(results_dir, "runs"), exist_ok=True)
    shutil.copy(os.path.join(runs_root, rec["name"], "metrics.jsonl"),
                os.path.join(results_dir, "runs", f"{rec['name']}.metrics.jsonl"))
    with open(os.path.join(results_dir, "runs", f"{rec['name']}.json"), "w", encoding="utf-8") as fh:
        json.dump(rec, fh, indent=1)


def with_spec(spec: ArmSpec, **changes) -> ArmSpec:
    s = copy.deepcopy(spec)
    for k, v in changes.items():
        setattr(s, k, v)
    return s
