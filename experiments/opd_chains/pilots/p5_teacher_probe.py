"""Pilot 5: does a teacher trained on marked corrections detect slips? Train one (prepare.train_teacher), then
`correction_probe` and test accuracy."""
import json
import sys
import tempfile
from pathlib import Path

from opd_jax.miniature.setup import base_config, quiet_jax

quiet_jax()
from opd_jax.miniature.measure import correction_probe  # noqa: E402
from opd_jax.miniature.prepare import Recipe, grade_both, train_teacher  # noqa: E402

tag = sys.argv[1]
recipe = Recipe(**json.loads(sys.argv[2]))
cfg = base_config(sys.argv[3:])
out_dir = Path(f"/tmp/p5_{tag}")
work = tempfile.mkdtemp()
info = train_teacher(cfg, recipe, out_dir, work)
m = cfg.teachers[0].model
m.hf_path = str(out_dir)
res = {"tag": f"teacher_probe_{tag}", "recipe": json.loads(sys.argv[2]), "args": sys.argv[3:], **info,
       "probe": correction_probe(cfg, m), "test": grade_both(cfg, cfg.teachers[0].model, out_dir, work, "t")}
print(json.dumps(res, indent=1))
with open("experiments/opd_chains/pilots/log.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
