"""Retrain the cached teacher, student and clean teacher into a scratch cache (deterministic: same weights expected),
keeping their training metrics."""
import dataclasses, hashlib, pathlib, json
from opd_jax.miniature.setup import base_config, quiet_jax
quiet_jax()
from opd_jax.miniature.prepare import Recipe, prepare, prepare_teacher
base = base_config()
r = Recipe()
prep = prepare(base, r, root="/tmp/regen_cache", grade=False)
clean, _ = prepare_teacher(base, dataclasses.replace(r, teacher_source=base.data.source), name="teacher_clean", root="/tmp/regen_cache")
def h(d): return hashlib.sha256(pathlib.Path(d, "model.safetensors").read_bytes()).hexdigest()[:16]
home = pathlib.Path.home() / ".cache/opd_jax/opd_chains"
for new in (prep.teacher, prep.student, clean):
    rel = pathlib.Path(new).relative_to("/tmp/regen_cache")
    print(rel, h(new), h(home / rel), h(new) == h(home / rel))
