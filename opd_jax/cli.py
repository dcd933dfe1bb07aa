"""`opd-jax` command line: train, sweep, eval, convert, compile, visualize, demo."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys


def _load(args) -> object:
    from opd_jax.config import load_config

    return load_config(args.config, list(args.overrides))


def cmd_train(args) -> int:
    cfg = _load(args)
    if cfg.algorithm == "sft":
        from opd_jax.baselines.sft import train_sft

        result = train_sft(cfg)
    elif cfg.algorithm == "rl":  # in-program reward: the fused step; host grader: split sample/grade/update
        from opd_jax.baselines.rl import train_rl

        result = train_rl(cfg)
    else:
        from opd_jax.trainer import train

        result = train(cfg)
    last = result.get("last", {})
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()}))
    for tag in ("eval_start", "eval_end"):
        if tag in result:
            print(f"{tag}: " + json.dumps({k: round(v, 4) for k, v in result[tag].items()}))
    return 0


def cmd_sweep(args) -> int:
    from opd_jax.config import expand_sweep

    runs = expand_sweep(args.sweep)
    if args.print:
        for run in runs:
            print(run.command())
        return 0
    failed = []
    for i, run in enumerate(runs):
        print(f"[{i + 1}/{len(runs)}] {run.name}", flush=True)
        rc = subprocess.call(shlex.split(run.command()))
        if rc:
            failed.append(run.name)
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args) -> int:
    from opd_jax.eval.run import run_eval_cli

    return run_eval_cli(_load(args))


def cmd_convert(args) -> int:
    from opd_jax.models.hf_io import convert_main

    return convert_main(args.rest) or 0


def cmd_compile(args) -> int:
    from opd_jax.aot import compile_main

    return compile_main(args)


def cmd_visualize(args) -> int:
    from opd_jax.visualize import visualize_main

    return visualize_main(args)


def cmd_demo(args) -> int:
    from opd_jax.miniature.demo import main as demo_main

    return demo_main(["--steps", str(args.steps), "--run-dir", args.run_dir] + (["--fresh"] if args.fresh else []))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opd-jax", description="On-policy distillation in one XLA program per step.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="experiment YAML (may `extends:` a base)")
        sp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.learning_rate=1e-4")
        sp.set_defaults(fn=fn)
        return sp

    with_config("train", cmd_train, "run one experiment config (algorithm: opd | rl | sft)")
    sp = sub.add_parser("sweep", help="run every run of a sweep file sequentially, or --print their commands")
    sp.add_argument("sweep")
    sp.add_argument("--print", action="store_true", help="print one `opd-jax train` command per run")
    sp.set_defaults(fn=cmd_sweep)
    with_config("eval", cmd_eval, "sample k completions per problem and grade them (avg@k, pass@k)")
    sp = sub.add_parser("convert", help="HF checkpoint conversion (see `opd-jax convert -h`)", add_help=False)
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_convert)
    sp = with_config("compile", cmd_compile, "AOT-compile the fused step for a TPU topology; report memory, FLOPs")
    sp.add_argument("--topology", default=None, help="e.g. v5p-64 (default: the config's `topology`)")
    sp.add_argument("--json", default=None, help="also write the report as JSON here")
    sp.add_argument("--fast", action="store_true", help="least XLA optimization effort: a quicker, rougher compile")
    sp = with_config("visualize", cmd_visualize, "render a student completion colored by per-token reverse KL")
    sp.add_argument("--prompt", default=None, help="prompt text (default: the first eval problem)")
    sp.add_argument("--out", default=None, help="output HTML path (default: RUN_DIR/kl.html)")
    sp = sub.add_parser("demo", help="CPU demo: teacher + student (cached), then OPD and SFT with before/after "
                                     "held-out accuracy and KL")
    sp.add_argument("--fresh", action="store_true", help="retrain the cached teacher and student")
    sp.add_argument("--steps", type=int, default=40, help="OPD steps (and SFT steps, for the comparison)")
    sp.add_argument("--run-dir", default="runs/opd_chains/demo", help="where the demo's runs and summary go")
    sp.set_defaults(fn=cmd_demo)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `compile CFG --topology T k=v`: argparse ends the overrides at the first option, so k=v comes back unparsed
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # config and data errors: one clear line, no traceback
        from opd_jax.config import ConfigError

        known = (ConfigError, FileNotFoundError, FileExistsError)
        if isinstance(e, known):
            print(f"opd-jax: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
