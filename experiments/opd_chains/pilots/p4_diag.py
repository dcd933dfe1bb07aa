"""Pilot 4: where a student's errors are (first-error kind and step), and how teacher and student continue after an
injected slip (`correction_probe`)."""
import json
import sys

from opd_jax.miniature.setup import base_config, quiet_jax

quiet_jax()
from experiments.opd_chains.pilots.analyze import analyze  # noqa: E402
from opd_jax.miniature.measure import correction_probe, grade  # noqa: E402

teacher, student = sys.argv[1], sys.argv[2]
cfg = base_config([f"student.hf_path={student}", f"teachers.0.model.hf_path={teacher}", "run_dir=/tmp/p4diag"])
out = {"tag": "diag", "student": student}
for temp in (1.0, 0.0):
    grade(cfg, temperature=temp, split="test", name=f"t{temp}", run_dir="/tmp/p4diag")
    out[f"errors_T{temp}"] = analyze(f"/tmp/p4diag/eval/t{temp}.jsonl", 7)
out["probe_teacher"] = correction_probe(cfg, cfg.teachers[0].model)
out["probe_student"] = correction_probe(cfg, cfg.student)
print(json.dumps(out, indent=1))
with open("experiments/opd_chains/pilots/log.jsonl", "a") as f:
    f.write(json.dumps(out) + "\n")
