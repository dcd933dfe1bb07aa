"""The per-token picture of a chains student against its teacher: where the teacher pushes, by scratchpad position.

`token_anatomy` samples the student (T=1) on held-out validation problems, scores every sampled token with both
models (one forward pass each, the full 40-token distributions) and sorts each completion token into the grammar
position it was written in (`classify`):

    label  prev  op  operand  result  [! result_again ...]  label ...  '#'  answer  eos
    'b'    '1'   '*' '2'      '2'      '!' '2'                          '#'  '5'     <eos>

A `result` (or `result_again`) digit is *locally right* when it equals `prev op operand` mod `mod` (the three
tokens before it, what the teacher can check). After a result, the `after_*` position is where the student chooses
between the correction marker '!', the next label (or '#') and anything else, split by whether that result was
right, and whether it was itself a correction (`after_again_*`). The numbers per class are what the OPD loss sees:
the share of tokens, the mean sampled reverse-KL estimate `kl_t = log p_s(x_t) - log p_t(x_t)` (the advantage is
`-kl_t`), and at the `after_*` positions both models' probability of '!' and of moving on.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from opd_jax.data.chains import CORRECTION, LABELS, OPS, ChainsTask, apply_op

# Grammar positions, in order of a clean scratchpad step; `off` is anything the grammar does not allow there.
CLASSES = ("label", "prev", "op", "operand", "result_right", "result_wrong", "after_right", "after_wrong",
           "again_right", "again_wrong", "after_again_right", "after_again_wrong", "hash", "answer", "eos", "off")


def classify(text: str, mod: int) -> list[tuple[str, dict]]:
    """One (class, facts) per character of a completion `text` (stop token excluded), by the scratchpad grammar.
    facts: for an `after_*` position, `{"prev_right": bool}`; for results, `{"right": bool}`."""
    out: list[tuple[str, dict]] = []
    state, prev, op, operand, last_right = "label", None, None, None, False
    for ch in text:
        if state == "label":
            if ch in LABELS:
                out.append(("label", {}))
                state = "prev"
            elif ch == "#":
                out.append(("hash", {}))
                state = "answer"
            else:
                out.append(("off", {}))
        elif state == "prev":
            out.append(("prev" if ch.isdigit() else "off", {}))
            prev = int(ch) if ch.isdigit() else None
            state = "op"
        elif state == "op":
            out.append(("op" if ch in OPS else "off", {}))
            op = ch if ch in OPS else None
            state = "operand"
        elif state == "operand":
            out.append(("operand" if ch.isdigit() else "off", {}))
            operand = int(ch) if ch.isdigit() else None
            state = "result"
        elif state in ("result", "again"):
            right = ch.isdigit() and None not in (prev, op, operand) and int(ch) == apply_op(prev, op, operand, mod)
            name = "result" if state == "result" else "again"
            out.append((f"{name}_{'right' if right else 'wrong'}" if ch.isdigit() else "off", {"right": right}))
            last_right, state = right, ("after" if state == "result" else "after_again")
        elif state in ("after", "after_again"):
            cls = f"{state}_{'right' if last_right else 'wrong'}"
            out.append((cls, {"prev_right": last_right, "char": ch}))
            if ch == CORRECTION:
                state = "again"
            elif ch in LABELS:
                state = "prev"
            elif ch == "#":
                state = "answer"
            else:
                state = "label"
        elif state == "answer":
            out.append(("answer" if ch.isdigit() else "off", {}))
            state = "eos"
        else:
            out.append(("off", {}))
    return out


def token_anatomy(student, teacher, task: ChainsTask, *, n: int = 256, seed: int = 0, max_new_tokens: int = 48,
                  max_prompt_len: int = 24, split: str = "val") -> dict:
    """Per-class statistics of `n` T=1 samples of `student` (a LoadedModel) on `split` problems, scored by `teacher`.

    Returns {"classes": {class: {share, tokens, kl_mean, p_student, p_teacher, p_mark_s, p_mark_t, p_on_s, p_on_t}},
    "rollouts": {accuracy, truncated, mean_length, with_mark, stop_rate}, "examples": [first 8 completions]}.
    `p_mark_*` is each model's probability of '!' at the position, `p_on_*` of the grammar's way on (a label, '#').
    """
    import jax
    import jax.numpy as jnp

    from opd_jax.data.task import pad_prompts
    from opd_jax.sampling import SamplingParams, make_sampler
    from opd_jax.step import completion_hidden

    problems = task.held_out(split)[:n]
    prompts = [task.prompt_tokens(c) for c in problems]
    tok, mask, _ = pad_prompts(prompts, max_prompt_len, pad_id=task.pad_id)
    stops = tuple(task.stop_token_ids)
    draw = make_sampler(student.mdef, max_new_tokens=max_new_tokens, stop_token_ids=stops, pad_id=task.pad_id)
    out = draw((student.trainable, student.frozen), tok, mask, jax.random.key(seed), SamplingParams.create(1.0))
    comp, cmask = np.asarray(out.tokens), np.asarray(out.mask)

    @jax.jit
    def score(s_params, t_params, tok, mask, comp, cmask):
        s_model, t_model = student.mdef.merge(*s_params), teacher.mdef.merge(t_params)
        ls = jax.nn.log_softmax(s_model.logits(completion_hidden(s_model, tok, mask, comp, cmask, None)), -1)
        lt = jax.nn.log_softmax(t_model.logits(completion_hidden(t_model, tok, mask, comp, cmask, None)), -1)
        return ls, lt

    ls, lt = (np.asarray(x) for x in jax.device_get(score((student.trainable, student.frozen), teacher.trainable,
                                                            tok, mask, jnp.asarray(comp), jnp.asarray(cmask))))
    mark = task.tok.encode(CORRECTION)[0]
    on_ids = [*task.tok.encode(LABELS), *task.tok.encode("#")]
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    stats = {"correct": 0, "truncated": 0, "length": 0, "with_mark": 0, "stopped": 0}
    examples = []
    for i, c in enumerate(problems):
        n_tok = int(cmask[i].sum())
        ids = [int(t) for t in comp[i, :n_tok]]
        stopped = bool(ids) and ids[-1] in stops
        text = task.decode(ids[:-1] if stopped else ids)
        stats["correct"] += int(task.grade(ids, str(c.answer)))
        stats["truncated"] += int(not stopped)
        stats["stopped"] += int(stopped)
        stats["length"] += n_tok
        stats["with_mark"] += int(CORRECTION in text)
        if len(examples) < 8:
            examples.append({"prompt": c.text, "completion": text, "stopped": stopped})
        classes = classify(text, task.mod) + ([("eos_token", {})] if stopped else [])
        for j, (cls, _) in enumerate(classes):
            t = ids[j]
            rec = acc[cls]
            rec["kl"].append(float(ls[i, j, t] - lt[i, j, t]))
            rec["p_s"].append(float(np.exp(ls[i, j, t])))
            rec["p_t"].append(float(np.exp(lt[i, j, t])))
            rec["p_mark_s"].append(float(np.exp(ls[i, j, mark])))
            rec["p_mark_t"].append(float(np.exp(lt[i, j, mark])))
            rec["p_on_s"].append(float(np.exp(ls[i, j, on_ids]).sum()))
            rec["p_on_t"].append(float(np.exp(lt[i, j, on_ids]).sum()))
            rec["logp_mark_t"].append(float(lt[i, j, mark]))
            rec["logp_on_t"].append(float(np.log(np.exp(lt[i, j, on_ids]).sum())))
    total = sum(len(v["kl"]) for v in acc.values())
    classes_out = {}
    for cls in (*CLASSES, "eos_token"):
        if cls not in acc:
            continue
        v = acc[cls]
        classes_out[cls] = {"tokens": len(v["kl"]), "share": len(v["kl"]) / max(1, total),
                            "kl_sum_share": float(np.sum(v["kl"])) / max(1e-9, sum(float(np.sum(a["kl"]))
                                                                                   for a in acc.values())),
                            **{k: float(np.mean(x)) for k, x in v.items()}}
    m = len(problems)
    pooled = [c for c in classes_out if c.startswith("after")]
    return {"classes": classes_out, "shared_choice": shared_choice({c: acc[c] for c in pooled}),
            "rollouts": {"problems": m, "accuracy": stats["correct"] / m, "truncated": stats["truncated"] / m,
                         "mean_length": stats["length"] / m, "with_mark": stats["with_mark"] / m},
            "examples": examples}


def shared_choice(after: dict[str, dict[str, list[float]]]) -> dict:
    """What a student that cannot tell the after-a-digit states apart would write there, if it put one distribution
    over {'!', the way on, anything else} at all of them (pooled over the visits in `after`), for the two directions
    of the KL to the teacher's distributions p_s over those visits:

    - reverse KL, sum_s KL(q || p_s), is minimized by the normalized geometric mean, q(x) ~ exp(mean_s log p_s(x)):
      a token the teacher all but rules out at *some* visited states is driven to 0 everywhere (zero-forcing);
    - forward KL, sum_s KL(p_s || q), by the arithmetic mean q(x) = mean_s p_s(x).

    Returns both q('!') and the student's actual mean P('!') over the same visits."""
    lm = np.concatenate([after[c]["logp_mark_t"] for c in after]) if after else np.zeros(0)
    lo = np.concatenate([after[c]["logp_on_t"] for c in after]) if after else np.zeros(0)
    if lm.size == 0:
        return {}
    rest = np.log(np.clip(1.0 - np.exp(lm) - np.exp(lo), 1e-12, 1.0))
    geo = np.exp([lm.mean(), lo.mean(), rest.mean()])
    return {"visits": int(lm.size), "reverse_kl_q_mark": float(geo[0] / geo.sum()),
            "forward_kl_q_mark": float(np.exp(lm).mean()),
            "student_p_mark": float(np.mean(np.concatenate([after[c]["p_mark_s"] for c in after]))),
            "teacher_p_mark": float(np.exp(lm).mean())}


