"""The miniature's base config (models, task, sampling, eval) as data, so `opd-jax demo` needs no YAML file of the
repository; `configs/opd_chains/base.yaml` holds the same settings (a test keeps the two equal).

Models (Qwen3-shaped, character vocabulary of 40, RoPE theta 100 for these short sequences):
- teacher: 3 layers, hidden 96 (about 0.3M parameters);
- student: 2 layers, hidden 64 (about 0.1M parameters).
Task: `synthetic:chains:4:6:mod=7` (chains of 4-6 steps mod 7, `opd_jax.data.chains`). Held-out accuracy is
graded at T=1 (one sample per problem, like the training samples) and greedily.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from opd_jax.config import ExperimentConfig, apply_overrides, config_from_dict

TASK = "synthetic:chains:4:6:mod=7"
TEACHER_TASK = TASK + ":slips=0.3"  # reference solutions with marked corrections: the teacher's SFT data

BASE: dict = {
    "algorithm": "opd",
    "run_dir": "runs/opd_chains/default",
    "seed": 0,
    "steps": 50,
    "groups_per_batch": 16,
    "group_size": 4,
    "student": {"vocab_size": 40, "hidden_size": 64, "intermediate_size": 256, "num_layers": 2, "num_heads": 4,
                "num_kv_heads": 2, "head_dim": 16, "rope_theta": 100.0},
    "teachers": [{"name": "teacher", "model": {"vocab_size": 40, "hidden_size": 96, "intermediate_size": 256,
                                               "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "head_dim": 24,
                                               "rope_theta": 100.0}}],
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    "sampling": {"max_prompt_len": 24, "max_new_tokens": 48, "temperature": 1.0},
    "loss": {"kind": "importance_sampling", "kl_penalty_coef": 1.0, "discount": 0.0},
    "optim": {"learning_rate": 1e-4, "schedule": "constant", "warmup_steps": 0},
    "data": {"source": TASK},
    "eval": {"source": TASK, "split": "test", "every": 0, "num_problems": 0, "k": 1, "temperature": 1.0,
             "top_p": 1.0, "max_new_tokens": 48},
    "checkpoint": {"every": 0, "async_save": False, "max_to_keep": 1},
    "logging": {"tensorboard": False, "progress": False},
}


def base_config(overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The base config with dotted `key=value` overrides."""
    return apply_overrides(config_from_dict(copy.deepcopy(BASE)), list(overrides))


def cache_root() -> Path:
    """$OPD_JAX_CACHE, else $XDG_CACHE_HOME/opd_jax/opd_chains, else ~/.cache/opd_jax/opd_chains."""
    if os.environ.get("OPD_JAX_CACHE"):
        return Path(os.environ["OPD_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "opd_jax" / "opd_chains"


def quiet_jax() -> None:
    """CPU defaults and a persistent XLA compilation cache next to the checkpoints (every stage builds new jit
    closures of the same programs, so later runs skip most compiles)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
