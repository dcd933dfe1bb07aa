"""The published RL-then-OPD protocol on long chains: a base student, RL from it gives the teacher, OPD from the same
base distils that RL policy (issue #22; `experiments/opd_chains/lengths.py` measures it across episode lengths).

1. Base: the miniature's student (`prepare`), then SFT on clean chains of 1-16 steps (`BaseRecipe`: 180 steps x 32
   rows, lr 3e-3, the train stream `p6_base`): strong on short chains, weak on long ones (validation T=1 0.92 /
   0.83 / 0.52 / 0.11 at 2 / 4 / 8 / 16 steps, `experiments/opd_chains/pilots`).
2. RL teacher: RL (exact-answer reward, GRPO groups of 4) from the base on chains of `length` steps, to its
   plateau (`TeacherRecipe`: 12 steps, lr 1e-4, 200 steps; test T=1 0.235 -> 0.93 in `lengths.py`'s seed 0).

Both are HF dirs with the student's shape, cached like the pair (`<cache_root()>/base-<key>/base/`,
`<cache_root()>/rl_teacher-<key>/rl_teacher/`, each with a JSON of how it was made and how it scores; the keys hash
the models, the recipes and the pair they start from). The defaults ship in `pretrained/` and are copied, not
trained, when the keys match; `fresh=True` trains them (about 3 minutes on 2 cores after the pair).

`run_overrides` is the one config of an RL or OPD run from the base that both `opd-jax demo` and `lengths.py` use.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from opd_jax.config import ExperimentConfig, apply_overrides
from opd_jax.data.chains import assert_held_out, stream_position
from opd_jax.miniature import setup
from opd_jax.miniature.prepare import (
    CACHE_VERSION,
    PRETRAINED,
    Log,
    Prepared,
    Recipe,
    _finished,
    _key,
    _locked,
    cache_keys,
    cached_info,
    export,
    grade_both,
    keep_metrics,
    prepare,
    ready_entries,
    sft_config,
)

MOD = 7
STUDENT_SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "rope_theta")


@dataclass(frozen=True)
class BaseRecipe:
    """The base student: the pair's student, SFT on clean chains of 1..`longest` steps from the stream `stream`."""

    steps: int = 180
    batch: int = 32
    lr: float = 3e-3
    longest: int = 16
    stream: str = "p6_base"


@dataclass(frozen=True)
class TeacherRecipe:
    """The RL teacher: RL from the base on chains of exactly `length` steps, `steps` steps at `lr` (16 prompts x 4
    samples a step, the stream `lengths_<length>` at `seed`), to its plateau."""

    length: int = 12
    lr: float = 1e-4
    steps: int = 200
    seed: int = 0


def check_recipes(base: BaseRecipe, teacher: TeacherRecipe) -> None:
    """Raise ValueError naming the first bad field of the two recipes (kinds and ranges), before anything runs."""
    from opd_jax.data.chains import LABELS

    for name, r in (("base", base), ("teacher", teacher)):
        for f in dataclasses.fields(r):
            v = getattr(r, f.name)
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            want = {"int": int, "float": (int, float), "str": str}[kind]
            if not isinstance(v, want) or isinstance(v, bool):
                raise ValueError(f"{name}.{f.name}: expected {f.type}, got {v!r}")
            if f.name in ("steps", "batch", "lr", "length", "longest") and v <= 0:
                raise ValueError(f"{name}.{f.name}: must be > 0, got {v!r}")
    for name, n in (("base.longest", base.longest), ("teacher.length", teacher.length)):
        if n > len(LABELS):
            raise ValueError(f"{name}: chains have at most {len(LABELS)} steps, got {n}")


def source(length: int, lo: int | None = None, *, test: int = 1024, val: int = 256) -> str:
    """The chains source of `length` steps (or `lo`..`length`) mod 7 with `test` / `val` held-out problems."""
    return f"synthetic:chains:{lo or length}:{length}:mod={MOD}:test={test}:val={val}"


