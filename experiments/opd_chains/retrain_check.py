"""Retrain the teacher, the student, the protocol's base student and RL teacher (`opd_jax.miniature.protocol`, the
demo's models) and the clean teacher into a scratch cache (always trained, never copied) and compare their weights
(sha256 of model.safetensors) with the models shipped in `opd_jax/miniature/pretrained/` and,
for the clean teacher (not shipped), with the user cache's copy when there is one: training is deterministic on
this CPU, so they match bit for bit, and the retraining's per-step metrics are those of the shipped models
(results/runs/prepare_*.metrics.jsonl; log: results/logs/retrain_prepared_models.log). Exit 1 on a mismatch.

    python -m experiments.opd_chains.retrain_check [--root /tmp/regen_cache]     # about 20 min on 2 cores
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
    from opd_jax.miniature.prepare import PRETRAINED, Recipe, prepare_teacher
    from opd_jax.miniature.protocol import prepare_protocol

    base = setup.base_config()
    r = Recipe()
    pp = prepare_protocol(base, r, root=a.root, fresh=True)  # the pair, then the base and the RL teacher
    prep = pp.pair
    clean, _ = prepare_teacher(base, dataclasses.replace(r, teacher_source=base.data.source), name="teacher_clean",
                               root=a.root, fresh=True)
    same = True
    for new, ref_root in ((prep.teacher, PRETRAINED), (prep.student, PRETRAINED), (pp.base, PRETRAINED),
                          (pp.teacher, PRETRAINED), (clean, setup.cache_root())):
        rel = pathlib.Path(new).relative_to(a.root)
        ref = ref_root / rel
        if not (ref / "model.safetensors").exists():
            print(rel, digest(new), "no reference copy at", ref)
            continue
        ok = digest(new) == digest(ref)
        same &= ok
        print(rel, digest(new), digest(ref), ok)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
