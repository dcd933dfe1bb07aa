"""Chains of small modular steps with a written scratchpad: the task of the OPD miniature (`synthetic:chains`).

    prompt      "<bos>3a+4b*2c-7d+5="
    completion  "a3+47b7*24c4-77d7+52#2<eos>"   (mod 10: a: 3+4=7, b: 7*2=14->4, c: 4-7=-3->7, d: 7+5=12->2)

Each step applies one operation (`+`, `-`, `*`, operand 1..mod-1) to the running value modulo `mod`: the fact table
has `mod * (mod-1) * 3` entries (270 for mod 10), small enough for a tiny model to hold all of them, while a wrong
step anywhere in a chain of 1-16 steps makes the final answer wrong (errors compound): the chain length is the
dial for the number of uncertain tokens per episode (one result digit per step). Steps are labelled `a`, `b`,
... in the prompt. Each scratchpad step is `<label><previous value><op><operand><result>`: the previous value is
copied from just before the label, the operation and operand from the prompt by a content lookup of the label (not
by counting), so each result depends only on the three tokens right before it.

Slips and marked corrections. With `slips=p`, each reference step is written with a wrong result with
probability p, followed by the correction marker `!` and the right result: `b7*25!4`. The wrong digit has loss 0 in
`sft_examples` (the model is never taught to slip), while the `!` and the right digit are taught, so a model
trained on these rows does not slip but knows how to continue from a slip it did not make: a state that only the
student's own samples reach.

Held-out splits. Every problem belongs to one split by a hash of its text (`split_of`): 5% test, 5% validation,
the rest train. Training streams (`next_prompts`, `sft_examples`) draw problems from their own per-row RNG and
re-draw until the problem is a train problem, and assert it; the eval problems are distinct test (or validation)
problems. So no eval problem can occur in any training stream, whatever seed or position a stream starts from.

Source grammar: `synthetic:chains[:min_len[:max_len]][:key=value...]` with keys `mod` (10), `slips` (0.0),
`single` (0: off; N >= 1: every training row is single prompt N, a fixed train problem that uses every
operation, for single-prompt OPD; prompts 1, 2, 3, ... are distinct, whatever the seed), `test` (512) and `val` (256):
the number of distinct test / validation problems, and `reward`: `answer` (default: the final answer after the last
'#' is right; a guess is right with probability 1/mod) or `steps` (the completion has the reference layout and every
step's result and the final answer are right: no lucky-guess floor, issue #22; the labels, copied values and
operands are not graded, so the reward measures the arithmetic, not the copying). The reward also sets what counts
as correct in the eval. `eval.split` picks the eval problems: `test` (default), `val`, or
`val+test` (keep `eval.num_problems: 0`, which grades all of them).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import jax

from opd_jax.config.schema import ExperimentConfig
from opd_jax.data.synthetic import CHARS as ARITHMETIC_CHARS
from opd_jax.data.synthetic import CharTokenizer, GeneratedTask, check_one_stream
from opd_jax.data.synthetic import exact_match_reward as arithmetic_reward
from opd_jax.data.task import EvalProblem, PromptRows

# The arithmetic task's vocabulary (opd_jax.data.synthetic) plus the correction marker: digits, '#', '=' and the
# special tokens keep their ids, so `opd_jax.data.synthetic.exact_match_reward` grades chains inside the program.
PAD, BOS, EOS = 0, 1, 2
CHARS = ARITHMETIC_CHARS + "!abcdefghijklmnop"  # labels k-p appended last: earlier ids unchanged
VOCAB = ["<pad>", "<bos>", "<eos>", *CHARS]
VOCAB_SIZE = 40  # room to spare, a multiple of 8
LABELS = "abcdefghijklmnop"  # step labels: chains have at most 16 steps (the episode-length dial, issue #22)
_ID = {c: i for i, c in enumerate(VOCAB)}
CORRECTION = "!"
OPS = "+-*"
SPLITS = ("train", "val", "test")
SPLIT_BUCKETS = 1000
TEST_BUCKETS, VAL_BUCKETS = 50, 50  # buckets [0, 50) are test, [50, 100) validation, the rest train


class ChainTokenizer(CharTokenizer):
    """Characters of `CHARS` <-> ids; `decode` drops the special tokens."""

    vocab_size = VOCAB_SIZE
    chars, task_name = CHARS, "chains"


def split_of(text: str) -> str:
    """'train', 'val' or 'test' for a problem's text (the prompt without '<bos>' and '='), by a fixed hash."""
    bucket = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") % SPLIT_BUCKETS
    if bucket < TEST_BUCKETS:
        return "test"
    return "val" if bucket < TEST_BUCKETS + VAL_BUCKETS else "train"


