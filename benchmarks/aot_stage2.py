"""Does the published stage-2 OPD step fit on its TPU slice? AOT-compile it here, on a CPU machine.

Compiles the real fused step of `configs/aime24/stage2_opd.yaml` (Qwen3-8B-Base student, full fine-tuning;
Qwen3-32B teacher; 512 prompts x 4 samples; 1024-token prompts + 4096 new tokens) for the config's topology
(v5p-64 = 32 chips) with abstract weights, and reports per-chip memory, FLOPs per step and compile time; then
compiles the student's decode step alone and reports its per-chip HBM traffic (XLA's `cost_analysis()` bytes
accessed) against the bytes it must read: the weights plus the filled K/V cache (`opd_jax.aot.decode_report`).
Needs libtpu outside the default site (see `opd_jax.aot`): `OPD_TPU_SITE=/path/to/tpu_site`.

    python benchmarks/aot_stage2.py                                   # stage2_opd.yaml on its topology
    python benchmarks/aot_stage2.py --config configs/aime24/stage2_opd_lora.yaml --topology v5p-128
    python benchmarks/aot_stage2.py sampling.micro_batches=32         # any config override
    python benchmarks/aot_stage2.py --no-decode                       # skip the decode-step traffic report
    python benchmarks/aot_stage2.py --no-eval                         # skip the in-loop eval program

Then the in-loop eval program (issue #25): compiled beside the resident train state with `eval.batch_size: auto`
(the largest batch that fits, `opd_jax.eval.batch`) and with the fixed batch of 64 every eval used before, in the
same run; the roofline floor (`opd_jax.roofline`) of one eval and of the run for each; and the eval's decode step
at its batch and its 32K-token cache against the bytes it must read, segment by segment.

Headline `name: value` lines are printed last. Compile time on a 2-core CPU machine is several minutes (the eval
part: about 15 more).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "aime24", "stage2_opd.yaml"))
    p.add_argument("--topology", default=None, help="default: the config's `topology`")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the time-per-step estimate")
    p.add_argument("--json", default=None, help="write the report here as JSON")
    p.add_argument("--fast", action="store_true", help="least XLA optimization effort: quicker, for exploring")
    p.add_argument("--no-decode", action="store_true",
                   help="skip the decode-step traffic report (two more compiles of the student's decode step)")
    p.add_argument("--no-eval", action="store_true", help="skip the in-loop eval program and its projections")
    args = p.parse_args()

    from opd_jax import aot, flops
    from opd_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    report = aot.compile_step(cfg, args.topology, fast=args.fast, decode=not args.no_decode)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - t0
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    print(f"config: {os.path.relpath(args.config, REPO)} {' '.join(args.overrides)}")
    print(f"  {cfg.groups_per_batch} prompts x {cfg.group_size} samples, prompt {cfg.sampling.max_prompt_len} + "
          f"{cfg.sampling.max_new_tokens} new tokens; micro_batches={cfg.micro_batches}, "
          f"sampling.micro_batches={cfg.sampling.micro_batches}, remat={cfg.student.remat}, lora.rank={cfg.lora.rank}")
    for line in report.lines():
        print(line)
    if not report.fits:
        print("does not fit: `opd-jax compile ... --levers 6` searches for overrides that make it fit")
    chip = flops.CHIPS[report.chip]
    total = report.analytic_flops.get("total", float("nan"))
    step_s = total / (report.num_chips * chip.peak_flops * args.mfu)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**report.to_dict(), "wall_seconds": wall, "cpu_seconds": cpu}, f, indent=1, default=str)

    print()
    print(f"topology: {report.topology} ({report.num_chips} {report.chip} chips)")
    print(f"mesh: {report.mesh}")
    print(f"fits: {report.fits}")
    print(f"hbm_per_chip_gib: {report.total_bytes / aot.GiB:.2f}")
    print(f"hbm_fraction: {report.total_bytes / report.hbm_bytes:.3f}")
    print(f"arguments_gib: {report.argument_bytes / aot.GiB:.2f}")
    print(f"temporaries_gib: {report.temp_bytes / aot.GiB:.2f}")
    print(f"analytic_flops_per_step: {total:.3e}")
    print(f"analytic_flops_dense_per_step: {report.analytic_flops.get('dense_total', float('nan')):.3e}")
    print(f"xla_counted_flops_per_step: {report.compiled_flops:.3e}")
    print(f"compute_bound_step_seconds_at_{args.mfu:.0%}_mfu: {step_s:.0f}")  # decode is memory-bound: a floor
    if report.decode is not None:
        d = report.decode
        print(f"decode_kind: {d.kind}")
        print(f"decode_step_gb_first_segment: {d.segments[0].bytes_accessed / aot.GB:.2f}")
        print(f"decode_step_gb_last_segment: {d.segments[-1].bytes_accessed / aot.GB:.2f}")
        print(f"decode_must_read_gb_first_step: {d.segments[0].must_read_first / aot.GB:.2f}")
        print(f"decode_must_read_gb_last_step: {d.segments[-1].must_read_last / aot.GB:.2f}")
        print(f"decode_traffic_vs_must_read: {d.mean_ratio:.2f}x")
        print(f"decode_traffic_vs_must_read_worst_step: {d.worst_ratio:.2f}x")
    print(f"sampling_cast_gib: {report.sampling_cast_bytes / aot.GiB:.2f}")
    print(f"lower_seconds: {report.lower_seconds:.1f}")
    print(f"compile_seconds: {report.compile_seconds:.1f}")
    print(f"compile_cpu_seconds: {cpu:.1f}")
    from opd_jax.eval.evaluate import runs_eval

    if args.no_eval or not runs_eval(cfg):
        return 0 if report.fits else 3
    return eval_part(cfg, report, args) if report.fits else 3


def eval_part(cfg, report, args) -> int:
    """The eval program with "auto" and with the old fixed batch of 64, their projections, and the eval's decode
    report (`aot.decode_report` of the sampler at the eval's batch and token budget)."""
    import copy
    import dataclasses

    from opd_jax import aot

    topology = args.topology or cfg.topology
    resident = report.state_bytes + report.teacher_bytes
    out = {}
    for name, setting in (("auto", "auto"), ("fixed64", 64)):
        c = copy.deepcopy(cfg)
        c.eval.batch_size = setting
        ev = aot.compile_eval(c, topology, resident_bytes=resident, fast=args.fast)
        out[name] = (ev, aot.project(c, report, ev))
        print(f"\n== eval.batch_size {setting}")
        for line in ev.lines() + out[name][1].lines():
            print(line)
    ev = out["auto"][0]
    c = copy.deepcopy(cfg)  # the eval's sampler as a decode report: its batch, its token budget, one sampling call
    c.groups_per_batch, c.group_size, c.sampling.micro_batches = ev.batch, 1, 1
    c.sampling.max_new_tokens = cfg.eval.max_new_tokens
    dec = aot.decode_report(c, aot.topology_devices(aot.parse_topology(topology)))
    print("\n== the eval's decode step")
    for line in dec.lines():
        print(line)
    if args.json:
        with open(args.json, encoding="utf-8") as f:
            d = json.load(f)
        d["eval"] = {k: {"report": dataclasses.asdict(e), "projection": {**dataclasses.asdict(p), "run_s": p.run_s,
                                                                         "eval_share": p.eval_share}}
                     for k, (e, p) in out.items()}
        d["eval_decode"] = dataclasses.asdict(dec)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=1, default=str)
    a, b = out["auto"], out["fixed64"]
    print()
    print(f"eval_batch_auto: {a[0].batch}")
    print(f"eval_fits_auto: {a[0].fits}")
    print(f"eval_hbm_per_chip_gib_auto: {(a[0].bytes_per_chip + a[0].resident_bytes) / aot.GiB:.2f}")
    print(f"eval_batches_auto: {a[1].eval_batches}")
    print(f"eval_batches_fixed64: {b[1].eval_batches}")
    print(f"eval_floor_minutes_auto: {a[1].eval_s / 60:.1f}")
    print(f"eval_floor_minutes_fixed64: {b[1].eval_s / 60:.1f}")
    print(f"eval_floor_speedup_auto_vs_64: {b[1].eval_s / a[1].eval_s:.1f}x")
    print(f"run_floor_hours_auto: {a[1].run_s / 3600:.2f}")
    print(f"run_floor_hours_fixed64: {b[1].run_s / 3600:.2f}")
    print(f"eval_share_of_run_auto: {100 * a[1].eval_share:.0f}%")
    print(f"eval_share_of_run_fixed64: {100 * b[1].eval_share:.0f}%")
    print(f"step_floor_minutes: {a[1].step_s / 60:.2f}")
    print(f"eval_decode_traffic_vs_must_read: {dec.mean_ratio:.2f}x")
    print(f"eval_decode_traffic_vs_must_read_worst_step: {dec.worst_ratio:.2f}x")
    return 0 if a[0].fits else 3


if __name__ == "__main__":
    sys.exit(main())
