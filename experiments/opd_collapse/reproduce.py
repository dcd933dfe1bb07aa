"""The collapse of OPD far from its teacher in one command, with the length-collapse guard watching.

    python -m experiments.opd_collapse.reproduce [--root DIR] [--run-dir DIR] [key=value ...]

Prepares the far pair (the shipped miniature teacher; the student mid-trained for 300 steps instead of 600, about
40 s on 2 cores the first time, cached under `--root`), then trains 60 OPD steps at lr 3e-4 with the published loss
(discount 0) and `guard.on_collapse=stop`. On this pair the guard stops the run in the 30s of steps (exit code 3,
`opd_jax.guards.EXIT_COLLAPSED`); with `loss.discount=1.0` it runs to the end with no truncation (exit code 0).
Overrides are `opd-jax train`'s dotted keys. `tests/test_collapse.py` runs both.
"""

from __future__ import annotations

import argparse
import json
import os

from experiments.opd_collapse.controls import LR, STEPS, STUDENT_STEPS

RUN_OVERRIDES = (f"steps={STEPS}", f"optim.learning_rate={LR}", "optim.schedule=constant", "optim.warmup_steps=5",
                 "guard.on_collapse=stop", "eval.source=", "eval.every=0", "logging.progress=false",
                 "overwrite=true")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="model cache root (default: the miniature's, $OPD_JAX_CACHE)")
    p.add_argument("--run-dir", default=os.path.join("runs", "opd_collapse", "reproduce"))
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run")
    a = p.parse_args(argv)
    from opd_jax.miniature import setup

    setup.quiet_jax()
    from opd_jax.guards import EXIT_COLLAPSED
    from opd_jax.miniature.prepare import Recipe, prepare
    from opd_jax.trainer import Trainer

    prep = prepare(setup.base_config(), Recipe(student_steps=STUDENT_STEPS), root=a.root, grade=False)
    cfg = setup.base_config([*prep.overrides(), f"run_dir={a.run_dir}", *RUN_OVERRIDES, *a.overrides])
    history = Trainer(cfg).run()
    last = history.get("last", {})
    print(json.dumps({k: round(last[k], 4) for k in ("teacher_kl", "mean_length", "truncation_rate") if k in last}))
    if "collapsed_at" in history:
        print(f"collapsed_at: {history['collapsed_at']}")
        return EXIT_COLLAPSED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