def apply_op(value: int, op: str, b: int, mod: int) -> int:
    return {"+": value + b, "-": value - b, "*": value * b}[op] % mod


@dataclass(frozen=True)
class Chain:
    start: int
    ops: tuple[tuple[str, int], ...]
    mod: int = 10

    @property
    def text(self) -> str:
        return str(self.start) + "".join(f"{LABELS[i]}{op}{b}" for i, (op, b) in enumerate(self.ops))

    @property
    def values(self) -> list[int]:
        """The running value after each step."""
        out, v = [], self.start
        for op, b in self.ops:
            v = apply_op(v, op, b, self.mod)
            out.append(v)
        return out

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def solution(self) -> str:
        prev = [self.start, *self.values[:-1]]
        return "".join(f"{LABELS[i]}{u}{op}{b}{v}" for i, (u, (op, b), v) in enumerate(zip(prev, self.ops, self.values,
                                                                                          strict=True))) + \
            f"#{self.answer}"

    def solution_with_slips(self, rng: random.Random, slips: float) -> tuple[str, list[int]]:
        """The scratchpad with slips: each result is first written wrong with probability `slips` (again after a
        correction, with the same probability), then `!` and the right value. Returns (text, loss mask per
        character): 0 on the wrong digits, 1 everywhere else."""
        text, mask = [], []
        prev = [self.start, *self.values[:-1]]
        for i, (u, (op, b), v) in enumerate(zip(prev, self.ops, self.values, strict=True)):
            for ch in f"{LABELS[i]}{u}{op}{b}":
                text.append(ch)
                mask.append(1)
            while slips > 0 and rng.random() < slips:
                wrong = rng.choice([d for d in range(self.mod) if d != v])
                text += [str(wrong), CORRECTION]
                mask += [0, 1]
            text.append(str(v))
            mask.append(1)
        for ch in f"#{self.answer}":
            text.append(ch)
            mask.append(1)
        return "".join(text), mask


def parse_chain(text: str, mod: int = 10) -> Chain:
    """The inverse of `Chain.text` (digits only, so `mod` <= 10)."""
    ops = tuple((text[i + 1], int(text[i + 2])) for i in range(1, len(text), 3))
    return Chain(int(text[0]), ops, mod)


def random_chain(rng: random.Random, min_len: int, max_len: int, mod: int, ops: str = OPS) -> Chain:
    n = rng.randint(min_len, max_len)
    return Chain(rng.randrange(mod), tuple((rng.choice(ops), rng.randint(1, mod - 1)) for _ in range(n)), mod)


def draw_in_split(rng: random.Random, split: str, min_len: int, max_len: int, mod: int, ops: str = OPS,
                  max_tries: int = 100_000) -> Chain:
    """Draw chains from `rng` until one belongs to `split`."""
    for _ in range(max_tries):
        c = random_chain(rng, min_len, max_len, mod, ops)
        if split_of(c.text) == split:
            return c
    raise RuntimeError(f"no {split} problem in {max_tries} draws (min_len={min_len}, max_len={max_len}, mod={mod})")


def exact_match_reward(tokens: jax.Array, mask: jax.Array, answer: jax.Array) -> jax.Array:
    """1.0 where the completion ends in '#<answer><eos>' (in JAX, traced into the RL step): the arithmetic task's
    reward, valid here because the two vocabularies share the ids of digits, '#' and '<eos>'."""
    return arithmetic_reward(tokens, mask, answer)


UNGRADED = "?"  # a position of a `reward=steps` answer that is not graded (labels, copied values, operands)


