"""`opd-jax demo`: on-policy distillation end to end on a laptop CPU.

1. teacher and student from the cache, or trained now when missing (`prepare.py`, a few minutes once);
2. OPD from the student checkpoint (reverse KL against the teacher, importance-sampling loss) for `--steps`;
3. student accuracy and teacher_kl before and after, a PNG of both vs step, and a per-token KL HTML page.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from experiments.mini_reasoning import common


def plot_run(run_dir: str, out_png: str, title: str = "on-policy distillation") -> str:
    """teacher_kl (per step) and held-out accuracy (at each eval) vs step, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = common.metric_curve(run_dir, "teacher_kl")
    acc = common.eval_curve(run_dir)
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    if kl:
        a.plot(*zip(*kl, strict=True), lw=1)
    a.set(xlabel="step", ylabel="teacher_kl (nats/token)", title="reverse KL to the teacher")
    if acc:
        b.plot(*zip(*acc, strict=True), marker="o")
    b.set(xlabel="step", ylabel="held-out accuracy", title="student accuracy (greedy)", ylim=(0, 1))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def first_wrong_problem(eval_jsonl: str) -> str | None:
    for r in common.read_jsonl(eval_jsonl):
        if not r.get("correct"):
            return r.get("text")
    return None


def write_kl_html(cfg, out_html: str, prompt: str | None) -> dict:
    """`opd-jax visualize` for the run's latest student checkpoint on `prompt` (an expression)."""
    from opd_jax.visualize import render_html, token_kl

    r = token_kl(cfg, prompt)
    if prompt is not None:  # token_kl does not know the answer of a typed prompt: grade it here
        from opd_jax.data.synthetic import make_synthetic_task

        task = make_synthetic_task(cfg)
        gold = {p.text: p.answer for p in task.eval_problems()}.get(prompt)
        if gold is not None:
            r["answer"], r["correct"] = gold, task.grade(r["tokens"], gold)
    with open(out_html, "w", encoding="utf-8") as f:
        f.write(render_html(r))
    return r


def screenshot(html_path: str, png_path: str, size: str = "1000,400") -> str | None:
    """PNG of an HTML page with headless chromium, when installed (None otherwise)."""
    import shutil
    import subprocess

    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        return None
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={os.path.abspath(png_path)}",
                    f"--window-size={size}", f"file://{os.path.abspath(html_path)}"], check=False,
                   capture_output=True, timeout=120)
    return png_path if os.path.exists(png_path) else None


def mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def main(argv: list[str] | None = None) -> int:
    common.quiet_jax()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fresh", action="store_true", help="retrain the cached teacher and student")
    p.add_argument("--steps", type=int, default=40, help="OPD steps")
    p.add_argument("--run-dir", default="runs/mini_reasoning/demo")
    p.add_argument("--recipe", default="{}", help="JSON of PrepRecipe fields (teacher/student preparation)")
    p.add_argument("overrides", nargs="*", help="config overrides of configs/mini_reasoning/base.yaml")
    a = p.parse_args(argv)

    from experiments.mini_reasoning.prepare import PrepRecipe, prepare

    t_start = time.time()
    base = common.load("base", a.overrides)
    print(f"opd-jax demo: cache {common.cache_root()}")
    prep = prepare(base, PrepRecipe(**json.loads(a.recipe)), fresh=a.fresh)
    print(f"teacher: {prep.teacher}  (held-out greedy accuracy {prep.info['teacher_accuracy']:.3f})")
    print(f"student: {prep.student}  (held-out greedy accuracy {prep.info['student_accuracy']:.3f})")

    every = max(1, a.steps // 4)
    a.run_dir = os.path.abspath(a.run_dir)  # orbax wants absolute local checkpoint paths
    cfg = common.load("base", [*prep.overrides(), f"run_dir={a.run_dir}", f"steps={a.steps}", "overwrite=true",
                               f"eval.every={every}", "algorithm=opd", *a.overrides])
    from opd_jax.trainer import Trainer

    print(f"\nOPD: {a.steps} steps x {cfg.groups_per_batch} prompts x {cfg.group_size} samples, loss "
          f"{cfg.loss.kind}, reverse KL to the teacher as the per-token advantage")
    t0 = time.time()
    h = Trainer(cfg).run()
    opd_s = time.time() - t0
    kl = [v for _, v in common.metric_curve(cfg.run_dir, "teacher_kl")]
    k = max(1, min(5, len(kl) // 4))
    before, after = h["eval_start"]["eval_accuracy"], h["eval_end"]["eval_accuracy"]
    png = plot_run(cfg.run_dir, os.path.join(cfg.run_dir, "opd_demo.png"))
    eval_dir = os.path.join(cfg.run_dir, "eval")
    prompt = first_wrong_problem(os.path.join(eval_dir, f"eval_step{a.steps}.jsonl"))
    html = os.path.join(cfg.run_dir, "kl.html")
    r = write_kl_html(cfg, html, prompt)
    summary = {"student_accuracy_before": before, "student_accuracy_after": after,
               "teacher_accuracy": prep.info["teacher_accuracy"],
               "teacher_kl_first": mean(kl[:k]), "teacher_kl_last": mean(kl[-k:]), "opd_seconds": opd_s,
               "total_seconds": time.time() - t_start}
    with open(os.path.join(cfg.run_dir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    print("\n==== opd-jax demo ====")
    print(f"student accuracy (greedy, {cfg.eval.num_problems} held-out problems): {before:.3f} -> {after:.3f}   "
          f"(teacher {prep.info['teacher_accuracy']:.3f})")
    print(f"teacher_kl (mean of first/last {k} steps): {summary['teacher_kl_first']:.4f} -> "
          f"{summary['teacher_kl_last']:.4f} nats/token")
    print(f"OPD took {opd_s:.0f}s; the whole demo {summary['total_seconds']:.0f}s")
    print(f"run dir:       {cfg.run_dir}/  (metrics.jsonl, config.yaml, checkpoints/)")
    print(f"evals:         {eval_dir}/eval_step*.jsonl / .csv")
    print(f"plot:          {png}")
    print(f"per-token KL:  {html}  ({r['prompt']} -> {r['completion']!r}, "
          f"{'correct' if r.get('correct') else 'wrong'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
