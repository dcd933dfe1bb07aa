"""Lower bounds on wall time from the two rooflines: the chips' HBM bandwidth and their peak FLOP/s.

These are floors, not measurements or predictions: a program cannot read its bytes faster than the HBM streams them,
nor do its FLOPs faster than the chip's peak. A decode step must read every weight and the filled K/V of its rows
(`aot.MustRead`), one step after another; the other phases (prefill, teacher scoring, the student's update) are
compute-bound at these sizes and get the FLOPs floor. Real runs take longer: MFU below 1, the bytes XLA actually
moves (the AOT decode report: 1.1-1.3x the must-read bytes), host work, and the compile.

Sources: HBM bandwidth and peak FLOP/s per chip from `opd_jax.flops.CHIPS`; FLOPs from `opd_jax.flops`.
"""

from __future__ import annotations

from dataclasses import dataclass


def decode_bytes(weight_bytes: float, kv_bytes_per_slot: float, prompt_len: int, new_tokens: int) -> float:
    """Bytes per chip that `new_tokens` decode steps must read: step t (0-based) reads the weights and the K/V of
    the `prompt_len + t + 1` slots filled so far."""
    N, P = new_tokens, prompt_len
    return N * weight_bytes + kv_bytes_per_slot * (N * P + N * (N + 1) / 2)


def floor_seconds(bytes_per_chip: float, flops_total: float, chip, num_chips: int) -> float:
    """max(bytes / HBM bandwidth, FLOPs / (peak x chips)): neither roofline can be beaten."""
    return max(bytes_per_chip / chip.hbm_bandwidth, flops_total / (chip.peak_flops * num_chips))


@dataclass
class Projection:
    """Roofline floors of one training step, one eval and the whole run, in seconds."""

    step_s: float  # one training step: sampling (decode floor) + teacher scoring + the update (FLOPs floor)
    step_sampling_s: float
    eval_s: float  # one eval: every batch decoding the full `eval.max_new_tokens` (early stops only shorten it)
    eval_batches: int  # sequential batches per eval
    eval_batch: int  # rows per batch it assumes (a fixed eval.batch_size that does not fit: the largest that does)
    evals: int  # evals in the run: at step 0, every `eval.every` steps, and at the end
    steps: int

    @property
    def run_s(self) -> float:
        return self.steps * self.step_s + self.evals * self.eval_s

    @property
    def eval_share(self) -> float:
        return self.evals * self.eval_s / self.run_s if self.run_s else float("nan")

    def lines(self) -> list[str]:
        def h(s: float) -> str:
            return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else \
                f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.2f} ms"

        return [
            "projected wall time (lower bounds from the HBM-bandwidth and peak-FLOP/s rooflines, not measurements):",
            f"  training step  >= {h(self.step_s)}  (sampling {h(self.step_sampling_s)})",
            f"  one eval       >= {h(self.eval_s)}  ({self.eval_batches} sequential batch(es) of {self.eval_batch} "
            "rows, each decoding the full eval.max_new_tokens)",
            f"  the run        >= {h(self.run_s)}  ({self.steps} steps, {self.evals} evals: "
            f"{100 * self.eval_share:.0f}% of it in eval)",
        ]


def eval_count(steps: int, every: int) -> int:
    """Evals a run makes (`Trainer.run`): before step 1, after every `every`-th step short of the last, at the end."""
    return 1 + ((steps - 1) // every if every else 0) + 1


__all__ = ["Projection", "decode_bytes", "eval_count", "floor_seconds"]
