"""Recovery (continual learning): mid-train the student on new knowledge, watch the old skill drop, then win it
back with OPD against the student's own checkpoint from before mid-training.

    python -m experiments.mini_reasoning.recovery [--midtrain-steps 150] [--opd-steps 60] [key=value ...]

1. before: the cached student (`prepare.py`), graded on the old skill (arithmetic) and the new knowledge (a random
   lookup table, `synthetic:facts`, "@37=" -> "#512": nothing the arithmetic skill needs).
2. mid-training: SFT on the facts mixed with a little old data (reference arithmetic solutions).
3. OPD on arithmetic prompts only, the teacher being the pre-mid-training student (same architecture).

Both metrics at the three points go to results/recovery.json and results/recovery.md, the runs' metrics to
results/runs/recovery_*.jsonl (the shape of the published personalization table: IF-eval 85 -> 79 -> 83 while
internal QA goes 36 -> 41).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import time
from pathlib import Path

from experiments.mini_reasoning import common


def grade_both(trainer, facts_task, tag: str) -> dict:
    """Greedy held-out accuracy on the old skill (the trainer's own task) and on the whole facts table."""
    from opd_jax.eval.evaluate import task_eval

    old = float(trainer.run_eval(f"{tag}_arithmetic")["eval_accuracy"])
    cfg = copy.deepcopy(trainer.cfg)
    cfg.eval.num_problems = 0  # the whole table
    res = task_eval(cfg, facts_task, trainer.eval_sampler, (trainer.state.trainable, trainer.state.frozen),
                    trainer.mesh, step=int(trainer.state.step), out_dir=os.path.join(cfg.run_dir, "eval"),
                    tag=f"{tag}_facts")
    return {"arithmetic": old, "facts": float(res.summary()["eval_accuracy"])}


def midtrain_examples(arith_task, facts_task, n: int, old_fraction: float, seed: int) -> list:
    """n SFT rows: facts, with `old_fraction` of them reference arithmetic solutions, shuffled."""
    n_old = int(round(n * old_fraction))
    rows = facts_task.sft_examples(n - n_old) + arith_task.sft_examples(n_old)
    random.Random(seed).shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    common.quiet_jax()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-facts", type=int, default=64)
    p.add_argument("--midtrain-steps", type=int, default=150)
    p.add_argument("--midtrain-lr", type=float, default=3e-3)
    p.add_argument("--old-fraction", type=float, default=0.1, help="share of old (arithmetic) rows in mid-training")
    p.add_argument("--opd-steps", type=int, default=60)
    common.add_stage_args(p, "runs/mini_reasoning/recovery")
    a = p.parse_args(argv)

    from experiments.mini_reasoning.prepare import _export, _sft_cfg, start_stage
    from opd_jax.baselines.sft import SFTTrainer
    from opd_jax.data import build_task
    from opd_jax.data.synthetic import FactsTask
    from opd_jax.trainer import Trainer

    runs, base, prep = start_stage(a)
    facts = FactsTask(seed=a.seed, num_facts=a.num_facts)
    t_start = time.time()

    # 1+2: mid-training from the cached student (SFT); graded before (step 0) and after
    s_model = copy.deepcopy(base.student)
    s_model.hf_path = prep.student
    c = _sft_cfg(base, s_model, steps=a.midtrain_steps, batch=32, lr=a.midtrain_lr,
                 run_dir=os.path.join(runs, "midtrain"), seed=a.seed, progress=False)
    c.overwrite = True
    arith = build_task(c)
    arith.restore({"position": 7 * 1_000_000})  # rows no other stage trains on
    rows = midtrain_examples(arith, facts, a.midtrain_steps * c.batch_size, a.old_fraction, a.seed)
    mid = SFTTrainer(c, arith, rows)
    before = grade_both(mid, facts, "before")
    print(f"[recovery] before mid-training: arithmetic {before['arithmetic']:.3f}, facts {before['facts']:.3f}")
    mid.run()
    after_mid = grade_both(mid, facts, "after_midtrain")
    print(f"[recovery] after mid-training on {a.num_facts} facts ({a.old_fraction:.0%} old data): arithmetic "
          f"{after_mid['arithmetic']:.3f}, facts {after_mid['facts']:.3f}")
    mid_dir = os.path.join(runs, "midtrained_student")
    _export(mid, None, Path(mid_dir))

    # 3: OPD on the old skill's prompts; the teacher is the student from before mid-training
    opd_dir = os.path.join(runs, "opd")
    cfg = common.load("base", [f"student.hf_path={mid_dir}", f"run_dir={opd_dir}", f"steps={a.opd_steps}",
                               "overwrite=true", "algorithm=opd", f"seed={a.seed}", "logging.progress=false",
                               f"eval.every={max(1, a.opd_steps // 4)}", *a.overrides])
    t_model = copy.deepcopy(cfg.student)
    t_model.hf_path = prep.student
    cfg.teachers[0].model = t_model
    opd = Trainer(cfg)
    opd.run()
    after_opd = grade_both(opd, facts, "after_opd")
    print(f"[recovery] after OPD against the pre-mid-training checkpoint: arithmetic "
          f"{after_opd['arithmetic']:.3f}, facts {after_opd['facts']:.3f}")

    out = {"before": before, "after_midtrain": after_mid, "after_opd": after_opd, "num_facts": a.num_facts,
           "midtrain_steps": a.midtrain_steps, "midtrain_lr": a.midtrain_lr, "old_fraction": a.old_fraction,
           "opd_steps": a.opd_steps, "opd_lr": cfg.optim.learning_rate, "seed": a.seed,
           "wall_s": time.time() - t_start, "eval_problems": cfg.eval.num_problems, "student": prep.student}
    with open(os.path.join(a.results, "recovery.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    for name, d in (("midtrain", os.path.join(runs, "midtrain")), ("opd", opd_dir)):
        shutil.copy(os.path.join(d, "metrics.jsonl"), os.path.join(a.results, "runs", f"recovery_{name}.jsonl"))
    md = ["# Recovery: OPD against the model's own earlier checkpoint", "",
          f"Student mid-trained by SFT on {a.num_facts} new facts ({a.old_fraction:.0%} old arithmetic rows, "
          f"{a.midtrain_steps} steps x 32, lr {a.midtrain_lr:g}), then OPD on arithmetic prompts only "
          f"({a.opd_steps} steps, lr {cfg.optim.learning_rate:g}) with the pre-mid-training student as teacher. "
          "Greedy accuracy.", "",
          "| point | old skill: arithmetic (held-out) | new knowledge: facts (the table) |", "|---|---|---|"]
    for label, r in (("before mid-training", before), ("after mid-training", after_mid), ("after OPD", after_opd)):
        md.append(f"| {label} | {r['arithmetic']:.3f} | {r['facts']:.3f} |")
    md += ["", f"Wall time: {out['wall_s']:.0f}s."]
    with open(os.path.join(a.results, "recovery.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
