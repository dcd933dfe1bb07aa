"""Pilot 2: the teacher and a student recipe, into a pilot cache (/tmp/opd_chains_pilot_cache)."""
import json
import sys

from opd_jax.miniature.setup import base_config, quiet_jax

quiet_jax()
from opd_jax.miniature.prepare import Recipe, prepare  # noqa: E402

recipe = Recipe(**json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}"))
prep = prepare(base_config(sys.argv[2:]), recipe, root="/tmp/opd_chains_pilot_cache")
print(json.dumps(prep.info, indent=1))
with open("experiments/opd_chains/pilots/log.jsonl", "a") as f:
    f.write(json.dumps({"tag": "prepare", "recipe": json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}"),
                        "info": prep.info}) + "\n")
