"""`opd-jax visualize`: a student completion as HTML, each token colored by its reverse KL against the teacher.

Works for any model pair and prompt: the student samples one completion (greedy unless `sampling.temperature`
> 0 is asked for via `--sample`), the teacher scores exactly those tokens, and every token gets
- the sampled estimate `log p_s(x_t) - log p_t(x_t)` (what the OPD advantage uses), and
- the exact full-vocabulary reverse KL `KL(p_s || p_t)` at that position (the color),
with the teacher's preferred token in the hover text, so a reader can see where a wrong solution forks.
"""

from __future__ import annotations

import html
import os

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import losses
from opd_jax.checkpoint import load_run_model
from opd_jax.config import ExperimentConfig, load_config
from opd_jax.data import build_task
from opd_jax.data.task import pad_prompts, resolve_stop_tokens
from opd_jax.mesh import make_mesh
from opd_jax.sampling import SamplingParams, make_sampler
from opd_jax.step import completion_hidden
from opd_jax.train_state import load_model


def token_kl(cfg: ExperimentConfig, prompt_text: str | None = None, *, greedy: bool = True, seed: int = 0) -> dict:
    """Sample one student completion and score it per token against the first teacher."""
    mesh = make_mesh(cfg.mesh)
    task = build_task(cfg)
    stops = resolve_stop_tokens(cfg.sampling.stop_token_ids, task)
    student, _ = load_run_model(cfg.student, cfg.run_dir, seed=cfg.seed, mesh=mesh, lora=cfg.lora)
    if not cfg.teachers:
        raise ValueError("visualize: the config has no teacher (teachers: [...])")
    teacher = load_model(cfg.teachers[0].model, seed=cfg.seed + 1, mesh=mesh)
    if prompt_text is None:
        problem = task.eval_problems()[0]
        answer, text = problem.answer, problem.text
    else:
        answer, text = None, prompt_text
    s_prompt, t_prompt = encode_prompt(task, text)
    pad = dict(truncate=cfg.sampling.truncate_prompts, pad_id=task.pad_id)
    tok, mask, _ = pad_prompts([s_prompt], cfg.sampling.max_prompt_len, **pad)
    t_tok, t_mask, _ = pad_prompts([t_prompt], cfg.sampling.max_prompt_len, **pad)
    sp = SamplingParams.create(cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.top_p, greedy=greedy)

    draw = make_sampler(student.mdef, max_new_tokens=cfg.sampling.max_new_tokens, stop_token_ids=stops,
                        pad_id=task.pad_id)
    out = draw((student.trainable, student.frozen), tok, mask, jax.random.key(seed), sp)
    n = int(out.lengths[0])
    comp, cmask = out.tokens[:, :n], out.mask[:, :n]

    @jax.jit
    def score(s_params, t_params, tok, mask, t_tok, t_mask, comp, cmask):
        s_model = student.mdef.merge(*s_params)
        t_model = teacher.mdef.merge(t_params)
        hs = completion_hidden(s_model, tok, mask, comp, cmask, None)
        ht = completion_hidden(t_model, t_tok, t_mask, comp, cmask, None)  # the teacher's own template

        def chunk(a, b, y):
            sl, tl = s_model.logits(a), t_model.logits(b)
            return {"lps": losses.token_logprobs(sl, y), "lpt": losses.token_logprobs(tl, y),
                    "rkl": losses.reverse_kl(sl, tl), "t_top": jnp.argmax(tl, -1).astype(jnp.float32)}

        return losses.chunked_map(chunk, cfg.loss.logprob_chunk, hs, ht, comp)

    r = jax.device_get(score((student.trainable, student.frozen), teacher.trainable, tok, mask, t_tok, t_mask,
                             comp, cmask))
    ids = [int(t) for t in np.asarray(comp[0])]
    return {
        "prompt": text, "answer": answer, "tokens": ids, "pieces": [token_piece(task, t) for t in ids],
        "completion": task.decode(ids), "correct": task.grade(ids, answer) if answer is not None else None,
        "sampled_kl": (r["lps"][0] - r["lpt"][0]).tolist(), "reverse_kl": r["rkl"][0].tolist(),
        "logp_student": r["lps"][0].tolist(), "logp_teacher": r["lpt"][0].tolist(),
        "teacher_top": [token_piece(task, t) for t in r["t_top"][0]],
    }