def budget_overrides(length: int) -> list[str]:
    """Prompt and completion budgets for chains of `length` steps: '<bos>' + start + 3 per step + '=', and 5 per
    step + '#d' + '<eos>' with room for a few corrections, rounded up to 8 tokens."""
    def up(n: int) -> int:
        return -(-n // 8) * 8

    new = up(5 * length + 3 + 8)
    return [f"sampling.max_prompt_len={up(3 * length + 3)}", f"sampling.max_new_tokens={new}",
            f"eval.max_new_tokens={new}"]


def run_overrides(cfg: ExperimentConfig, method: str, *, length: int, lr: float, seed: int, steps: int, base: str,
                  teacher: str | None, run_dir: str, eval_source: str, eval_every: int = 0, kl_clip: float = 0.0,
                  ) -> list[str]:
    """Overrides (on `cfg`, the pair's config) of one RL or OPD run from the base on chains of `length` steps:
    16 prompts x 4 samples a step, constant `lr` after 5 warmup steps, the teacher slot holding the RL policy
    (OPD) or the base (RL does not read it), with the student's shape either way. `method`: 'rl' (task reward
    only, `loss.kl_penalty_coef=0`) or 'opd' (`kl_clip` nats per token, 0 = off). Raises ValueError for another
    method."""
    if method not in ("rl", "opd"):
        raise ValueError(f"method must be 'rl' or 'opd', got {method!r}")
    ov = [f"run_dir={run_dir}", "overwrite=true", f"steps={steps}", f"seed={seed}", f"student.hf_path={base}",
          *budget_overrides(length), f"data.source={eval_source}", f"eval.source={eval_source}",
          f"eval.every={eval_every}", "eval.temperature=1.0", f"optim.learning_rate={lr}", "optim.schedule=constant",
          "optim.warmup_steps=5", "groups_per_batch=16", "group_size=4", "logging.progress=false",
          f"teachers.0.model.hf_path={teacher or base}",
          *[f"teachers.0.model.{k}={getattr(cfg.student, k)}" for k in STUDENT_SHAPE]]
    ov += (["algorithm=rl", "loss.kl_penalty_coef=0", "loss.task_reward_coef=1"] if method == "rl"
           else ["algorithm=opd", f"loss.kl_clip={kl_clip}"])
    return ov


def train_run(cfg: ExperimentConfig, stream: str, seed: int):
    """Run the RL or OPD config `cfg` (its `algorithm`) on the train stream `stream` at `seed`, asserting that no
    training row is a held-out problem: (trainer, rows checked)."""
    from opd_jax.data import build_task

    task = build_task(cfg)
    task.restore({"position": stream_position(stream, seed)})
    task.issued = []
    if cfg.algorithm == "rl":
        from opd_jax.baselines.rl import make_rl_trainer

        tr = make_rl_trainer(cfg, task)
    else:
        from opd_jax.trainer import Trainer

        tr = Trainer(cfg, task)
    _finished(tr.run())  # stopped early (SIGTERM, a collapse guard): never export or cache it
    return tr, assert_held_out(task, task.issued)


def train_base(cfg: ExperimentConfig, recipe: BaseRecipe, out: Path, work: str, *, test: int = 1024, val: int = 256
               ) -> dict:
    """SFT of `cfg.student` (the pair's student, its `hf_path` set) on clean chains of 1..`recipe.longest` steps;
    the result as an HF dir at `out`. Returns how it was made."""
    from opd_jax.baselines.sft import SFTTrainer
    from opd_jax.data import build_task

    c = sft_config(apply_overrides(copy.deepcopy(cfg), budget_overrides(recipe.longest)), cfg.student,
                   steps=recipe.steps, batch=recipe.batch, lr=recipe.lr, run_dir=os.path.join(work, "base_sft"),
                   seed=0, source=source(recipe.longest, 1, test=test, val=val))
    task = build_task(c)
    task.restore({"position": stream_position(recipe.stream, 0)})
    task.issued = []
    t0 = time.time()
    tr = SFTTrainer(c, task, task.sft_examples(recipe.steps * recipe.batch))
    _finished(tr.run())
    rows = assert_held_out(task, task.issued)
    export(tr, out)
    keep_metrics(c.run_dir, out)
    return {"base_seconds": time.time() - t0, "base_rows_checked": rows}


@dataclass
class ProtocolPair:
    base: str  # HF dir of the base student
    teacher: str  # HF dir of the RL teacher
    info: dict
    pair: Prepared  # the miniature's teacher and student the base starts from


def shipped_record(name: str) -> dict | None:
    """The JSON record (how it was made, how long it took, how it scores) of the shipped default `name` ('base' or
    'rl_teacher'), or None when none ships with the package."""
    cfg = setup.base_config()
    b_key, t_key = protocol_keys(cfg, Recipe(), BaseRecipe(), TeacherRecipe())
    path = PRETRAINED / f"{name}-{b_key if name == 'base' else t_key}" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def protocol_keys(cfg: ExperimentConfig, pair: Recipe, base: BaseRecipe, teacher: TeacherRecipe) -> tuple[str, str]:
    """(base key, RL teacher key): hashes of the pair's student key, the recipes and the student's shape."""
    _, s_key = cache_keys(cfg, pair)
    b_key = _key({"v": CACHE_VERSION, "student_key": s_key, "base": dataclasses.asdict(base)})
    t_key = _key({"v": CACHE_VERSION, "base_key": b_key, "teacher": dataclasses.asdict(teacher)})
    return b_key, t_key


def prepare_protocol(cfg: ExperimentConfig | None = None, pair: Recipe | None = None, base: BaseRecipe | None = None,
                     teacher: TeacherRecipe | None = None, *, root: str | os.PathLike | None = None,
                     fresh: bool = False, test: int = 512, log: Log = print) -> ProtocolPair:
    """The cached base student and RL teacher for `cfg` (default `setup.base_config()`) and the recipes, training
    what is missing (with `fresh`, the pair too); the teacher is graded on `test` held-out problems of its length
    (T=1 and greedy) when it is trained."""
    cfg = cfg or setup.base_config()
    pair, base, teacher = pair or Recipe(), base or BaseRecipe(), teacher or TeacherRecipe()
    prep = prepare(cfg, pair, root=root, fresh=fresh, grade=False, log=log)
    cfg = apply_overrides(copy.deepcopy(cfg), prep.overrides())
    b_key, t_key = protocol_keys(cfg, pair, base, teacher)
    root = Path(root) if root else setup.cache_root()
    b_root, t_root = root / f"base-{b_key}", root / f"rl_teacher-{t_key}"
    with _locked(root):
        ready_entries(((b_root, "base"), (t_root, "rl_teacher")), fresh, log)
        b_dir, t_dir = b_root / "base", t_root / "rl_teacher"
        b_json, t_json = b_root / "base.json", t_root / "rl_teacher.json"
        work = tempfile.mkdtemp(prefix="opd_chains_protocol_")
        try:
            b_info = cached_info(b_root, "base")
            if b_info is None:
                log(f"[protocol] base: the student, SFT on clean chains of 1-{base.longest} steps, {base.steps} steps")
                b_root.mkdir(parents=True, exist_ok=True)
                b_info = {"key": b_key, "recipe": dataclasses.asdict(base), **train_base(cfg, base, b_dir, work)}
                b_json.write_text(json.dumps(b_info, indent=1))
            t_info = cached_info(t_root, "rl_teacher")
            if t_info is None:
                log(f"[protocol] RL teacher: RL from the base on chains of {teacher.length} steps, {teacher.steps} "
                    f"steps, lr {teacher.lr:g}")
                t_root.mkdir(parents=True, exist_ok=True)
                t_info = {"key": t_key, "base_key": b_key, "recipe": dataclasses.asdict(teacher),
                          **train_teacher(cfg, teacher, str(b_dir), t_dir, work, test=test)}
                t_json.write_text(json.dumps(t_info, indent=1))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return ProtocolPair(str(b_dir), str(t_dir), {"base": b_info, "teacher": t_info}, prep)


def train_teacher(cfg: ExperimentConfig, recipe: TeacherRecipe, base: str, out: Path, work: str, *, test: int
                  ) -> dict:
    """RL from `base` on chains of `recipe.length` steps (the stream `lengths_<length>` at `recipe.seed`, as in
    `lengths.py`); the policy as an HF dir at `out`, graded on `test` held-out problems. Returns how it was made."""
    run_dir = os.path.join(work, "rl_teacher")
    src = source(recipe.length, test=test, val=16)
    c = apply_overrides(copy.deepcopy(cfg), run_overrides(
        cfg, "rl", length=recipe.length, lr=recipe.lr, seed=recipe.seed, steps=recipe.steps, base=base, teacher=None,
        run_dir=run_dir, eval_source=src))
    t0 = time.time()
    tr, rows = train_run(c, f"lengths_{recipe.length}", recipe.seed)
    seconds = time.time() - t0
    export(tr, out)
    keep_metrics(run_dir, out)
    return {"teacher_seconds": seconds, "teacher_rows_checked": rows,
            "test": grade_both(c, c.student, out, work, "rl_teacher")}
