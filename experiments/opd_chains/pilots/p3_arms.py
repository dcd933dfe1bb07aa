"""Pilot 3: a few short runs of the compared methods from the pilot cache's student, to choose step counts,
learning-rate ranges and the accuracy target before the predictions are written."""
import json
import sys

from opd_jax.miniature.setup import base_config, quiet_jax

quiet_jax()
from experiments.opd_chains.arms import ArmSpec, run_arm  # noqa: E402
from opd_jax.miniature.prepare import Recipe, prepare  # noqa: E402

recipe = Recipe(**json.loads(sys.argv[1]))
prep = prepare(base_config(), recipe, root="/tmp/opd_chains_pilot_cache")
for item in sys.argv[2:]:
    method, lr, steps = item.split(",")
    spec = ArmSpec(method=method, lr=float(lr), steps=int(steps), eval_every=max(1, int(steps) // 4))
    rec = run_arm(spec, prep, "/tmp/opd_chains_pilot_runs")
    short = {"tag": "arm", "recipe": json.loads(sys.argv[1]), "name": rec["name"],
             "curve": [(c["step"], round(c["val"]["accuracy"], 3), round(c["test"]["accuracy"], 3),
                        round(c["test"]["with_correction"], 3)) for c in rec["curve"]],
             "greedy_test": rec["final"]["greedy"]["test"]["accuracy"], "kl": rec["kl_test"], "wall": rec["wall_s"]}
    print(json.dumps(short), flush=True)
    with open("experiments/opd_chains/pilots/log.jsonl", "a") as f:
        f.write(json.dumps(short) + "\n")