def token_piece(task, token_id: int) -> str:
    """How one token shows: its text, else `<id N>` (a special token, or an id the tokenizer has no text for, as a
    random-init student samples past a small task vocabulary): never an empty string."""
    return task.decode([int(token_id)]) or f"<id {int(token_id)}>"


def encode_prompt(task, text: str) -> tuple[list[int], list[int]]:
    """(student prompt, teacher prompt) for a user message; text tasks render each with its own template."""
    if hasattr(task, "renderer"):
        messages = [{"role": "user", "content": text}]
        t_renderer = task.teacher_renderers[0] if task.teacher_renderers else task.renderer
        return task.renderer.build_prompt(messages), t_renderer.build_prompt(messages)
    p = task.prompt_tokens_from_text(text)
    return p, p


def render_html(r: dict, title: str = "per-token reverse KL, student vs teacher") -> str:
    vmax = max(1e-6, float(np.percentile(r["reverse_kl"], 95)) if r["reverse_kl"] else 1.0)
    spans = []
    for piece, rkl, skl, lps, lpt, top in zip(r["pieces"], r["reverse_kl"], r["sampled_kl"], r["logp_student"],
                                              r["logp_teacher"], r["teacher_top"], strict=True):
        a = min(1.0, max(0.0, rkl / vmax))
        tip = (f"token {piece!r}\nKL(student||teacher) = {rkl:.3f}\nlog p_s - log p_t = {skl:.3f}\n"
               f"log p_s = {lps:.3f}, log p_t = {lpt:.3f}\nteacher's top token: {top!r}")
        shown = html.escape(piece).replace("\n", "↵<br>") or "&nbsp;"
        spans.append(f'<span class="tok" style="background: rgba(220, 38, 38, {a:.3f})" '
                     f'title="{html.escape(tip)}">{shown}</span>')
    verdict = "" if r["correct"] is None else ("correct" if r["correct"] else "wrong")
    mean_kl = float(np.mean(r["reverse_kl"])) if r["reverse_kl"] else 0.0
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:ui-monospace,Menlo,monospace;max-width:60em;margin:2em auto;line-height:1.9}}
.tok{{padding:2px 1px;border-radius:3px;white-space:pre-wrap}} .meta{{color:#555;font-family:sans-serif}}
.legend span{{display:inline-block;width:2em;height:1em}}</style></head><body>
<h2 class="meta">{html.escape(title)}</h2>
<p class="meta">prompt: <b>{html.escape(str(r['prompt']))}</b> &nbsp; gold: <b>{html.escape(str(r['answer']))}</b>
&nbsp; {verdict} &nbsp; mean reverse KL/token: {mean_kl:.3f} &nbsp; hover a token for its values</p>
<div class="legend meta">0 <span style="background:rgba(220,38,38,0.05)"></span>
<span style="background:rgba(220,38,38,0.5)"></span><span style="background:rgba(220,38,38,1)"></span>
&ge; {vmax:.2f} nats</div><p>{''.join(spans)}</p></body></html>"""


def visualize_main(args) -> int:
    cfg = load_config(args.config, list(args.overrides))
    r = token_kl(cfg, args.prompt)
    out = args.out or os.path.join(cfg.run_dir, "kl.html")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(render_html(r))
    worst = int(np.argmax(r["reverse_kl"])) if r["reverse_kl"] else 0
    print(f"completion: {r['completion']!r}  ({'correct' if r['correct'] else 'wrong'})" if r["correct"] is not None
          else f"completion: {r['completion']!r}")
    if r["reverse_kl"]:
        print(f"highest reverse KL at token {worst} ({r['pieces'][worst]!r}): {r['reverse_kl'][worst]:.3f} nats; "
              f"teacher preferred {r['teacher_top'][worst]!r}")
    print(f"wrote {out}")
    return 0
