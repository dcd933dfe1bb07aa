"""The OPD miniature: a CPU-sized task and model pair on which the published on-policy distillation claims can be
tested, and the `opd-jax demo` built on it.

- `chains`: the task (`synthetic:chains`): chains of modular steps with a scratchpad, a hash-defined held-out
  split, and reference solutions with marked corrections of slips (a teacher that recovers from mistakes);
- `setup`: the base config of the miniature's models and task;
- `prepare`: the teacher and the student, trained once and cached as HF checkpoint dirs;
- `measure`: held-out accuracy (greedy and T=1) with confidence intervals, and the per-token reverse KL of a
  student against the teacher on held-out problems;
- `demo`: `opd-jax demo`.

Nothing else in `opd_jax` imports this package except `opd_jax.cli.cmd_demo` (and the `synthetic:chains` hook in
`opd_jax.data.synthetic`).
"""
