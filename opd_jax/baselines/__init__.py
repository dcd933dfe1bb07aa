"""Baselines that share the OPD trainer's pieces: `sft` (SFT / off-policy distillation on teacher samples) and
`rl` (GRPO-style RL with an in-program or host-side grader)."""
