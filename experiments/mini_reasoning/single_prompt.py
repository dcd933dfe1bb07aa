"""Single-prompt reuse: OPD on ONE training prompt, repeated with many samples per step, next to OPD on the full
prompt stream with the same number of sequences per step. Held-out accuracy (the usual eval set) vs step.

    python -m experiments.mini_reasoning.single_prompt [--steps 60] [--samples 32] [key=value ...]

Writes results/single_prompt.{json,md,png} and results/runs/single_prompt_{one,full}.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from experiments.mini_reasoning import common


def plot(curves: dict[str, list[tuple[int, float]]], out_png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set(xlabel="OPD step", ylabel="held-out accuracy (greedy)", title="single-prompt OPD", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def main(argv: list[str] | None = None) -> int:
    common.quiet_jax()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--samples", type=int, default=None,
                   help="samples of the one prompt per step (default: the config's groups_per_batch x group_size)")
    common.add_stage_args(p, "runs/mini_reasoning/single_prompt")
    a = p.parse_args(argv)

    from experiments.mini_reasoning.prepare import start_stage
    from opd_jax.trainer import Trainer

    runs, base, prep = start_stage(a)
    a.samples = a.samples or base.batch_size
    source = base.data.source.split(":")
    single = ":".join([source[0], "arithmetic_single", *source[2:]])
    every = max(1, a.steps // 6)
    out: dict = {"steps": a.steps, "samples_per_step": a.samples, "seed": a.seed, "runs": {}}
    curves = {}
    for name, ov in (("one", [f"data.source={single}", "groups_per_batch=1", f"group_size={a.samples}"]),
                     ("full", [])):
        run_dir = os.path.join(runs, name)
        cfg = common.load("base", [*prep.overrides(), f"run_dir={run_dir}", f"steps={a.steps}", "overwrite=true",
                                   "algorithm=opd", f"seed={a.seed}", f"eval.every={every}",
                                   "logging.progress=false", *a.overrides, *ov])
        t0 = time.time()
        tr = Trainer(cfg)
        if name == "one":  # the fixed prompt, read without advancing the task's data position
            out["prompt"] = tr.task.decode(tr.task.prompt_tokens(tr.task.problem(0)))
        tr.run()
        curves[name] = common.eval_curve(run_dir)
        out["runs"][name] = {"curve": curves[name], "wall_s": time.time() - t0,
                             "groups_per_batch": cfg.groups_per_batch, "group_size": cfg.group_size}
        shutil.copy(os.path.join(run_dir, "metrics.jsonl"),
                    os.path.join(a.results, "runs", f"single_prompt_{name}.jsonl"))
        print(f"[single prompt] {name}: " + ", ".join(f"{s}:{v:.3f}" for s, v in curves[name]), flush=True)
    labels = {"one": f"one prompt x {a.samples} samples", "full": f"{base.groups_per_batch} prompts x "
              f"{base.group_size} samples"}
    png = plot({labels[k]: v for k, v in curves.items()}, os.path.join(a.results, "single_prompt.png"))
    with open(os.path.join(a.results, "single_prompt.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    md = ["# Single-prompt OPD", "", f"The one training prompt: `{out.get('prompt', '?')}`; held-out accuracy on "
          f"{base.eval.num_problems} problems, greedy.", "", "| step | " + " | ".join(labels.values()) + " |",
          "|---|---|---|"]
    steps = sorted({s for v in curves.values() for s, _ in v})
    for s in steps:
        md.append(f"| {s} | " + " | ".join(f"{dict(curves[k]).get(s, float('nan')):.3f}" for k in labels) + " |")
    md += ["", "![single prompt](single_prompt.png)"]
    with open(os.path.join(a.results, "single_prompt.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    print(f"[single prompt] {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
