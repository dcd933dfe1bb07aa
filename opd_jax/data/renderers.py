"""Renderers: chat messages <-> token ids, one explicit object per prompt format.

Student and teacher each get their own renderer (config `data.renderer` and `teacher.renderer`). A student/teacher
format mismatch silently corrupts teacher logprobs, so the teacher's input is always the teacher's own prompt
followed by the student's sampled completion ids, unchanged: the step concatenates them on device
(`step.completion_hidden`), and `teacher_sequence` is the same rule on the host, which the tests hold the step to.

Names accepted by `get_renderer`:
  "qwen3"            Qwen3 chat format, thinking on: the prompt ends at `<|im_start|>assistant\\n`, the model opens
                     `<think>` itself.
  "qwen3_nothink"    Qwen3 chat format, thinking off: the prompt ends with the empty `<think>\\n\\n</think>\\n\\n`
                     block, exactly as Qwen3's template does for `enable_thinking=False`.
  "base"             plain text for base models: `Question: ...\\nAnswer:`; stops at eos.
  "hf_chat_template" whatever `tokenizer.apply_chat_template(..., add_generation_prompt=True)` produces.

Messages are `{"role": "system" | "user" | "assistant", "content": str}` dicts (Qwen3 also reads an optional
assistant `reasoning_content`). Tool calls are not supported.
"""

from __future__ import annotations

import abc
import difflib
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from opd_jax.data.math_grading import extract_answer, extract_boxed, strip_thinking
from opd_jax.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Renderer",
    "Qwen3Renderer",
    "BaseRenderer",
    "HFChatTemplateRenderer",
    "RENDERER_NAMES",
    "get_renderer",
    "load_tokenizer",
    "check_same_vocab",
    "teacher_sequence",
]

Message = dict[str, Any]
# (text, trainable) pieces; each piece is tokenized on its own so prompts are token-exact prefixes of conversations.
Segments = list[tuple[str, bool]]

_ROLES = ("system", "user", "assistant")


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ValueError("messages is empty")
    for i, m in enumerate(messages):
        if m.get("role") not in _ROLES:
            raise ValueError(f"message {i}: role must be one of {_ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a str, got {type(m.get('content')).__name__}")


def _check_prompt_messages(messages: Sequence[Message]) -> None:
    _check_messages(messages)
    if messages[-1]["role"] == "assistant":
        raise ValueError("build_prompt: the last message is an assistant turn; the prompt must end before one")


