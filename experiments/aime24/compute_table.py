"""The AIME'24 cost table of the on-policy distillation blog post, from its published figures and from ours.

    python -m experiments.aime24.compute_table               # published figures + our analytic estimate
    python -m experiments.aime24.compute_table --published   # published figures only
    python -m experiments.aime24.compute_table --mfu 0.35 --chip v5p --num-chips 64

The blog's ratios: 9x = SFT-2M student FLOPs / OPD total (1.5e21 / 1.66e20, the SFT data treated as free);
~30x = (SFT-2M student + SFT-2M teacher sampling) / OPD total. Our estimate recomputes every FLOP figure with
`opd_jax.flops` from explicit token counts; each input is listed with its source or marked as an assumption.
The output ends with `name: value` headline lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from opd_jax import flops as F
from opd_jax.config.presets import resolve_model_config
from opd_jax.config.schema import ModelConfig
from opd_jax.models.weights import num_params

NOTES = "OPD_NOTES.md"
BLOG = f"blog table ({NOTES})"
QWEN3 = f"Qwen3 report Table 21 ({NOTES})"

ROW_NAMES = ("SFT-400K", "SFT-2M", "RL", "OPD")


@dataclass(frozen=True)
class Row:
    name: str
    aime24: str
    student_flops: float | None
    teacher_flops: float | None
    gpu_hours: float | None
    source: str

    @property
    def total_flops(self) -> float:
        return (self.student_flops or 0.0) + (self.teacher_flops or 0.0)


@dataclass(frozen=True)
class Input:
    name: str
    value: str
    source: str


# The published table, verbatim (OPD_NOTES.md, "The numbers to reproduce").
PUBLISHED_ROWS: dict[str, Row] = {
    "SFT-400K": Row("SFT-400K (start)", "60%", 3.8e20, 8.5e20, None, BLOG),
    "SFT-2M": Row("SFT-2M (extrap., additional)", "~70%", 1.5e21, 3.4e21, None, BLOG),
    "RL": Row("RL (Qwen3 report)", "67.6%", None, None, 17_920.0, QWEN3),
    "OPD": Row("OPD (~150 steps)", "70%", 8.2e19, 8.4e19, None, BLOG),
}
QWEN3_OPD_GPU_HOURS = 1_800.0  # Qwen3 report Table 21: its own on-policy distillation run (74.4%), not the blog's


def published_inputs() -> list[Input]:
    return [
        Input("SFT-400K student / teacher FLOPs", "3.8e20 / 8.5e20", BLOG),
        Input("SFT-2M (additional) student / teacher FLOPs", "1.5e21 / 3.4e21", BLOG),
        Input("OPD student / teacher FLOPs", "8.2e19 / 8.4e19", BLOG),
        Input("RL GPU-hours", "17,920", QWEN3),
        Input("OPD GPU-hours in the Qwen3 report", "1,800", QWEN3),
    ]


def efficiency_ratios(rows: Mapping[str, Row]) -> dict[str, float]:
    """The blog's cost-efficiency ratios from a table's SFT-2M and OPD rows."""
    opd_total = rows["OPD"].total_flops
    sft2m = rows["SFT-2M"]
    return {
        "sft2m_vs_opd": (sft2m.student_flops or 0.0) / opd_total,
        "sft2m_with_teacher_vs_opd": sft2m.total_flops / opd_total,
    }


def published_ratios() -> dict[str, float]:
    """9x and ~30x from the published figures, plus the Qwen3 report's RL vs OPD GPU-hour ratio."""
    out = efficiency_ratios(PUBLISHED_ROWS)
    out["rl_vs_opd_gpu_hours"] = (PUBLISHED_ROWS["RL"].gpu_hours or 0.0) / QWEN3_OPD_GPU_HOURS
    return out


@dataclass(frozen=True)
class Assumptions:
    """Token counts and models behind our analytic estimate. `SOURCES` says where each default comes from."""

    student: str = "qwen3-8b-base"
    teacher: str = "qwen3-32b"
    sft_examples: int = 400_000
    sft2m_additional_examples: int = 1_600_000
    sft_prompt_tokens: int = 256
    sft_completion_tokens: int = 8_000
    sft_teacher_samples_per_example: float = 1.0
    opd_steps: int = 150
    opd_prompts_per_step: int = 512
    opd_samples_per_prompt: int = 4
    opd_prompt_tokens: int = 128
    opd_completion_tokens: int = 4_000
    lora_rank: int = 0
    attention: str = "causal"
    eval_every: int = 10
    eval_rows: int = 30 * 32
    eval_prompt_tokens: int = 256
    eval_completion_tokens: int = 16_000