def steps_answer(c: Chain) -> str:
    """The reference solution of `c` with every position but the step results and the final '#d' ungraded: e.g.
    `a3+40b0*20c0-61#1` -> `????0????0????1#1`."""
    sol = c.solution
    body = len(c.ops) * 5
    return "".join(ch if i % 5 == 4 or i >= body else UNGRADED for i, ch in enumerate(sol))


def steps_reward(tokens: jax.Array, mask: jax.Array, answer: jax.Array) -> jax.Array:
    """1.0 where the completion has the reference layout (exactly as many tokens, then '<eos>') and every graded
    token of `answer` (each step's result, '#' and the final answer) is right, else 0 (in JAX, traced into the RL
    step): no credit for a right final answer after a wrong step, so no lucky-guess floor.

    tokens, mask: [B, N] int32 / bool (the completion); answer: [B, A] int32, the reference solution's token ids,
    -2 at ungraded positions, padded with -1. Returns [B] float32."""
    import jax.numpy as jnp

    n = min(tokens.shape[1], answer.shape[1])
    n_ans = jnp.sum(answer != -1, axis=-1)
    length = jnp.sum(mask, axis=-1)
    same = jnp.all(jnp.where(answer[:, :n] >= 0, tokens[:, :n] == answer[:, :n], True), axis=-1)
    ends = jnp.take_along_axis(tokens, jnp.clip(n_ans, 0, tokens.shape[1] - 1)[:, None], axis=1)[:, 0] == EOS
    fits = n_ans < tokens.shape[1]
    return (same & ends & fits & (length == n_ans + 1) & (n_ans > 0)).astype(jnp.float32)


def steps_correct(completion: str, answer: str) -> bool:
    """Whether a decoded completion agrees with a `steps_answer` at every graded position, at the same length."""
    return len(completion) == len(answer) and all(a == UNGRADED or a == c for c, a in zip(completion, answer,
                                                                                           strict=True))


def stream_position(name: str, seed: int = 0) -> int:
    """Where the train stream of consumer `name` (e.g. 'teacher', 'student_pool', 'opd') with seed `seed` starts: a
    hash, so streams of different consumers do not overlap in practice (each has 2**20 * 4096 rows before the next
    possible start). Only independence rests on this; held-out-ness never does (`ChainsTask.problem`)."""
    h = int.from_bytes(hashlib.blake2b(f"{name}/{seed}".encode(), digest_size=4).digest(), "big")
    return h << 32


def assert_held_out(task: ChainsTask, issued: list[str]) -> int:
    """Raise when a training problem in `issued` (texts, e.g. `task.issued`) is a test or validation problem of
    `task`, or belongs to another split by its hash. Returns how many problems were checked."""
    eval_texts = {c.text for s in ("test", "val") for c in task.held_out(s)}
    leaked = [t for t in issued if t in eval_texts]
    if leaked:
        raise AssertionError(f"{len(leaked)} eval problems in a training stream, e.g. {leaked[0]}")
    wrong = [t for t in issued if split_of(t) != "train"]
    if wrong:
        raise AssertionError(f"{len(wrong)} non-train problems in a training stream, e.g. {wrong[0]}")
    return len(issued)


