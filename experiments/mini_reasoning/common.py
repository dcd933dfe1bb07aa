"""Shared pieces of the mini reasoning experiment: configs, the checkpoint cache, metrics helpers."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

from opd_jax.config import ExperimentConfig, load_config
from opd_jax.config.loader import config_to_dict

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "mini_reasoning"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def config_path(name: str = "base") -> str:
    return str(CONFIG_DIR / f"{name}.yaml")


def load(name: str = "base", overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """A config of configs/mini_reasoning/ with `key=value` overrides."""
    return load_config(config_path(name), list(overrides))


def cache_root() -> Path:
    """$OPD_JAX_CACHE, else $XDG_CACHE_HOME/opd_jax/mini_reasoning, else ~/.cache/opd_jax/mini_reasoning."""
    if os.environ.get("OPD_JAX_CACHE"):
        return Path(os.environ["OPD_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "opd_jax" / "mini_reasoning"


def prep_key(cfg: ExperimentConfig, prep: dict, *, teacher_only: bool = False) -> str:
    """Hash of everything that determines the prepared teacher/student: models, task, sampling, prep recipe.
    `teacher_only`: just what determines the teacher, so a new student recipe reuses a cached teacher."""
    d = config_to_dict(cfg)
    t = copy.deepcopy(d["teachers"][0]["model"])
    s = copy.deepcopy(d["student"])
    t["hf_path"] = s["hf_path"] = None
    for m in (t, s):  # how a CPU runs decode, not what the model computes: caches made before it stay valid
        m.pop("cpu_decode_kernel", None)
    blob = {"teacher": t, "data": d["data"]["source"], "eval": d["eval"]["source"],
            "sampling": [d["sampling"]["max_prompt_len"], d["sampling"]["max_new_tokens"]], "prep": prep}
    if teacher_only:
        blob["prep"] = {k: v for k, v in prep.items() if k.startswith("teacher_") or k == "seed"}
    else:
        blob["student"] = s
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def eval_curve(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """(step, eval_accuracy) pairs of a run's metrics.jsonl, sorted by step."""
    pts = {}
    for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if "eval_accuracy" in r:
            pts[int(r["step"])] = float(r["eval_accuracy"])
    return sorted(pts.items())


def metric_curve(run_dir: str | os.PathLike, name: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[name])) for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
            if name in r]


def quiet_jax() -> None:
    """CPU-friendly defaults for a laptop run, and a persistent compilation cache next to the checkpoints: every
    stage builds a new Trainer (new jit closures), but the programs are the same, so later runs skip XLA."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def add_stage_args(p, runs_default: str) -> None:
    """The arguments every extra stage (single prompt, recovery) shares."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--runs", default=runs_default)
    p.add_argument("--recipe", default="{}", help="JSON of PrepRecipe fields (teacher/student preparation)")
    p.add_argument("overrides", nargs="*", help="config overrides of configs/mini_reasoning/base.yaml")