SOURCES: dict[str, str] = {
    "student": "published: student Qwen3-8B-Base",
    "teacher": "published: FLOPs counted at a 32B teacher (Qwen3-32B dims; OpenThoughts3 itself used QwQ-32B)",
    "sft_examples": "published: OpenThoughts3 ~400K prompts",
    "sft2m_additional_examples": "derived: 2M - 400K (the blog's SFT-2M row is 4x SFT-400K, the additional cost)",
    "sft_prompt_tokens": "assumption",
    "sft_completion_tokens": "assumption (long reasoning traces; SFT max length 16,384)",
    "sft_teacher_samples_per_example": "assumption (no rejection sampling; OpenThoughts3 sampled 16 per question)",
    "opd_steps": "published: ~150 steps",
    "opd_prompts_per_step": "published: 512-1024 prompts per step (lower end)",
    "opd_samples_per_prompt": "published: 4 samples per prompt",
    "opd_prompt_tokens": "assumption (DeepMath question + chat template)",
    "opd_completion_tokens": "assumption (max_tokens 4,096 published; completions run near the cap)",
    "lora_rank": "assumption: full fine-tuning FLOPs (the blog also ran LoRA rank 128)",
    "attention": "assumption: causal, only unmasked query-key pairs counted",
    "eval_every": "configs/aime24/stage2_opd.yaml: eval.every 10 (with one eval before step 1 and one at the end)",
    "eval_rows": "published: AIME'24, 30 problems x avg@32",
    "eval_prompt_tokens": "assumption (an AIME problem in the chat template)",
    "eval_completion_tokens": "assumption: mean sampled length (the cap is eval.max_new_tokens 32,768)",
}


def eval_flops(a: Assumptions) -> tuple[float, int]:
    """(FLOPs of one in-loop AIME'24 eval: the student decoding every row, how many evals the run makes)."""
    from opd_jax.roofline import eval_count

    one = F.decode_flops(_model(a.student), a.eval_rows, a.eval_prompt_tokens, a.eval_completion_tokens,
                         attention=a.attention)  # type: ignore[arg-type]
    return one, eval_count(a.opd_steps, a.eval_every)


def _model(name: str) -> ModelConfig:
    return resolve_model_config(ModelConfig(preset=name))


def analytic_rows(a: Assumptions) -> dict[str, Row]:
    """Our FLOP estimate of the SFT and OPD rows (RL keeps the report's GPU-hours: no token counts published)."""
    student, teacher = _model(a.student), _model(a.teacher)
    sft_len = a.sft_prompt_tokens + a.sft_completion_tokens
    sft_one = F.sft_flops(
        student,
        1,
        sft_len,
        teacher=teacher,
        prompt_len=a.sft_prompt_tokens,
        lora_rank=a.lora_rank,
        attention=a.attention,  # type: ignore[arg-type]
        remat="none",
    )
    sft_student = sft_one["student_training"]
    sft_teacher = sft_one["teacher_scoring"] * a.sft_teacher_samples_per_example
    opd_step = F.opd_step_flops(
        student,
        teacher,
        a.opd_prompts_per_step * a.opd_samples_per_prompt,
        a.opd_prompt_tokens,
        a.opd_completion_tokens,
        a.lora_rank,
        attention=a.attention,  # type: ignore[arg-type]
        remat="none",
    )
    n400, n2m = a.sft_examples, a.sft2m_additional_examples
    return {
        "SFT-400K": Row("SFT-400K (start)", "60%", sft_student * n400, sft_teacher * n400, None, "analytic"),
        "SFT-2M": Row("SFT-2M (extrap., additional)", "~70%", sft_student * n2m, sft_teacher * n2m, None, "analytic"),
        "RL": PUBLISHED_ROWS["RL"],
        "OPD": Row(
            "OPD (~150 steps)",
            "70%",
            opd_step["student_total"] * a.opd_steps,
            opd_step["teacher_total"] * a.opd_steps,
            None,
            "analytic",
        ),
    }


def analytic_inputs(a: Assumptions) -> list[Input]:
    out = []
    for f in dataclasses.fields(a):
        value = getattr(a, f.name)
        out.append(Input(f.name, f"{value:,}" if isinstance(value, int) else str(value), SOURCES[f.name]))
    return out


