"""Measurements of the miniature: held-out accuracy with confidence intervals (greedy and T=1), and the per-token
reverse KL of a student against the teacher on its own samples of held-out problems.

Accuracy runs through `opd_jax.eval.run.run_eval` (the config's student: its `hf_path`, or the latest checkpoint of
its `run_dir`), which writes the per-problem JSONL the reports read. The KL re-scores those same completions with
both models (one forward each; no sampling).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence

import numpy as np

from opd_jax.config import ExperimentConfig, ModelConfig

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (`correct` of `n`)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = correct / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): normal 95% interval of a mean over `values` (e.g. seeds); (m, m, m) for one value."""
    x = np.asarray(values, float)
    m = float(x.mean()) if len(x) else float("nan")
    if len(x) < 2:
        return (m, m, m)
    # Student t quantile for small samples (n-1 degrees of freedom), from a short table; z beyond it
    t = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}.get(len(x) - 1, z)
    half = t * float(x.std(ddof=1)) / math.sqrt(len(x))
    return (m, m - half, m + half)


def accuracy_of_rows(rows: Sequence[dict]) -> dict:
    """Accuracy of eval rows (one per problem, `correct` of `k` samples) with its 95% interval over problems:
    Wilson for one sample per problem, a normal interval of the per-problem mean otherwise."""
    n = len(rows)
    if n == 0:
        return {"accuracy": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "problems": 0, "k": 0}
    k = int(rows[0].get("k", 1))
    per = np.asarray([r["correct"] / r["k"] for r in rows], float)
    acc = float(per.mean())
    if k == 1:
        lo, hi = wilson(int(round(per.sum())), n)
    else:
        half = Z95 * float(per.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
        lo, hi = max(0.0, acc - half), min(1.0, acc + half)
    return {"accuracy": acc, "ci_low": lo, "ci_high": hi, "problems": n, "k": k}


def eval_config(cfg: ExperimentConfig, *, temperature: float, split: str, k: int = 1,
                run_dir: str | None = None, hf_path: str | None = None) -> ExperimentConfig:
    """`cfg` set to grade its student on `split` ('test', 'val' or 'val+test') at `temperature` (0 = greedy)."""
    c = copy.deepcopy(cfg)
    c.eval.temperature, c.eval.split, c.eval.k, c.eval.num_problems = temperature, split, k, 0
    c.eval.top_p, c.eval.top_k = 1.0, 0
    if run_dir is not None:
        c.run_dir = run_dir
    if hf_path is not None:
        c.student.hf_path = hf_path
    return c


def grade(cfg: ExperimentConfig, *, temperature: float, split: str = "test", k: int = 1, name: str,
          run_dir: str | None = None, hf_path: str | None = None) -> tuple[dict, list[dict]]:
    """Accuracy (with its interval) of the config's student on the held-out `split`: (summary, per-problem rows).
    The rows are also written to `<run_dir>/eval/<name>.jsonl`."""
    from opd_jax.eval.run import run_eval

    c = eval_config(cfg, temperature=temperature, split=split, k=k, run_dir=run_dir, hf_path=hf_path)
    result, _ = run_eval(c, out_name=name)
    if result is None:
        raise ValueError(f"{cfg.data.source}: no eval problems")
    return accuracy_of_rows(result.rows), result.rows


def heldout_kl(cfg: ExperimentConfig, rows: Sequence[dict], *, run_dir: str | None = None,
               hf_path: str | None = None, batch: int = 64) -> dict:
    """Per-token reverse KL of the config's student against its first teacher, on the student's own completions
    in `rows` (eval rows of held-out problems, e.g. from `grade(..., temperature=1)`):

    - `kl_sampled`: mean over completion tokens of log p_student(x_t) - log p_teacher(x_t), the estimate the OPD
      loss uses (its `teacher_kl` metric), on held-out prompts instead of training prompts;
    - `kl_exact`: mean over the same positions of the full-vocabulary KL(p_student || p_teacher).

    Completions are re-encoded from their text; a completion that did not stop (truncated) gets no stop token."""
    import jax
    import jax.numpy as jnp

    from opd_jax import losses
    from opd_jax.checkpoint import load_run_model
    from opd_jax.data import build_task
    from opd_jax.mesh import make_mesh
    from opd_jax.step import completion_hidden
    from opd_jax.train_state import load_model

    c = copy.deepcopy(cfg)
    if run_dir is not None:
        c.run_dir = run_dir
    if hf_path is not None:
        c.student.hf_path = hf_path
    mesh = make_mesh(c.mesh)
    task = build_task(c)
    ckpt_dir = c.run_dir if run_dir is not None else None
    student, _ = load_run_model(c.student, ckpt_dir, seed=c.seed, mesh=mesh, lora=c.lora)
    teacher = load_model(c.teachers[0].model, seed=c.seed + 1, mesh=mesh)
    P, N = c.sampling.max_prompt_len, c.eval.max_new_tokens
    prompts, comps = [], []
    text_to_prompt = {p.text: p.prompt for p in task.eval_problems()}
    for r in rows:
        for text in r["completions"]:
            ids = task.tok.encode(text)
            if len(ids) < N and int(r.get("truncated", 0)) == 0:
                ids = ids + list(task.stop_token_ids)
            prompts.append(text_to_prompt[r["text"]])
            comps.append(ids[:N])
    if not prompts:
        return {"kl_sampled": float("nan"), "kl_exact": float("nan"), "tokens": 0}

    @jax.jit
    def score(s_params, t_params, tok, mask, comp, cmask):
        s_model = student.mdef.merge(*s_params)
        t_model = teacher.mdef.merge(t_params)
        hs = completion_hidden(s_model, tok, mask, comp, cmask, None)
        ht = completion_hidden(t_model, tok, mask, comp, cmask, None)
        sl, tl = s_model.logits(hs), t_model.logits(ht)
        w = cmask.astype(jnp.float32)
        sampled = (losses.token_logprobs(sl, comp) - losses.token_logprobs(tl, comp)) * w
        exact = losses.reverse_kl(sl, tl) * w
        return jnp.sum(sampled), jnp.sum(exact), jnp.sum(w)

    tot = np.zeros(3)
    for start in range(0, len(prompts), batch):
        chunk_p = prompts[start: start + batch]
        chunk_c = comps[start: start + batch]
        n_real = len(chunk_p)
        chunk_p += [chunk_p[-1]] * (batch - n_real)
        chunk_c += [[]] * (batch - n_real)
        tok = np.zeros((batch, P), np.int32)
        mask = np.zeros((batch, P), bool)
        comp = np.zeros((batch, N), np.int32)
        cmask = np.zeros((batch, N), bool)
        for i, (p, q) in enumerate(zip(chunk_p, chunk_c, strict=True)):
            tok[i, P - len(p):], mask[i, P - len(p):] = p, True
            comp[i, : len(q)], cmask[i, : len(q)] = q, True
        out = score((student.trainable, student.frozen), teacher.trainable, tok, mask, comp, cmask)
        tot += np.asarray(jax.device_get(out), float)
    return {"kl_sampled": float(tot[0] / max(tot[2], 1)), "kl_exact": float(tot[1] / max(tot[2], 1)),
            "tokens": int(tot[2])}


def correction_probe(cfg: ExperimentConfig, model_cfg: ModelConfig, *, split: str = "test", n: int = 256, seed: int = 0,
                     run_dir: str | None = None) -> dict:
    """How a model continues from a slip it did not make, by forward passes on teacher-forced scratchpads of held-out
    problems: each problem's reference solution is cut right after one step's result, and that result is replaced by
    a wrong digit (`slip`) or kept (`clean`). The model: `model_cfg` (its `hf_path`), with the latest checkpoint of
    `run_dir` when given. Reports, over `n` problems, the mean probability of the correction
    marker '!' next and how often it is the most likely token, for both prefixes, and the probability of the right
    digit after a '!' that follows the slip."""
    import random

    import jax
    import jax.numpy as jnp

    from opd_jax.checkpoint import load_run_model
    from opd_jax.data import build_task
    from opd_jax.data.chains import BOS, CORRECTION, LABELS, ChainsTask
    from opd_jax.mesh import make_mesh

    task = build_task(cfg)
    if not isinstance(task, ChainsTask):
        raise ValueError("correction_probe needs a synthetic:chains task")
    model, _ = load_run_model(model_cfg, run_dir, seed=0, mesh=make_mesh(cfg.mesh))
    rng = random.Random(seed)
    mark = task.tok.encode(CORRECTION)[0]
    seqs, kinds, want = [], [], []
    for c in task.held_out(split)[:n]:
        k = rng.randrange(len(c.ops))
        sol = c.solution
        cut = sol.index(LABELS[k]) + 5  # through step k's result
        right = sol[cut - 1]
        wrong = str(rng.choice([d for d in range(c.mod) if str(d) != right]))
        base = [BOS, *task.tok.encode(c.text + "=")]
        seqs.append(base + task.tok.encode(sol[: cut - 1] + wrong))
        kinds.append("slip")
        want.append(-1)
        seqs.append(base + task.tok.encode(sol[:cut]))
        kinds.append("clean")
        want.append(-1)
        seqs.append(base + task.tok.encode(sol[: cut - 1] + wrong + CORRECTION))
        kinds.append("after_mark")
        want.append(task.tok.encode(right)[0])
    L = max(len(x) for x in seqs)
    tok = np.zeros((len(seqs), L), np.int32)
    mask = np.zeros((len(seqs), L), bool)
    for i, x in enumerate(seqs):  # left-padded: the last position is the one that predicts the next token
        tok[i, L - len(x):], mask[i, L - len(x):] = x, True

    @jax.jit
    def last_logprobs(params, tok, mask):
        from opd_jax.models.qwen3 import positions_from_mask

        m = model.mdef.merge(*params)
        h, _ = m(tok, positions_from_mask(mask), mask)
        return jax.nn.log_softmax(m.logits(h[:, -1]).astype(jnp.float32), axis=-1)

    lp = np.asarray(jax.device_get(last_logprobs((model.trainable, model.frozen), tok, mask)))
    out: dict = {"problems": min(n, len(task.held_out(split)))}
    for kind in ("slip", "clean"):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        out[f"p_mark_{kind}"] = float(np.mean(np.exp(lp[rows, mark])))
        out[f"argmax_mark_{kind}"] = float(np.mean(lp[rows].argmax(-1) == mark))
    rows = [i for i, k in enumerate(kinds) if k == "after_mark"]
    out["p_right_after_mark"] = float(np.mean([np.exp(lp[i, want[i]]) for i in rows]))
    return out


def summarize_eval(rows: Sequence[dict]) -> dict:
    """Accuracy with its interval, plus the share of completions that contain a correction marker ('!')."""
    out = accuracy_of_rows(rows)
    comps = [c for r in rows for c in r["completions"]]
    out["with_correction"] = sum("!" in c for c in comps) / max(1, len(comps))
    return out


def write_rows_dir(path: str) -> None:
    os.makedirs(path, exist_ok=True)
