"""The miniature's task (`opd_jax.data.chains`): format, slips with masked wrong digits, grading (host and in
JAX), the hash-defined split, and the task plumbing (`synthetic:chains` sources, resume)."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest

from opd_jax.data import chains
from opd_jax.data.chains import EOS, Chain, ChainsTask, parse_chain, parse_source, split_of


def test_solution_format_and_values():
    c = Chain(3, (("+", 4), ("*", 2), ("-", 6), ("+", 5)), mod=7)
    assert c.text == "3a+4b*2c-6d+5"
    assert c.values == [0, 0, 1, 6]  # 3+4=7->0, 0*2=0, 0-6=-6->1, 1+5=6
    assert c.solution == "a3+40b0*20c0-61d1+56#6"
    assert parse_chain(c.text, 7) == c


def test_slips_mask_only_the_wrong_digits():
    c = Chain(3, (("+", 4), ("*", 2), ("-", 6), ("+", 5)), mod=7)
    text, mask = c.solution_with_slips(random.Random(0), 0.9)
    assert len(text) == len(mask) and "!" in text
    # every wrong digit is masked and followed by '!', every taught digit after a step is right
    for i, ch in enumerate(text):
        if mask[i] == 0:
            assert ch.isdigit() and text[i + 1] == "!"
    # removing the masked slips and their markers gives back the clean solution
    clean = "".join(ch for i, ch in enumerate(text) if mask[i] and not (ch == "!" and mask[i - 1] == 0))
    assert clean == c.solution
    assert c.solution_with_slips(random.Random(0), 0.0) == (c.solution, [1] * len(c.solution))


def test_grade_host_and_in_jax_agree():
    import jax.numpy as jnp

    task = ChainsTask(seed=0, mod=7, min_len=4, max_len=6)
    c = task.problem(0)
    tok = task.tok
    good = tok.encode(c.solution) + [EOS]
    s = c.solution  # "a<prev><op><operand><result>...": slip on step a's result (index 4), then its correction
    fixed = tok.encode(s[:4] + str((int(s[4]) + 1) % 7) + "!" + s[4:]) + [EOS]
    wrong_answer = tok.encode(c.solution[:-1] + str((c.answer + 1) % 7)) + [EOS]
    no_stop = tok.encode(c.solution)
    cases = [(good, True), (fixed, True), (wrong_answer, False), (no_stop, False)]
    for comp, want in cases:
        assert task.grade(comp, str(c.answer)) is want
    N = 48
    toks = np.zeros((len(cases), N), np.int32)
    mask = np.zeros((len(cases), N), bool)
    for i, (comp, _) in enumerate(cases):
        toks[i, : len(comp)], mask[i, : len(comp)] = comp, True
    ans = np.full((len(cases), task.answer_len), -1, np.int32)
    ans[:, 0] = tok.encode(str(c.answer))[0]
    r = np.asarray(task.reward_fn(jnp.asarray(toks), jnp.asarray(mask), jnp.asarray(ans)))
    assert r.tolist() == [1.0 if w else 0.0 for _, w in cases]


def test_split_is_a_fixed_hash_with_the_documented_shares():
    rng = random.Random(1)
    texts = [chains.random_chain(rng, 4, 6, 7).text for _ in range(20_000)]
    counts = collections.Counter(split_of(t) for t in texts)
    assert 0.04 < counts["test"] / 20_000 < 0.06 and 0.04 < counts["val"] / 20_000 < 0.06
    assert [split_of(t) for t in texts[:50]] == [split_of(t) for t in texts[:50]]
    assert split_of("3a+4b*2c-6d+5") == split_of("3a+4b*2c-6d+5")


def test_eval_problems_are_distinct_held_out_and_seed_independent():
    a = ChainsTask(seed=0, mod=7, min_len=4, max_len=6, num_test=200, num_val=100, eval_split="val+test")
    b = ChainsTask(seed=5, mod=7, min_len=4, max_len=6, num_test=200, num_val=100, eval_split="val+test")
    pa = a.eval_problems()
    assert len(pa) == 300 and len({p.text for p in pa}) == 300
    assert [p.text for p in pa] == [p.text for p in b.eval_problems()]
    assert [split_of(p.text) for p in pa] == ["val"] * 100 + ["test"] * 200
    for p in pa[:20]:
        c = parse_chain(p.text, 7)
        assert p.answer == str(c.answer) and p.prompt == a.prompt_tokens(c)


def test_train_stream_is_resumable_and_process_sliced():
    t = ChainsTask(seed=3, mod=7)
    first = t.next_prompts(6)
    state = t.state()
    nxt = t.next_prompts(4)
    t2 = ChainsTask(seed=3, mod=7)
    t2.restore(state)
    assert t2.next_prompts(4).student == nxt.student
    p0 = ChainsTask(seed=3, mod=7, process_index=0, process_count=2)
    p1 = ChainsTask(seed=3, mod=7, process_index=1, process_count=2)
    assert p0.next_prompts(3).student + p1.next_prompts(3).student == first.student


def test_single_prompt_stream_repeats_one_train_problem():
    t = ChainsTask(seed=0, mod=7, single=1)
    rows = t.next_prompts(5).student
    assert all(r == rows[0] for r in rows)
    assert split_of(t.problem(123).text) == "train"


def test_single_prompts_are_distinct_use_every_operation_and_do_not_depend_on_the_seed():
    """Issue #22: the three single-prompt "seeds" had all trained `6a-1b-5c-4d-4e-5` (only '-')."""
    prompts = [ChainsTask(seed=seed, min_len=4, max_len=6, mod=7, single=n).problem(0) for seed, n in
               ((0, 1), (1, 2), (2, 3), (7, 4), (9, 5))]
    texts = [c.text for c in prompts]
    assert len(set(texts)) == 5, texts
    assert all({op for op, _ in c.ops} == set("+-*") and split_of(c.text) == "train" for c in prompts), texts
    assert ChainsTask(seed=5, min_len=4, max_len=6, mod=7, single=2).problem(9).text == texts[1]
    assert ChainsTask(seed=0, min_len=1, max_len=3, mod=7, ops="+*", single=1).problem(0).ops  # short chains too
    with pytest.raises(ValueError, match="single"):
        ChainsTask(seed=0, single=-1)