def implied_by_published(a: Assumptions) -> list[str]:
    """Back-solve the token counts the published figures imply at the usual 2N (forward) / 6N (train) rule."""
    n_s, n_t = num_params(_model(a.student)), num_params(_model(a.teacher))
    seqs = a.opd_steps * a.opd_prompts_per_step * a.opd_samples_per_prompt
    p = PUBLISHED_ROWS
    opd_t = p["OPD"].teacher_flops / (2 * n_t * seqs)
    opd_s = p["OPD"].student_flops / (8 * n_s * seqs)
    sft_s_tokens = p["SFT-400K"].student_flops / (6 * n_s)
    sft_t_tokens = p["SFT-400K"].teacher_flops / (2 * n_t)
    return [
        f"OPD teacher 8.4e19 = 2*N_teacher*T      -> {opd_t:,.0f} tokens/sequence over {seqs:,} sequences",
        f"OPD student 8.2e19 = (2+6)*N_student*T  -> {opd_s:,.0f} tokens/sequence",
        f"SFT-400K student 3.8e20 = 6*N_student*T -> {sft_s_tokens / a.sft_examples:,.0f} tokens/example"
        + " (above the 16,384 max length: more rows than 400K, or a different count)",
        f"SFT-400K teacher 8.5e20 = 2*N_teacher*T -> {sft_t_tokens / a.sft_examples:,.0f} tokens/example,"
        + f" i.e. the teacher generated ~{sft_t_tokens / sft_s_tokens:.2f}x the tokens the student trained on",
    ]


def fmt_flops(x: float | None) -> str:
    if x is None:
        return "-"
    exp = math.floor(math.log10(x))
    return f"{x / 10**exp:.2f}e{exp}"


def fmt_ratio(x: float) -> str:
    return f"{x:.1f}x"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in body)]


