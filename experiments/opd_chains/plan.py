"""The full experiment's plan in one place: the recipe of the cached pair, the methods' learning-rate grids, seeds,
steps, and the extra stages. `run_all` runs it; `tests/test_opd_chains.py` regenerates every training stream it
implies and checks that none contains a held-out problem."""

from __future__ import annotations

from dataclasses import dataclass, field

from opd_jax.miniature.prepare import Recipe


@dataclass(frozen=True)
class Plan:
    recipe: Recipe = field(default_factory=Recipe)
    steps: int = 60  # steps of every compared run
    eval_every: int = 10
    warmup: int = 5  # linear warmup, then constant (the published OPD schedule is constant)
    prompts: int = 16  # prompts per step; x group_size sequences (SFT: that many rows)
    group_size: int = 4
    # The README's grids (OPD 1e-4..1e-3, RL 3e-5..3e-4, both SFTs 3e-4..3e-3) joined with the 1e-4..1e-3 grid the
    # first launch ran for every method (plan.py did not match the README then): four rates where the two differ.
    lrs: dict = field(default_factory=lambda: {
        "opd": (1e-4, 3e-4, 1e-3),
        "rl": (3e-5, 1e-4, 3e-4, 1e-3),
        "sft_fresh": (1e-4, 3e-4, 1e-3, 3e-3),
        "sft_fixed": (1e-4, 3e-4, 1e-3, 3e-3),
    })
    sweep_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    rl_long_steps: int = 240  # RL at its chosen rate, long enough to see its plateau
    rl_long_eval_every: int = 30
    # single prompt as published (one prompt, 20 steps x 256 samples), and at the compared runs' budget (60 x 64
    # samples); prompt n = seed + 1 (`ChainsTask.single_prompt`: distinct, each using every operation)
    single_prompt_shapes: tuple[tuple[int, int], ...] = ((20, 256), (60, 64))  # (steps, samples per step)
    single_prompt_eval_every: int = 5
    single_prompt_seeds: tuple[int, ...] = (0, 1, 2)
    capacity_steps: int = 0  # 0: the teacher's steps (the student architecture on the teacher's own data)
    recovery_facts: int = 64
    recovery_midtrain_steps: int = 150
    recovery_midtrain_lr: float = 3e-3
    recovery_old_fraction: float = 0.3  # the published mix (70/30 docs/chat); the first run used 0.1
    recovery_seeds: tuple[int, ...] = (0, 1, 2)
    recovery_steps: int = 60


PLAN = Plan()
QUICK = Plan(steps=4, eval_every=2, warmup=1, prompts=4, group_size=2,
             lrs={"opd": (1e-3,), "rl": (1e-3,), "sft_fresh": (1e-3,), "sft_fixed": (1e-3,)},
             seeds=(0, 1), rl_long_steps=8, rl_long_eval_every=4, single_prompt_shapes=((2, 8),),
             single_prompt_eval_every=1, single_prompt_seeds=(0,),
             capacity_steps=20, recovery_midtrain_steps=6, recovery_steps=4, recovery_seeds=(0,))