def test_sources_parse_into_the_task():
    kw = parse_source("synthetic:chains:4:6:mod=7:slips=0.15:single=1:test=64:val=32:ops=pt")
    assert kw == {"min_len": 4, "max_len": 6, "mod": 7, "slips": 0.15, "single": 1, "num_test": 64,
                  "num_val": 32, "ops": "+*"}
    with pytest.raises(ValueError, match="unknown chains option"):
        parse_source("synthetic:chains:4:6:color=3")
    from opd_jax.data import build_task
    from opd_jax.miniature.setup import base_config

    cfg = base_config(["data.source=synthetic:chains:4:6:mod=7:slips=0.15:test=64:val=32", "eval.split=val"])
    task = build_task(cfg)
    assert isinstance(task, ChainsTask) and task.slips == 0.15 and task.mod == 7
    assert len(task.eval_problems()) == 32 and {split_of(p.text) for p in task.eval_problems()} == {"val"}


def test_episode_length_dial_reaches_16_steps_without_moving_earlier_token_ids():
    """Issue #22: chain length is the dial for uncertain tokens per episode. Labels k-p are appended to the
    vocabulary, so every id the shipped teacher and student were trained on stays where it was."""
    from opd_jax.data.chains import VOCAB, VOCAB_SIZE, ChainTokenizer

    assert VOCAB[:33] == ["<pad>", "<bos>", "<eos>", *"0123456789+-*()=;#@!abcdefghij"]
    assert len(VOCAB) <= VOCAB_SIZE == 40
    t = ChainsTask(seed=0, min_len=16, max_len=16, mod=7)
    tok = ChainTokenizer()
    for i in range(20):
        c = t.problem(i)
        assert len(c.ops) == 16 and c.text[-3] == "p"
        assert parse_chain(c.text, 7) == c
        assert tok.decode(tok.encode(c.solution)) == c.solution
    with pytest.raises(ValueError, match="max_len <= 16"):
        ChainsTask(seed=0, min_len=4, max_len=17)
    kw = parse_source("synthetic:chains:16:mod=7")
    assert kw["min_len"] == kw["max_len"] == 16


def test_steps_reward_has_no_lucky_guess_floor():
    """`reward=steps` (issue #22): the in-program reward and the eval's grade are 1 only when every step's result
    and the final answer are right in the reference layout; a wrong intermediate result with the right final answer
    (a lucky guess under the answer reward) gets 0, so does an extra token; a wrong label is not graded. The
    default reward still grades the final answer."""
    import jax.numpy as jnp
    import numpy as np

    from opd_jax.data.chains import EOS, ChainsTask, steps_reward

    t = ChainsTask(seed=0, min_len=4, max_len=6, mod=7, reward="steps")
    rows = t.next_prompts(4)
    probs = [t.problem(t.position - 4 + i) for i in range(4)]  # the rows just handed out
    sols = [p.solution for p in probs]
    assert [a[-1] for a in rows.answers] == [s[-1] for s in sols] and rows.answers[0][:4] == "????"
    toks, mask = np.zeros((4, 48), np.int32), np.zeros((4, 48), bool)
    comps = []
    for i, sol in enumerate(sols):
        c = [*t.tok.encode(sol), EOS]
        if i == 1:  # the first step's result wrong, the final answer kept: right under the answer reward
            c[4] = t.tok.encode(str((int(sol[4]) + 1) % 7))[0]
        if i == 2:
            c = [*c[:-1], t.tok.encode("1")[0], EOS]
        if i == 3:  # a wrong label: not graded
            c[5] = t.tok.encode("p")[0]
        toks[i, : len(c)], mask[i, : len(c)] = c, True
        comps.append(c)
    packed = t.pack(rows, 24, truncate=False)
    r = np.asarray(steps_reward(jnp.asarray(toks), jnp.asarray(mask), jnp.asarray(packed["answer"])))
    assert r.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert [t.grade(c, a) for c, a in zip(comps, rows.answers, strict=True)] == [True, False, False, True]
    plain = ChainsTask(seed=0, min_len=4, max_len=6, mod=7)
    assert plain.grade(comps[1], sols[1][-1])  # the lucky guess counts under the answer reward
    assert t.eval_problems()[0].answer[-2:] == f"#{t.held_out('test')[0].answer}"
    with pytest.raises(ValueError, match="reward must be"):
        ChainsTask(seed=0, reward="scratchpad")