def format_anatomy(a: dict) -> str:
    """A plain-text table of `token_anatomy`'s classes."""
    r = a["rollouts"]
    lines = [f"rollouts: acc {r['accuracy']:.3f}, truncated {r['truncated']:.3f}, length {r['mean_length']:.1f}, "
             f"with '!' {r['with_mark']:.3f}",
             f"{'class':<18}{'share':>7}{'kl':>8}{'p_s':>7}{'p_t':>7}{'P!s':>7}{'P!t':>7}{'Pon_s':>7}{'Pon_t':>7}"]
    for cls, v in a["classes"].items():
        lines.append(f"{cls:<18}{v['share']:7.3f}{v['kl']:8.2f}{v['p_s']:7.3f}{v['p_t']:7.3f}{v['p_mark_s']:7.3f}"
                     f"{v['p_mark_t']:7.3f}{v['p_on_s']:7.3f}{v['p_on_t']:7.3f}")
    sc = a.get("shared_choice") or {}
    if sc:
        lines.append(f"after a digit ({sc['visits']} visits): student P('!') {sc['student_p_mark']:.3f}; one shared "
                     f"choice would put q('!') = {sc['reverse_kl_q_mark']:.3f} under reverse KL (geometric mean), "
                     f"{sc['forward_kl_q_mark']:.3f} under forward KL (arithmetic mean)")
    return "\n".join(lines)