def build_report(
    published_only: bool = False,
    mfu: float = 0.35,
    chip: str = "v5p",
    num_chips: int = 64,
    assumptions: Assumptions | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The printed lines and the headline `name -> value` figures."""
    a = assumptions or Assumptions()
    pub = PUBLISHED_ROWS
    pub_ratios = published_ratios()
    ours = None if published_only else analytic_rows(a)
    lines: list[str] = ["AIME'24 cost table (student Qwen3-8B-Base, teacher counted at 32B)", ""]

    header = ["row", "AIME'24", "student FLOPs", "teacher FLOPs"]
    if ours is not None:
        header += ["student FLOPs (ours)", "teacher FLOPs (ours)"]
    header += ["GPU-hours", "source"]
    body = []
    for key in ROW_NAMES:
        r = pub[key]
        cells = [r.name, r.aime24, fmt_flops(r.student_flops), fmt_flops(r.teacher_flops)]
        if ours is not None:
            cells += [fmt_flops(ours[key].student_flops), fmt_flops(ours[key].teacher_flops)]
        cells += [f"{r.gpu_hours:,.0f}" if r.gpu_hours else "-", r.source]
        body.append(cells)
    lines += _table(header, body)

    lines += ["", "Cost-efficiency vs OPD (blog's method)"]
    rat_header = ["ratio", "formula", "published"] + (["ours"] if ours is not None else [])
    our_ratios = efficiency_ratios(ours) if ours is not None else {}
    rat_body = [
        ["SFT-2M / OPD", "SFT-2M student / OPD total", fmt_ratio(pub_ratios["sft2m_vs_opd"])],
        [
            "SFT-2M+teacher / OPD",
            "(SFT-2M student + teacher) / OPD total",
            fmt_ratio(pub_ratios["sft2m_with_teacher_vs_opd"]),
        ],
    ]
    if ours is not None:
        rat_body[0].append(fmt_ratio(our_ratios["sft2m_vs_opd"]))
        rat_body[1].append(fmt_ratio(our_ratios["sft2m_with_teacher_vs_opd"]))
    rat_body.append(
        [
            "RL / OPD GPU-hours",
            "17,920 / 1,800 (Qwen3 report, its own OPD run)",
            fmt_ratio(pub_ratios["rl_vs_opd_gpu_hours"]),
        ]
        + (["-"] if ours is not None else [])
    )
    lines += _table(rat_header, rat_body)
    lines += ["(the blog's ~18x GPU-hour figure needs its GPU-hours, which OPD_NOTES.md does not list)"]

    lines += ["", "Inputs"]
    inputs = published_inputs() + ([] if ours is None else analytic_inputs(a))
    lines += _table(["input", "value", "source"], [[i.name, i.value, i.source] for i in inputs])
    if ours is not None:
        lines += ["", "What the published figures imply (N = all parameters incl. embeddings)"]
        lines += ["  " + s for s in implied_by_published(a)]

    spec = F.CHIPS[chip]
    opd_pub = pub["OPD"].total_flops
    hours_pub = F.tpu_hours(opd_pub, chip, mfu)
    title = f"Stage-2 (OPD) projection on {chip} ({spec.peak_flops / 1e12:.0f} TFLOP/s bf16, {spec.hbm_gb:.0f} GB HBM)"
    lines += ["", f"{title} at MFU {mfu:.2f}"]
    proj = [
        [
            "published FLOPs",
            fmt_flops(opd_pub),
            f"{hours_pub:,.0f}",
            f"{F.tpu_hours(opd_pub, chip, mfu, num_chips):,.1f}",
        ]
    ]
    if ours is not None:
        opd_ours = ours["OPD"].total_flops
        proj.append(
            [
                "our FLOPs",
                fmt_flops(opd_ours),
                f"{F.tpu_hours(opd_ours, chip, mfu):,.0f}",
                f"{F.tpu_hours(opd_ours, chip, mfu, num_chips):,.1f}",
            ]
        )
    ev_one, n_evals = eval_flops(a)
    ev_total = ev_one * n_evals
    proj.append(["in-loop evals", fmt_flops(ev_total), f"{F.tpu_hours(ev_total, chip, mfu):,.0f}",
                 f"{F.tpu_hours(ev_total, chip, mfu, num_chips):,.1f}"])
    lines += _table(["basis", "FLOPs", "chip-hours", f"wall hours on {num_chips} chips"], proj)
    lines += [f"(in-loop evals: {n_evals} x AIME'24 avg@32, {a.eval_rows} rows of ~{a.eval_completion_tokens:,} "
              f"tokens each, {fmt_flops(ev_one)} FLOPs per eval: {100 * ev_total / (ev_total + opd_pub):.0f}% of "
              "the published OPD FLOPs plus evals)",
              "(one MFU for everything is optimistic: sampling and evals are decode, which is HBM-bound; "
              "`opd-jax compile` prints the HBM-roofline floor of a step and an eval)"]

    head: dict[str, str] = {
        "sft2m_vs_opd": fmt_ratio(pub_ratios["sft2m_vs_opd"]),
        "sft2m_with_teacher_vs_opd": fmt_ratio(pub_ratios["sft2m_with_teacher_vs_opd"]),
        "rl_vs_opd_gpu_hours": fmt_ratio(pub_ratios["rl_vs_opd_gpu_hours"]),
        "opd_total_flops": fmt_flops(opd_pub),
        f"stage2_{chip}_hours": f"{hours_pub:.0f}",
        f"stage2_{chip}_wall_hours_{num_chips}chips": f"{F.tpu_hours(opd_pub, chip, mfu, num_chips):.1f}",
        "eval_share_of_stage2_flops": f"{100 * ev_total / (ev_total + opd_pub):.0f}%",
    }
    if ours is not None:
        head.update(
            {
                "sft2m_vs_opd_analytic": fmt_ratio(our_ratios["sft2m_vs_opd"]),
                "sft2m_with_teacher_vs_opd_analytic": fmt_ratio(our_ratios["sft2m_with_teacher_vs_opd"]),
                "opd_total_flops_analytic": fmt_flops(ours["OPD"].total_flops),
                f"stage2_{chip}_hours_analytic": f"{F.tpu_hours(ours['OPD'].total_flops, chip, mfu):.0f}",
            }
        )
    lines += [""] + [f"{k}: {v}" for k, v in head.items()]
    return lines, head


def main(argv: Sequence[str] | None = None) -> int:
    defaults = Assumptions()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--published", action="store_true", help="use only the published FLOP figures")
    ap.add_argument("--mfu", type=float, default=0.35)
    ap.add_argument("--chip", choices=sorted(F.CHIPS), default="v5p")
    ap.add_argument("--num-chips", type=int, default=64)
    for f in dataclasses.fields(Assumptions):
        ap.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=SOURCES[f.name],
        )
    args = ap.parse_args(argv)
    a = Assumptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Assumptions)})
    lines, _ = build_report(args.published, args.mfu, args.chip, args.num_chips, a)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
