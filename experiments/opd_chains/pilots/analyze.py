"""Pilot helper: accuracy, per-step accuracy, first-error kinds and corrections of an eval JSONL of chains."""
import collections
import json

from opd_jax.data.chains import LABELS, apply_op, parse_chain


def walk(text: str, comp: str, mod: int):
    """The first error of a completion: ('copy'|'fact', step) or None; corrections ('!') are skipped over."""
    c = parse_chain(text, mod)
    v, i = c.start, 0
    for k, (op, b) in enumerate(c.ops):
        if comp[i:i + 4] != f"{LABELS[k]}{v}{op}{b}":
            return ("copy", k)
        i += 4
        nv = apply_op(v, op, b, mod)
        while i + 1 < len(comp) and comp[i + 1] == "!":
            i += 2
        if i >= len(comp) or comp[i] != str(nv):
            return ("fact", k)
        v, i = nv, i + 1
    return None


def analyze(path: str, mod: int = 10) -> dict:
    rows = [json.loads(x) for x in open(path)]
    firsts = collections.Counter()
    n = corr = ok = tot = 0
    for r in rows:
        L = len(parse_chain(r["text"], mod).ops)
        for comp in r["completions"]:
            n += 1
            corr += "!" in comp
            e = walk(r["text"], comp, mod)
            if e:
                firsts[e[0]] += 1
                ok, tot = ok + e[1], tot + e[1] + 1
            else:
                ok, tot = ok + L, tot + L
    acc = sum(r["correct"] for r in rows) / sum(r["k"] for r in rows)
    return {"n": n, "acc": round(acc, 3), "with_correction": corr, "first_err": dict(firsts),
            "step_acc": round(ok / max(tot, 1), 4)}
