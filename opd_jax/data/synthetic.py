"""Multi-step arithmetic with a written scratchpad, generated on the fly, with a character tokenizer and an
exact-match grader written in JAX (so an RL reward stays inside the one XLA program).

    prompt      "<bos>(23+45)*3-17="
    completion  "23+45=68;68*3=204;204-17=187;#187<eos>"

Operations are applied left to right; parentheses make standard precedence agree with that order.
Difficulty: `num_ops` (steps of reasoning) and `max_operand`.

`FactsTask` is new knowledge the arithmetic skill never needs: a fixed random lookup table, "@37=" -> "#512",
used by the mini experiment's continual-learning (recovery) stage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from opd_jax.config.schema import ExperimentConfig
from opd_jax.data.task import EvalProblem, PromptRows, Task
from opd_jax.errors import ConfigError

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789+-*()=;#@"  # append only: ids of existing characters never move
VOCAB = ["<pad>", "<bos>", "<eos>", *CHARS]
VOCAB_SIZE = 32  # room to spare, a multiple of 8 for sharding
_ID = {c: i for i, c in enumerate(VOCAB)}
ANSWER_MARK = _ID["#"]


class CharTokenizer:
    pad_id, bos_id, eos_id = PAD, BOS, EOS
    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        try:
            return [_ID[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the arithmetic vocabulary {CHARS!r}") from None

    def decode(self, ids) -> str:
        return "".join(VOCAB[i] if 2 < i < len(VOCAB) else "" for i in ids if i != EOS)


@dataclass
class Problem:
    expression: str
    steps: list[str]
    answer: int

    @property
    def solution(self) -> str:
        return ";".join([*self.steps, f"#{self.answer}"])


def make_problem(rng: random.Random, num_ops: int, max_operand: int) -> Problem:
    value = rng.randint(1, max_operand)
    expr, steps, compound = str(value), [], False
    for _ in range(num_ops):
        op = rng.choice("+-*")
        b = rng.randint(1, 9) if op == "*" else rng.randint(1, max_operand)
        new = {"+": value + b, "-": value - b, "*": value * b}[op]
        if op == "*" and compound:
            expr = f"({expr})"
        expr = f"{expr}{op}{b}"
        steps.append(f"{value}{op}{b}={new}")
        value, compound = new, op in "+-"
    return Problem(expr, steps, value)


def exact_match_reward(tokens: jax.Array, mask: jax.Array, answer: jax.Array) -> jax.Array:
    """1.0 where the completion ends in '#<answer digits><eos>' exactly, else 0. In JAX, traceable.

    tokens, mask: [B, N]; answer: [B, A] answer token ids padded with -1."""
    B, N = tokens.shape
    A = answer.shape[1]
    length = jnp.sum(mask, axis=-1)
    ends_with_eos = jnp.take_along_axis(tokens, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0] == EOS
    n_ans = jnp.sum(answer >= 0, axis=-1)
    # expected suffix '#', digits..., right-aligned to end just before the eos
    k = jnp.arange(A + 1)
    offset = length - 1 - (n_ans + 1)  # index of '#'
    pos = offset[:, None] + k[None, :]
    got = jnp.take_along_axis(tokens, jnp.clip(pos, 0, N - 1), axis=1)
    want = jnp.concatenate([jnp.full((B, 1), ANSWER_MARK), answer], axis=1)
    in_suffix = k[None, :] <= n_ans[:, None]
    ok = jnp.all(jnp.where(in_suffix, (got == want) & (pos >= 0), True), axis=-1)
    return (ok & ends_with_eos & (n_ans > 0)).astype(jnp.float32)


class ArithmeticTask(Task):
    reward_fn = staticmethod(exact_match_reward)
    vocab_size = len(VOCAB)

    def __init__(self, *, seed: int, num_ops: int = 3, max_operand: int = 20, eval_problems: int = 64,
                 process_index: int = 0, process_count: int = 1, answer_len: int = 8, fixed_prompt: bool = False):
        self.tok = CharTokenizer()
        self.num_ops, self.max_operand = num_ops, max_operand
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.answer_len = answer_len
        self.fixed_prompt = fixed_prompt  # single-prompt training: every row is the same problem
        self.position = 0  # number of global rows drawn so far: the resumable data position
        eval_rng = random.Random(10_000 + seed)  # held-out stream, disjoint seed
        self._eval = [make_problem(eval_rng, num_ops, max_operand) for _ in range(eval_problems)]

    @property
    def stop_token_ids(self) -> list[int]:
        return [EOS]

    def prompt_tokens(self, p: Problem) -> list[int]:
        return [BOS, *self.tok.encode(p.expression + "=")]

    def prompt_tokens_from_text(self, text: str) -> list[int]:
        """[BOS] + an expression typed by a user, with the trailing '=' added when missing (`opd-jax visualize`)."""
        text = text.strip()
        return [BOS, *self.tok.encode(text if text.endswith("=") else text + "=")]

    def problem(self, global_index: int) -> Problem:
        # one RNG per row index: any process can regenerate any row, so per-host slicing and resume are exact
        idx = 0 if self.fixed_prompt else global_index
        return make_problem(random.Random(self.seed * 1_000_003 + idx), self.num_ops, self.max_operand)

    def next_prompts(self, n: int) -> PromptRows:
        # n per-process rows; this process takes its slice of the next n*process_count global rows
        start = self.position + self.process_index * n
        probs = [self.problem(start + i) for i in range(n)]
        self.position += n * self.process_count
        toks = [self.prompt_tokens(p) for p in probs]
        return PromptRows(student=toks, teacher=toks, answers=[str(p.answer) for p in probs],
                          answer_tokens=[self.tok.encode(str(p.answer)) for p in probs])

    def sft_example(self, p: Problem) -> tuple[list[int], list[int]]:
        prompt = self.prompt_tokens(p)
        completion = self.tok.encode(p.solution) + [EOS]
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)

    def sft_examples(self, n: int) -> list[tuple[list[int], list[int]]]:
        # the reference scratchpad solutions of the same row stream as next_prompts
        start = self.position + self.process_index * n
        self.position += n * self.process_count
        return [self.sft_example(self.problem(start + i)) for i in range(n)]

    def eval_problems(self) -> list[EvalProblem]:
        return [EvalProblem(self.prompt_tokens(p), str(p.answer), p.expression) for p in self._eval]

    def grade(self, completion: list[int], answer: str) -> bool:
        text = self.decode(completion)
        return text.rsplit("#", 1)[-1] == answer if "#" in text and EOS in completion else False

    def decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict) -> None:
        self.position = int(state.get("position", 0))


class FactsTask(ArithmeticTask):
    """A lookup table of `num_facts` random facts, "@<key>=" -> "#<value>": knowledge to memorize, not a skill.
    The table is fixed by `seed`; the eval set is the whole table (the facts themselves are the test)."""

    def __init__(self, *, seed: int, num_facts: int = 64, max_value: int = 999, **kw):
        super().__init__(seed=seed, num_ops=1, max_operand=9, eval_problems=0, **kw)
        rng = random.Random(777_000 + seed)
        self.table = {k: rng.randint(0, max_value) for k in rng.sample(range(100, 1000), num_facts)}
        self._eval = [self._fact(k) for k in self.table]

    def _fact(self, key: int) -> Problem:
        return Problem(f"@{key}", [], self.table[key])

    def problem(self, global_index: int) -> Problem:
        keys = list(self.table)
        return self._fact(keys[random.Random(self.seed * 1_000_003 + global_index).randrange(len(keys))])


def check_one_stream(cfg: ExperimentConfig) -> None:
    """Raise ConfigError when a teacher routes by dataset name: a synthetic task has one data stream."""
    for i, t in enumerate(cfg.teachers):
        if t.datasets:
            raise ConfigError(f"teachers.{i}.datasets: {t.datasets}: a synthetic task has one data stream, nothing to "
                              "route; drop `datasets` (the first teacher scores it)")


def make_synthetic_task(cfg: ExperimentConfig, *, process_index: int = 0, process_count: int = 1) -> Task:
    """`data.source: synthetic:arithmetic[:num_ops[:max_operand]]`, `synthetic:arithmetic_single[...]` for one
    repeated prompt or `synthetic:facts[:num_facts]` for the lookup table (`synthetic:chains[...]`, the OPD
    miniature's task, lives in `opd_jax.data.chains`; `opd_jax.data.build_task` picks it)."""
    parts = cfg.data.source.split(":")
    name = parts[1] if len(parts) > 1 else ""
    check_one_stream(cfg)
    if name not in ("arithmetic", "arithmetic_single", "facts"):
        raise ConfigError(f"data.source: unknown synthetic task {name!r}; valid: 'arithmetic', 'arithmetic_single', "
                          "'facts', 'chains'")

    def number(i: int, default: int) -> int:
        if len(parts) <= i:
            return default
        try:
            return int(parts[i])
        except ValueError:
            raise ConfigError(f"data.source {cfg.data.source!r}: field {i} ({parts[i]!r}) must be an integer") from None

    if name == "facts":
        return FactsTask(seed=cfg.data.shuffle_seed, num_facts=number(2, 64), process_index=process_index,
                         process_count=process_count)
    num_ops = number(2, 3)
    max_operand = number(3, 20)
    return ArithmeticTask(seed=cfg.data.shuffle_seed, num_ops=num_ops, max_operand=max_operand,
                          eval_problems=cfg.eval.num_problems or 64, process_index=process_index,
                          process_count=process_count, fixed_prompt=name == "arithmetic_single")