class ChainsTask(GeneratedTask):
    """`Task` of chains: a resumable train stream of prompts and reference solutions, held-out eval problems."""

    reward_fn = staticmethod(exact_match_reward)
    answer_len = 2

    def __init__(self, *, seed: int, min_len: int = 4, max_len: int = 10, mod: int = 10, ops: str = OPS,
                 slips: float = 0.0, reward: str = "answer",
                 single: int = 0, num_test: int = 512, num_val: int = 256, eval_split: str = "test",
                 process_index: int = 0, process_count: int = 1):
        if not 2 <= mod <= 10:
            raise ValueError(f"chains: mod must be in [2, 10] (single-digit values), got {mod}")
        if not 1 <= min_len <= max_len <= len(LABELS):
            raise ValueError(f"chains: need 1 <= min_len <= max_len <= {len(LABELS)}, got {min_len}, {max_len}")
        if eval_split not in ("test", "val", "val+test"):
            raise ValueError(f"chains: eval.split must be 'test', 'val' or 'val+test', got {eval_split!r}")
        self.tok = ChainTokenizer()
        if not ops or set(ops) - set(OPS):
            raise ValueError(f"chains: ops must be a non-empty subset of {OPS!r}, got {ops!r}")
        self.seed, self.min_len, self.max_len, self.mod, self.ops = seed, min_len, max_len, mod, ops
        if single < 0:
            raise ValueError(f"chains: single must be 0 (off) or a prompt number >= 1, got {single}")
        if single and max_len < len(ops):
            raise ValueError(f"chains: a single prompt uses every operation ({ops!r}), so max_len must be >= "
                             f"{len(ops)}, got {max_len}")
        self.slips, self.single = slips, int(single)
        if reward not in ("answer", "steps"):
            raise ValueError(f"chains: reward must be 'answer' or 'steps', got {reward!r}")
        self.reward = reward
        if reward == "steps":  # the reference layout is the "answer": 5 characters a step, then '#d'
            self.reward_fn = steps_reward  # an instance attribute: not bound as a method
            self.answer_len = 5 * max_len + 2
        self.process_index, self.process_count = process_index, process_count
        self.eval_split = eval_split
        self.num_test, self.num_val = num_test, num_val
        self.position = 0  # global rows drawn so far (the resumable data position)
        self.issued: list[str] | None = None  # set to [] to record the text of every training problem handed out
        self._eval_cache: dict[str, list[Chain]] = {}

    # ---- problems ---------------------------------------------------------------------------------------
    def problem(self, global_index: int) -> Chain:
        """Row `global_index` of the train stream: a train-split chain from a per-row RNG (exact resume and
        per-host slicing); with `single` = N, always `single_prompt(N)`."""
        if self.single:
            c = self.single_prompt(self.single)
        else:
            c = draw_in_split(random.Random((self.seed << 64) + global_index), "train", self.min_len, self.max_len,
                              self.mod, self.ops)
        if split_of(c.text) != "train":  # the guarantee the held-out test relies on, checked on every row
            raise AssertionError(f"chains: training row {c.text} is not a train problem")
        if self.issued is not None:
            self.issued.append(c.text)
        return c

    def single_prompt(self, number: int) -> Chain:
        """Single prompt `number` (>= 1): the `number`-th distinct train chain that uses every operation of `ops`,
        in one fixed stream of the task's (lengths, mod, ops), so distinct numbers give distinct prompts and the
        seed does not change them (the published single-prompt run: one prompt, many samples; issue #22 found three
        "seeds" that had all drawn one prompt using only '-'). Raises ValueError for `number` < 1."""
        if number < 1:
            raise ValueError(f"chains: single prompt numbers start at 1, got {number}")
        rng = random.Random(f"chains-single-{self.min_len}-{self.max_len}-{self.mod}-{self.ops}")
        found: list[str] = []
        while len(found) < number:
            c = draw_in_split(rng, "train", max(self.min_len, len(self.ops)), self.max_len, self.mod, self.ops)
            if {op for op, _ in c.ops} == set(self.ops) and c.text not in found:
                found.append(c.text)
        return c

    def held_out(self, split: str) -> list[Chain]:
        """The distinct eval problems of `split` ('test' or 'val'), fixed for the task's (lengths, mod): they do not
        depend on the seed, so every run is graded on the same problems."""
        if split not in self._eval_cache:
            n = self.num_test if split == "test" else self.num_val
            rng = random.Random(f"chains-{split}-{self.min_len}-{self.max_len}-{self.mod}-{self.ops}")
            out, seen = [], set()
            for _ in range(50 * n + 1000):
                if len(out) >= n:
                    break
                c = draw_in_split(rng, split, self.min_len, self.max_len, self.mod, self.ops)
                if c.text not in seen:
                    seen.add(c.text)
                    out.append(c)
            self._eval_cache[split] = out
        return self._eval_cache[split]

    # ---- Task -------------------------------------------------------------------------------------------
    def prompt_text(self, c: Chain) -> str:
        return c.text

    def answer_text(self, c: Chain) -> str:
        """What a completion must get right: the final answer, or with `reward=steps` the reference layout with
        every step's result (`steps_answer`)."""
        return steps_answer(c) if self.reward == "steps" else str(c.answer)

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer; an ungraded position is -2 (`steps_reward`)."""
        return [-2 if ch == UNGRADED else self.tok.encode(ch)[0] for ch in answer]

    def next_prompts(self, n: int) -> PromptRows:
        _, probs = self._rows(n)
        toks = [self.prompt_tokens(p) for p in probs]
        answers = [self.answer_text(p) for p in probs]
        return PromptRows(student=toks, teacher=toks, answers=answers,
                          answer_tokens=[self.answer_ids(a) for a in answers])

    def grade(self, completion: list[int], answer: str) -> bool:
        """With `reward=steps`: the completion up to its first '<eos>' has `answer`'s length and agrees with it at
        every graded position (`steps_correct`); else the final answer after the last '#' is `answer`."""
        if self.reward != "steps":
            return super().grade(completion, answer)
        return EOS in completion and steps_correct(self.decode(completion[: completion.index(EOS)]), answer)

    def sft_example(self, c: Chain, index: int = 0) -> tuple[list[int], list[int]]:
        """(tokens, loss mask) of the reference solution of `c`, with slips when `slips` > 0 (seeded by `index`)."""
        prompt = self.prompt_tokens(c)
        text, mask = c.solution_with_slips(random.Random(f"slips-{self.seed}-{index}"), self.slips)
        return prompt + self.tok.encode(text) + [EOS], [0] * len(prompt) + mask + [1]

    def eval_problems(self) -> list[EvalProblem]:
        splits = ("val", "test") if self.eval_split == "val+test" else (self.eval_split,)
        return [EvalProblem(self.prompt_tokens(c), self.answer_text(c), c.text) for s in splits
                for c in self.held_out(s)]


def parse_source(source: str) -> dict:
    """`synthetic:chains[:min_len[:max_len]][:key=value...]` -> ChainsTask keyword arguments."""
    parts = source.split(":")
    if len(parts) < 2 or parts[1] != "chains":
        raise ValueError(f"not a chains source: {source!r}")
    kw: dict = {}
    positional = ("min_len", "max_len")
    i = 0
    for field in parts[2:]:
        if "=" in field:
            k, v = field.split("=", 1)
            if k == "ops":
                kw["ops"] = v.replace("p", "+").replace("m", "-").replace("t", "*")
                continue
            if k == "reward":
                kw["reward"] = v
                continue
            if k not in ("mod", "slips", "single", "test", "val"):
                raise ValueError(f"data.source {source!r}: unknown chains option {k!r} (mod, slips, single, test, "
                                 "val, reward)")
            try:
                kw[k] = float(v) if k == "slips" else int(v)
            except ValueError:
                raise ValueError(f"data.source {source!r}: {k}={v!r} is not a number") from None
        else:
            if i >= len(positional):
                raise ValueError(f"data.source {source!r}: too many positional fields")
            try:
                kw[positional[i]] = int(field)
            except ValueError:
                raise ValueError(f"data.source {source!r}: {positional[i]} ({field!r}) must be an integer") from None
            i += 1
    if "min_len" in kw and "max_len" not in kw:
        kw["max_len"] = kw["min_len"]
    for k, name in (("test", "num_test"), ("val", "num_val")):
        if k in kw:
            kw[name] = kw.pop(k)
    return kw


def make_chains_task(cfg: ExperimentConfig, *, process_index: int = 0, process_count: int = 1) -> ChainsTask:
    """The `ChainsTask` of `cfg.data.source` (picked by `opd_jax.data.build_task`), graded on the split
    `cfg.eval.split` names ('test' unless it is 'val' or 'val+test'). Raises ConfigError for teacher routing."""
    check_one_stream(cfg)
    kw = parse_source(cfg.data.source)
    return ChainsTask(seed=cfg.data.shuffle_seed,
                      eval_split=cfg.eval.split if cfg.eval.split in ("val", "val+test") else "test",
                      process_index=process_index, process_count=process_count, **kw)