class Renderer(abc.ABC):
    """One prompt format over one tokenizer. Subclasses define `name`, the two builders and `stop_token_ids`."""

    name: str = "abstract"

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self._vocab_fingerprint: str | None = None

    @abc.abstractmethod
    def build_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the generation prompt; ends exactly where the assistant's completion starts."""

    @abc.abstractmethod
    def build_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """(token ids, 0/1 trainable mask) for a full conversation; 1 only on tokens the assistant generates,
        including its end-of-turn token. The ids before each assistant turn equal `build_prompt` of the messages
        before it, so SFT sees the same prompt tokens the sampler conditions on."""

    @property
    @abc.abstractmethod
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a completion."""

    def parse_answer(self, text: str) -> str | None:
        """The last `\\boxed{}` answer after any `<think>...</think>` block (None while thinking is unterminated)."""
        body = strip_thinking(text)
        return None if body is None else extract_boxed(body)

    # -- the end of this turn: what graders read ----------------------------------------------------------------
    @property
    def turn_end_ids(self) -> list[int]:
        """Token ids after which a completion no longer belongs to this turn: the stop tokens (a renderer adds
        the ids that open another turn)."""
        return self.stop_token_ids

    def end_of_turn(self, text: str) -> str:
        """`text` cut where this format starts the next turn (text-level rule; none by default)."""
        return text

    def turn_text(self, ids: Sequence[int]) -> str:
        """The text of the assistant turn a completion holds: the ids up to the first end-of-turn token, decoded
        without special tokens, cut at the format's next-turn marker (`end_of_turn`). Graders read this, so a
        completion that answers and then writes another turn is graded on its own answer."""
        ends = set(self.turn_end_ids)
        ids = list(ids)
        cut = next((i for i, t in enumerate(ids) if int(t) in ends), len(ids))
        return self.end_of_turn(self.decode(ids[:cut]))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_fingerprint(self) -> str:
        """A hash of the token -> id map (cached): equal fingerprints mean ids can be exchanged."""
        if self._vocab_fingerprint is None:
            items = sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
            h = hashlib.sha256()
            for token, idx in items:
                h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
            self._vocab_fingerprint = h.hexdigest()
        return self._vocab_fingerprint

    # -- helpers -----------------------------------------------------------------------------------------------

    def _encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens)) if text else []

    def _token_id(self, token: str, required: bool = True) -> int | None:
        """Id of a single added token, or None when absent (and not required)."""
        idx = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if idx is None or (unk is not None and idx == unk and token != getattr(self.tokenizer, "unk_token", None)):
            if required:
                raise ConfigError(f"renderer {self.name!r} needs the token {token!r}, which this tokenizer lacks")
            return None
        return int(idx)

    def _tokenize_segments(self, segments: Segments, bos: bool = False) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        for k, (text, trainable) in enumerate(segments):
            piece = self._encode(text, add_special_tokens=bos and k == 0)
            ids += piece
            mask += [int(trainable)] * len(piece)
        return ids, mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---------------------------------------------------------------------------------------------------------------
# Qwen3
# ---------------------------------------------------------------------------------------------------------------

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"


class Qwen3Renderer(Renderer):
    """Qwen3's chat format, written out by hand (not via the jinja template) so the assistant spans are known.

    Mirrors Qwen3's template: reasoning is dropped from assistant turns before the last user query; the assistant
    turn after it is written `<think>\\n{reasoning}\\n</think>\\n\\n{content}`; the generation prompt gets the empty
    think block only when thinking is off.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, thinking: bool = True):
        super().__init__(tokenizer)
        self.thinking = thinking
        self.name = "qwen3" if thinking else "qwen3_nothink"
        self._im_end = self._token_id(IM_END)
        self._im_start = self._token_id(IM_START)
        self._endoftext = self._token_id(ENDOFTEXT, required=False)

    @property
    def stop_token_ids(self) -> list[int]:
        return [self._im_end] + ([self._endoftext] if self._endoftext is not None else [])

    @property
    def turn_end_ids(self) -> list[int]:
        return [*self.stop_token_ids, self._im_start]

    @staticmethod
    def _last_query_index(messages: Sequence[Message]) -> int:
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            c = m["content"]
            if m["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
                return i
        return len(messages) - 1

    def _history_segments(self, messages: Sequence[Message]) -> Segments:
        segments: Segments = []
        last_query = self._last_query_index(messages)
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role != "assistant":
                segments.append((f"{IM_START}{role}\n{content}{IM_END}\n", False))
                continue
            reasoning = m.get("reasoning_content")
            if not isinstance(reasoning, str):
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
            if i > last_query and (i == len(messages) - 1 or reasoning):
                reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
                body = f"<think>\n{reasoning}\n</think>\n\n{content}"
            else:
                body = content
            segments.append((f"{IM_START}assistant\n", False))
            if not self.thinking and body.startswith(EMPTY_THINK):
                # Thinking off: the empty block is part of the prompt (build_prompt emits it), not generated.
                segments.append((EMPTY_THINK, False))
                body = body[len(EMPTY_THINK) :]
            segments.append((body + IM_END, True))
            segments.append(("\n", False))
        return segments

    def _generation_prompt(self) -> str:
        return f"{IM_START}assistant\n" + ("" if self.thinking else EMPTY_THINK)

    def build_prompt(self, messages: Sequence[Message]) -> list[int]:
        _check_prompt_messages(messages)
        text = "".join(t for t, _ in self._history_segments(messages)) + self._generation_prompt()
        # Every boundary in a prompt is at an added token, so one encode equals encoding the pieces.
        return self._encode(text)

    def build_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        _check_messages(messages)
        return self._tokenize_segments(self._history_segments(messages))


# ---------------------------------------------------------------------------------------------------------------
# Base models
# ---------------------------------------------------------------------------------------------------------------


class BaseRenderer(Renderer):
    """Plain text for base (non-chat) models: `{system}\\n\\nQuestion: {user}\\nAnswer: {assistant}<eos>\\n\\n...`.

    Adds the tokenizer's BOS when it is configured to (Llama-style); Qwen adds none.
    """

    name = "base"

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        super().__init__(tokenizer)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ConfigError("the base renderer needs a tokenizer with an eos token")
        self._eos = int(eos)
        self._eos_text = tokenizer.eos_token

    @property
    def stop_token_ids(self) -> list[int]:
        # A base model may end with <|endoftext|> even when the tokenizer's eos is a chat token (Qwen3 instruct).
        extra = self._token_id(ENDOFTEXT, required=False)
        return [self._eos] + ([extra] if extra is not None and extra != self._eos else [])

    def _segments(self, messages: Sequence[Message]) -> Segments:
        segments: Segments = []
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role == "system":
                segments.append((f"{content}\n\n", False))
            elif role == "user":
                sep = "\n\n" if i > 0 and messages[i - 1]["role"] == "assistant" else ""
                segments.append((f"{sep}Question: {content}\nAnswer:", False))
            else:
                segments.append((f" {content.strip()}{self._eos_text}", True))
        return segments

    def build_prompt(self, messages: Sequence[Message]) -> list[int]:
        _check_prompt_messages(messages)
        return self._tokenize_segments(self._segments(messages), bos=True)[0]

    def build_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        _check_messages(messages)
        return self._tokenize_segments(self._segments(messages), bos=True)

    def end_of_turn(self, text: str) -> str:
        """Base models ramble on into the next "Question:" of the format: this turn ends there."""
        return text.split("\nQuestion:", 1)[0]

    def parse_answer(self, text: str) -> str | None:
        """The answer of this turn: cut at the next "Question:", then the boxed answer or else the last number."""
        return extract_answer(self.end_of_turn(text))


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer's own chat template
# ---------------------------------------------------------------------------------------------------------------

# End-of-turn tokens of common chat formats; those present in the vocab are added to the stop tokens.
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>")


class HFChatTemplateRenderer(Renderer):
    """Delegates to `tokenizer.apply_chat_template`; `template_kwargs` (e.g. `enable_thinking=False`) pass through.

    `build_conversation` renders growing prefixes of the conversation to find each assistant span, so it needs a
    prefix-stable template (one that never rewrites earlier turns); it raises otherwise.
    """

    name = "hf_chat_template"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_tokens: Sequence[str] | None = None, **template_kwargs):
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("hf_chat_template: this tokenizer has no chat_template")
        self.template_kwargs = template_kwargs
        ids: list[int] = []
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.append(int(eos))
        for token in _KNOWN_END_OF_TURN if stop_tokens is None else stop_tokens:
            idx = self._token_id(token, required=stop_tokens is not None)
            if idx is not None and idx not in ids:
                ids.append(idx)
        if not ids:
            raise ValueError("hf_chat_template: no stop tokens (no eos); pass stop_tokens=[...]")
        self._stop_ids = ids

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._stop_ids)

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **self.template_kwargs
        )

    def build_prompt(self, messages: Sequence[Message]) -> list[int]:
        _check_prompt_messages(messages)
        # The rendered text already holds any BOS the template wants: do not add special tokens again.
        return self._encode(self._render(messages, add_generation_prompt=True))

    def build_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        _check_messages(messages)
        segments: Segments = []
        done = ""  # rendered text already covered by segments
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], add_generation_prompt=True)
            turn = self._render(messages[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not turn.startswith(prompt):
                raise ValueError(
                    f"hf_chat_template: the template is not prefix-stable at message {i} (it rewrites earlier turns, "
                    "e.g. drops reasoning); use a dedicated renderer for multi-turn SFT"
                )
            completion = turn[len(prompt) :]
            generated = completion.rstrip()  # the glue after the end-of-turn token is not generated
            segments += [(prompt[len(done) :], False), (generated, True), (completion[len(generated) :], False)]
            done = turn
        full = self._render(messages, add_generation_prompt=False)
        if not full.startswith(done):
            raise ValueError("hf_chat_template: the template is not prefix-stable for this conversation")
        segments.append((full[len(done) :], False))
        return self._tokenize_segments([(t, tr) for t, tr in segments if t])


# ---------------------------------------------------------------------------------------------------------------
# Factory, tokenizer loading, teacher sequences
# ---------------------------------------------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[..., Renderer]] = {
    "qwen3": lambda tok, **kw: Qwen3Renderer(tok, thinking=True, **kw),
    "qwen3_nothink": lambda tok, **kw: Qwen3Renderer(tok, thinking=False, **kw),
    "base": lambda tok, **kw: BaseRenderer(tok, **kw),
    "hf_chat_template": lambda tok, **kw: HFChatTemplateRenderer(tok, **kw),
}
RENDERER_NAMES: tuple[str, ...] = tuple(sorted(_FACTORIES))


def get_renderer(name: str, tokenizer: PreTrainedTokenizerBase, **kwargs) -> Renderer:
    """The renderer called `name` (one of RENDERER_NAMES) over `tokenizer`; kwargs go to its constructor."""
    factory = _FACTORIES.get(name)
    if factory is None:
        hint = difflib.get_close_matches(str(name), RENDERER_NAMES, n=1)
        msg = f"unknown renderer {name!r}; valid names: {', '.join(RENDERER_NAMES)}"
        if hint:
            msg += f" (did you mean {hint[0]!r}?)"
        if name == "same":
            msg += " ('same' is a teacher config value: resolve it to the student's renderer name first)"
        raise ValueError(msg)
    return factory(tokenizer, **kwargs)


def load_tokenizer(path: str, **kwargs) -> PreTrainedTokenizerBase:
    """`transformers.AutoTokenizer.from_pretrained` on a local directory or a Hugging Face Hub id (`org/name[@rev]`,
    resolved to its cached snapshot by `opd_jax.hub.resolve`: network or a populated HF cache). Remote
    object-store paths (gs://) must be copied to local disk first. Raises ConfigError naming `path` when it holds
    no tokenizer."""
    if "://" in str(path):
        raise ConfigError(f"tokenizer {path!r} is a remote URL; copy the tokenizer files to a local directory")
    from transformers import AutoTokenizer

    from opd_jax import hub

    local = hub.resolve(str(path), what="tokenizer")
    if not os.path.isdir(local):
        raise ConfigError(f"tokenizer {path!r}: no such directory, and not a Hugging Face Hub id (org/name)")
    try:
        return AutoTokenizer.from_pretrained(local, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer {path!r}: {local} holds no tokenizer that transformers can load "
                          f"({str(e).splitlines()[0][:200]})") from None


def check_same_vocab(a: Renderer, b: Renderer) -> None:
    """Raise unless the two renderers' tokenizers map the same tokens to the same ids (ids are exchanged as-is)."""
    ta, tb = a.tokenizer, b.tokenizer
    if ta is tb:
        return
    if len(ta) != len(tb):
        raise ValueError(
            f"student renderer {a.name!r} and teacher renderer {b.name!r} use tokenizers of different sizes "
            f"({len(ta)} vs {len(tb)}); on-policy distillation needs one shared vocabulary"
        )
    if a.vocab_fingerprint != b.vocab_fingerprint:
        raise ValueError(
            f"student renderer {a.name!r} and teacher renderer {b.name!r} use tokenizers with different vocabularies "
            "(same size, different token -> id maps); on-policy distillation needs one shared vocabulary"
        )


def teacher_sequence(
    student_renderer: Renderer,
    teacher_renderer: Renderer,
    messages: Sequence[Message],
    completion_ids: Sequence[int],
) -> tuple[list[int], int]:
    """The teacher's input: its OWN prompt for `messages`, then the student's `completion_ids` unchanged.

    Returns (tokens, completion_start): `tokens[completion_start:] == list(completion_ids)`, so teacher logprobs at
    positions completion_start-1 .. len(tokens)-2 score exactly the student's sampled tokens. Raises if the two
    renderers' tokenizers do not share a vocabulary.
    """
    check_same_vocab(student_renderer, teacher_renderer)
    prompt = teacher_renderer.build_prompt(messages)
    return prompt + [int(t) for t in completion_ids], len(prompt)
