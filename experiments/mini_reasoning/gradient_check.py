"""Is OPD's update the same as SFT's when both see the same sequences? On the teacher's own greedy solutions of
one batch of prompts, compare the gradient of each OPD loss (through `StepBuilder.update_phase`, with SGD at lr 1
so the parameter change is the gradient) with the SFT gradient (`sft_step`) on the same tokens.

    python -m experiments.mini_reasoning.gradient_check [--prompts 32] [key=value ...]

A forward-KL cosine near 1 means the OPD update path and the SFT path agree, so any gap between OPD and SFT in the
comparison comes from *which* sequences they train on (the student's own samples vs the teacher's solutions).
"""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np

from experiments.mini_reasoning import common


def cosine(a, b) -> float:
    import jax

    fa = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
    fb = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
    return float(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb) + 1e-30))


def main(argv: list[str] | None = None) -> int:
    common.quiet_jax()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--recipe", default="{}", help="JSON of PrepRecipe fields (teacher/student preparation)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax

    from experiments.mini_reasoning.prepare import PrepRecipe, prepare
    from opd_jax import losses
    from opd_jax.baselines.sft import SFTBatch, pack_rows, sft_step
    from opd_jax.data.synthetic import EOS
    from opd_jax.sampling import SampleOutput, SamplingParams, sample
    from opd_jax.step import StepBuilder, completion_hidden
    from opd_jax.train_state import TrainState
    from opd_jax.trainer import Trainer

    prep = prepare(common.load("base", a.overrides), PrepRecipe(**json.loads(a.recipe)))
    out: dict = {}
    for kind in ("forward_kl", "reverse_kl", "importance_sampling"):
        cfg = common.load("base", [*prep.overrides(), f"loss.kind={kind}", f"groups_per_batch={a.prompts}",
                                   "group_size=1", "run_dir=runs/mini_reasoning/gradient_check", "overwrite=true",
                                   "logging.progress=false", *a.overrides])
        tr = Trainer(cfg)
        batch = tr._next_batch()
        sgd = optax.sgd(1.0)  # the parameter change of one step is minus the gradient
        builder = StepBuilder(cfg, tr.student.mdef, [t.mdef for t in tr.teachers], tr.mesh, sgd)
        state = TrainState(step=jnp.zeros((), jnp.int32), trainable=tr.state.trainable, frozen=tr.state.frozen,
                           opt_state=sgd.init(tr.state.trainable))
        teacher = tr.teachers[0].mdef.merge(tr.teacher_params[0])
        written = sample(teacher, batch.tokens, batch.mask, jax.random.key(0), SamplingParams.create(greedy=True),
                         max_new_tokens=cfg.sampling.max_new_tokens, stop_token_ids=(EOS,))
        student = tr.student.mdef.merge(tr.state.trainable, tr.state.frozen)
        h = completion_hidden(student, batch.tokens, batch.mask, written.tokens, written.mask, None)
        lp = losses.token_logprobs(student.logits(h), written.tokens) * written.mask  # as if the student sampled them
        samples = SampleOutput(tokens=written.tokens, mask=written.mask, lengths=written.lengths, logprobs=lp,
                               sampler_logprobs=lp, truncated=written.truncated)
        new, _ = jax.jit(builder.update_phase)(state, tr.teacher_params, batch, samples)
        g_opd = jax.tree.map(lambda x, y: x - y, state.trainable, new.trainable)

        rows = []
        for pt, pm, ct, cm in zip(*map(np.asarray, (batch.tokens, batch.mask, written.tokens, written.mask)),
                                  strict=True):
            prompt, comp = [int(t) for t in pt[pm]], [int(t) for t in ct[cm]]
            rows.append((prompt + comp, [0] * len(prompt) + [1] * len(comp)))
        arrays, _ = pack_rows(rows, cfg.sampling.max_prompt_len + cfg.sampling.max_new_tokens, pad_id=0)
        sft = jax.jit(functools.partial(sft_step, tr.student.mdef, sgd, None, logprob_chunk=128))
        sft_new, _ = sft(state, SFTBatch(**{k: jnp.asarray(v) for k, v in arrays.items()}))
        g_sft = jax.tree.map(lambda x, y: x - y, state.trainable, sft_new.trainable)
        out[kind] = cosine(g_opd, g_sft)
        print(f"{kind}: cosine(OPD gradient, SFT gradient) on the teacher's solutions = {out[kind]:.4f}", flush=True)
    for k, v in out.items():
        print(f"cos_{k}_vs_sft: {v:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
