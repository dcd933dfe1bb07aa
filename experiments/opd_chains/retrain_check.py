"""Retrain the cached teacher, student and clean teacher into a scratch cache and compare the weights with the cached
ones (sha256 of model.safetensors): training is deterministic on this CPU, so they match bit for bit, and the
retraining's per-step metrics are those of the cached models.

    python -m experiments.opd_chains.retrain_check [--root /tmp/regen_cache]

(Run once after the full run, when `prepare` started keeping training metrics; log in results/logs/.)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import pathlib

from opd_jax.miniature import setup


def digest(model_dir: str | pathlib.Path) -> str:
    return hashlib.sha256(pathlib.Path(model_dir, "model.safetensors").read_bytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/regen_cache")
    a = p.parse_args(argv)
    setup.quiet_jax()
    from opd_jax.miniature.prepare import Recipe, prepare, prepare_teacher

    base = setup.base_config()
    r = Recipe()
    prep = prepare(base, r, root=a.root, grade=False)
    clean, _ = prepare_teacher(base, dataclasses.replace(r, teacher_source=base.data.source), name="teacher_clean",
                               root=a.root)
    same = True
    for new in (prep.teacher, prep.student, clean):
        rel = pathlib.Path(new).relative_to(a.root)
        cached = setup.cache_root() / rel
        ok = digest(new) == digest(cached)
        same &= ok
        print(rel, digest(new), digest(cached), ok)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
