"""Pilot 1: how fast a model learns chains from reference solutions (with slips): T=1 and greedy accuracy, per-step
accuracy and first-error kinds (`analyze`)."""
import json
import sys
import time

from opd_jax.miniature.setup import base_config, quiet_jax

quiet_jax()
from experiments.opd_chains.pilots.analyze import analyze  # noqa: E402
from opd_jax.baselines.sft import SFTTrainer  # noqa: E402

tag, steps, batch, lr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
extra = sys.argv[5:]
run_dir = f"/tmp/pilot_{tag}"
cfg = base_config([f"run_dir={run_dir}", "overwrite=true", "algorithm=sft", f"steps={steps}",
                   f"groups_per_batch={batch}", "group_size=1", f"optim.learning_rate={lr}", "optim.schedule=cosine",
                   f"optim.warmup_steps={min(50, steps // 10)}", f"eval.every={steps // 4}", "eval.split=test",
                   *extra])
cfg.student = cfg.teachers[0].model
cfg.teachers = []
t0 = time.time()
tr = SFTTrainer(cfg)
tr.run()
wall = time.time() - t0
tr.cfg.eval.temperature = 0.0
tr.run_eval("greedy")
mod = int(dict(f.split("=") for f in cfg.data.source.split(":") if "=" in f).get("mod", 10))
out = {"tag": tag, "args": sys.argv[1:], "train_wall_s": wall,
       "greedy": analyze(f"{run_dir}/eval/greedy.jsonl", mod),
       "T1": {s: analyze(f"{run_dir}/eval/eval_step{s}.jsonl", mod) for s in range(0, steps + 1, steps // 4)}}
print(json.dumps(out))
with open("experiments/opd_chains/pilots/log.jsonl", "a") as f:
    f.write(json.dumps(out) + "\n")
