"""Evaluation: sampled avg@k / pass@k of a task's eval problems (`evaluate`) and `opd-jax eval` (`run`)."""
