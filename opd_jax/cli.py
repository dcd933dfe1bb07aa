"""`opd-jax` command line: train, sweep, eval, convert, compile, visualize, demo.

Exit codes: 0 done; 2 a user error (bad config, data, files, run dir: one line that names the culprit, plus a hint;
`--debug` shows the traceback); 75 (EX_TEMPFAIL) a training run stopped by SIGTERM / SIGINT after saving a
checkpoint, to be resumed with `resume=true` (a scheduler can requeue on it); 3 from `train`: stopped by the
length-collapse guard (`guard.on_collapse: stop`, opd_jax.guards) after saving a checkpoint, from `compile`: the
program does not fit the chips; 130 interrupted before it could save; 1 anything else (a bug: the traceback is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry"


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
    if "preempted_at" in result:
        print(f"stopped at step {result['preempted_at']} with a checkpoint; resume with resume=true "
              f"(exit code {EXIT_PREEMPTED})")
        return EXIT_PREEMPTED
    if "collapsed_at" in result:
        from opd_jax.guards import EXIT_COLLAPSED

        print(f"stopped by the length-collapse guard at step {result['collapsed_at']} with a checkpoint (exit code "
              f"{EXIT_COLLAPSED}): {result['collapse']}")
        return EXIT_COLLAPSED
    return 0


def cmd_sweep(args) -> int:
    from opd_jax.config import apply_overrides, expand_sweep

    runs = expand_sweep(args.sweep)
    extra = list(args.overrides)
    for run in runs:  # every run must still load with the extra overrides: fail before launching any
        apply_overrides(run.config, extra)
    if args.print:
        for run in runs:
            print(run.command(extra))
        return 0
    failed = []
    for i, run in enumerate(runs):
        print(f"[{i + 1}/{len(runs)}] {run.name}", flush=True)
        rc = subprocess.call(shlex.split(run.command(extra)))
        if rc:
            failed.append(f"{run.name} (exit {rc})")
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args) -> int:
    from opd_jax.eval.run import run_eval_cli

    return run_eval_cli(_load(args))


def cmd_convert(args) -> int:
    import jax

    from opd_jax.models.hf_io import convert

    dtype = convert(args.src, args.dst, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                    overwrite=args.overwrite, copy_aux=not args.no_aux)
    if jax.process_index() == 0:
        print(f"converted {args.src} -> {args.dst} ({dtype})")
    return 0


def cmd_compile(args) -> int:
    from opd_jax.aot import compile_main

    return compile_main(args)


def cmd_visualize(args) -> int:
    from opd_jax.visualize import visualize_main

    return visualize_main(args)


def cmd_demo(args) -> int:
    from opd_jax.miniature.demo import main as demo_main

    return demo_main(["--steps", str(args.steps), "--run-dir", args.run_dir] + (["--fresh"] if args.fresh else []))


def parse_size(s: str) -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", s, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}; e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opd-jax", description="On-policy distillation in one XLA program per step.",
                                epilog="--debug (anywhere) prints the traceback of an error.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name, fn, help_, epilog=None):
        sp = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("config", help="experiment YAML (may `extends:` a base)")
        sp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.learning_rate=1e-4 "
                                                     "(every key: `opd-jax train --help`, docs/config.md)")
        sp.set_defaults(fn=fn)
        return sp

    from opd_jax.config.reference import schema_reference

    with_config("train", cmd_train, "run one experiment config (algorithm: opd | rl | sft)",
                epilog=schema_reference())
    sp = sub.add_parser(
        "sweep", help="run every run of a sweep file sequentially, or --print their commands",
        description="Expand a sweep file (a base config crossed with `grid:` values and zipped `zip:` lists, "
                    "plus fixed `overrides:`) into runs, each with its own run_dir under the sweep's, and run them "
                    "one after another (a run's failure is reported and the others go on), or print one "
                    "`opd-jax train` command per run for a scheduler (tpu/sweep.sh launches them on TPU slices). "
                    "Example: configs/sweeps/example.yaml.")
    sp.add_argument("sweep", help="the sweep YAML file")
    sp.add_argument("overrides", nargs="*", help="key=value overrides added to every run, e.g. resume=auto or "
                                                 "overwrite=true to re-run a sweep")
    sp.add_argument("--print", action="store_true", help="print one `opd-jax train` command per run")
    sp.set_defaults(fn=cmd_sweep)
    with_config("eval", cmd_eval, "sample k completions per problem and grade them (avg@k, pass@k)")
    sp = sub.add_parser("convert", help="re-export an HF Qwen3 checkpoint through opd_jax (dtype, shards)",
                        description="Re-export an HF Qwen3 checkpoint through opd_jax: change its dtype, re-shard its "
                                    "files, or check that opd_jax reads it.")
    sp.add_argument("src", help="HF checkpoint: a local dir, gs://..., or a Hub id (Qwen/Qwen3-8B-Base[@revision])")
    sp.add_argument("dst", help="output dir (local or gs://)")
    sp.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="output dtype (default: the source's torch_dtype, float32 if not bf16/fp32)")
    sp.add_argument("--max-shard-size", type=parse_size, default=5_000_000_000,
                    help="largest output file, e.g. 5GB (default), 500MB")
    sp.add_argument("--overwrite", action="store_true", help="replace weights already in DST")
    sp.add_argument("--no-aux", action="store_true", help="do not copy tokenizer/generation files")
    sp.set_defaults(fn=cmd_convert)
    sp = with_config("compile", cmd_compile, "AOT-compile the fused step for a TPU topology; report memory, FLOPs")
    sp.add_argument("--topology", default=None, help="e.g. v5p-64 (default: the config's `topology`)")
    sp.add_argument("--json", default=None, help="also write the report as JSON here")
    sp.add_argument("--fast", action="store_true", help="least XLA optimization effort: a quicker, rougher compile")
    sp.add_argument("--levers", type=int, default=12, metavar="N",
                    help="when it does not fit, compile up to N variants to find overrides that make it fit (0: off)")
    sp = with_config("visualize", cmd_visualize, "render a student completion colored by per-token reverse KL")
    sp.add_argument("--prompt", default=None, help="prompt text (default: the first eval problem)")
    sp.add_argument("--out", default=None, help="output HTML path (default: RUN_DIR/kl.html)")
    sp = sub.add_parser("demo", help="CPU demo: RL and OPD from the same base student, same steps, with before/after "
                                     "held-out accuracy and KL",
                        description="On-policy distillation next to RL on a CPU, 1-2 minutes on 2 cores: on chains of "
                                    "12 steps, from the base student and the RL teacher that ship with the package, "
                                    "as many RL steps as OPD steps, with held-out accuracy (95% intervals) and "
                                    "per-token KL to the teacher before and after.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sp.add_argument("--fresh", action="store_true", help="train every model anew (about 10 min on 2 cores) instead "
                                                         "of using the ones shipped with the package")
    from opd_jax.miniature.demo import DEMO_STEPS

    sp.add_argument("--steps", type=int, default=DEMO_STEPS, help="RL steps, and as many OPD steps")
    sp.add_argument("--run-dir", default="runs/opd_chains/demo", help="where the demo's runs and summary go (a rerun "
                                                                        "replaces the demo's own directory)")
    sp.set_defaults(fn=cmd_demo)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `compile CFG --topology T k=v`: argparse ends the overrides at the first option, so k=v comes back unparsed
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("OPD_JAX_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    args = parse(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("opd-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a user error: one clear line (and a hint); a bug: the traceback
        from opd_jax.errors import UserError

        if debug or not isinstance(e, UserError | FileNotFoundError | FileExistsError | PermissionError):
            raise
        print(f"opd-jax: error: {e}", file=sys.stderr)
        hint = getattr(e, "hint", "")
        print(f"  hint: {hint}" if hint else "  (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
