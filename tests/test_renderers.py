"""Renderers against a local Qwen3-like tokenizer (tests/fixtures_tokenizer.py): token-exact agreement with the chat
template, trainable masks, stop tokens, answer parsing and teacher sequences."""

from __future__ import annotations

import pytest
from fixtures_tokenizer import VOCAB_SIZE, build_tokenizer, make_tokenizer_dir

from opd_jax.data.renderers import (
    EMPTY_THINK,
    RENDERER_NAMES,
    BaseRenderer,
    HFChatTemplateRenderer,
    Qwen3Renderer,
    check_same_vocab,
    get_renderer,
    load_tokenizer,
    teacher_sequence,
)

SYSTEM = {"role": "system", "content": "You are a careful mathematician."}
Q1 = {"role": "user", "content": "What is 12 + 30? Put the answer in \\boxed{}."}
A1 = {"role": "assistant", "content": "<think>\n12 + 30 = 42.\n</think>\n\nThe answer is \\boxed{42}."}
A1_PLAIN = {"role": "assistant", "content": "The answer is \\boxed{42}."}
Q2 = {"role": "user", "content": "And 2 + 2?"}
A2 = {"role": "assistant", "content": "<think>\nfour\n</think>\n\nSo \\boxed{4}."}

PROMPTS = [[Q1], [SYSTEM, Q1], [SYSTEM, Q1, A1, Q2], [Q1, A1_PLAIN, Q2]]
CONVERSATIONS = [[Q1, A1], [SYSTEM, Q1, A1_PLAIN], [Q1, A1, Q2, A2], [SYSTEM, Q1, A1_PLAIN, Q2, A2]]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def _hf_ids(tok, messages, **kwargs) -> list[int]:
    """The tokenizer's own rendering + tokenization (a BatchEncoding in transformers 5, a list before)."""
    out = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _masked_text(renderer, ids, mask) -> str:
    return renderer.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)


# ----------------------------------------------------------------------------------------------------------------
# The fixture tokenizer itself
# ----------------------------------------------------------------------------------------------------------------


def test_fixture_tokenizer(tok):
    assert len(tok) == VOCAB_SIZE
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        (idx,) = tok.encode(t, add_special_tokens=False)  # one token each
        assert tok.convert_ids_to_tokens(idx) == t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # <think> is an added but non-special token, as in Qwen3: decoding keeps it.
    ids = tok.encode("<think>\nx\n</think>\n\n1<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>\n\n1"
    assert build_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()  # deterministic build


# ----------------------------------------------------------------------------------------------------------------
# Qwen3 against the chat template
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("messages", PROMPTS)
def test_qwen3_prompt_matches_chat_template(tok, thinking, messages):
    r = Qwen3Renderer(tok, thinking=thinking)
    ids = r.build_prompt(messages)
    assert ids == _hf_ids(tok, messages, add_generation_prompt=True, enable_thinking=thinking)
    text = r.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n" + ("" if thinking else EMPTY_THINK))


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_qwen3_conversation_matches_chat_template(tok, thinking, messages):
    r = Qwen3Renderer(tok, thinking=thinking)
    ids, mask = r.build_conversation(messages)
    assert ids == _hf_ids(tok, messages, enable_thinking=thinking)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}


def test_qwen3_mask_single_turn(tok):
    # Thinking on: everything the model writes after "<|im_start|>assistant\n", reasoning included, plus <|im_end|>.
    r = Qwen3Renderer(tok, thinking=True)
    ids, mask = r.build_conversation([SYSTEM, Q1, A1])
    assert _masked_text(r, ids, mask) == A1["content"] + "<|im_end|>"
    prompt = r.build_prompt([SYSTEM, Q1])
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
    assert mask[len(prompt) :] == [1] * (len(ids) - len(prompt) - 1) + [0]  # the trailing "\n" is template glue
    assert ids[-2] == tok.convert_tokens_to_ids("<|im_end|>") and mask[-2] == 1

    # Thinking off: the empty think block belongs to the prompt, so only the answer and <|im_end|> are trainable.
    r = Qwen3Renderer(tok, thinking=False)
    ids, mask = r.build_conversation([Q1, A1_PLAIN])
    assert _masked_text(r, ids, mask) == A1_PLAIN["content"] + "<|im_end|>"
    prompt = r.build_prompt([Q1])
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])


def test_qwen3_mask_multi_turn(tok):
    r = Qwen3Renderer(tok, thinking=True)
    ids, mask = r.build_conversation([Q1, A1, Q2, A2])
    # Qwen3's template drops the reasoning of turns before the last user query; the last turn keeps it.
    assert _masked_text(r, ids, mask) == "The answer is \\boxed{42}.<|im_end|>" + A2["content"] + "<|im_end|>"
    # Exactly two contiguous trainable runs, each right after a generation prompt.
    runs = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert len(runs) == 2
    assert runs[1] == len(r.build_prompt([Q1, A1, Q2]))
    assert ids[: runs[1]] == r.build_prompt([Q1, A1, Q2])


def test_qwen3_stop_tokens(tok):
    for thinking in (True, False):
        r = Qwen3Renderer(tok, thinking=thinking)
        assert r.stop_token_ids == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


def test_qwen3_parse_answer(tok):
    r = get_renderer("qwen3", tok)
    assert r.parse_answer("<think>\nmaybe \\boxed{3}?\n</think>\n\nSo \\boxed{4}.") == "4"
    assert r.parse_answer("<think>\nmaybe \\boxed{3}?\n</think>\n\nI give up.") is None  # the thought is no answer
    assert r.parse_answer("<think>\nstill thinking \\boxed{3}") is None  # truncated while thinking
    assert r.parse_answer("no think block: \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert r.parse_answer("42") is None  # chat renderers want a box
    nothink = get_renderer("qwen3_nothink", tok)
    assert nothink.parse_answer("So \\boxed{7}.") == "7"
    # Round trip through token ids, as the sampler returns them.
    ids = tok.encode("<think>\nhmm\n</think>\n\nSo \\boxed{12}.<|im_end|>", add_special_tokens=False)
    assert r.parse_answer(r.decode(ids)) == "12"


# ----------------------------------------------------------------------------------------------------------------
# HF chat template and base renderers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("thinking", [True, False])
def test_hf_chat_template_matches_qwen3(tok, thinking):
    hf = get_renderer("hf_chat_template", tok, enable_thinking=thinking)
    q = Qwen3Renderer(tok, thinking=thinking)
    for messages in PROMPTS:
        assert hf.build_prompt(messages) == q.build_prompt(messages)
    for messages in ([Q1, A1], [SYSTEM, Q1, A1_PLAIN]):
        if not thinking and messages[-1] is A1:
            continue  # reasoning in a no-think conversation: no prompt prefix to compare against
        assert hf.build_conversation(messages) == q.build_conversation(messages)
    assert hf.stop_token_ids == q.stop_token_ids


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_hf_chat_template_multi_turn(tok):
    # Qwen3's template renders a final assistant turn with a think block but drops it once a new user query
    # follows, so growing prefixes are not prefixes of the whole: multi-turn SFT through it must fail loudly.
    hf = HFChatTemplateRenderer(tok)
    for messages in ([Q1, A1, Q2, A2], [Q1, A1_PLAIN, Q2, A2]):
        with pytest.raises(ValueError, match="prefix-stable"):
            hf.build_conversation(messages)
    # A prefix-stable template (plain ChatML, passed through template_kwargs) works and masks each answer + <|im_end|>.
    hf = HFChatTemplateRenderer(tok, chat_template=CHATML)
    messages = [SYSTEM, Q1, A1_PLAIN, Q2, A2]
    ids, mask = hf.build_conversation(messages)
    assert ids == _hf_ids(tok, messages, chat_template=CHATML)
    assert _masked_text(hf, ids, mask) == A1_PLAIN["content"] + "<|im_end|>" + A2["content"] + "<|im_end|>"
    prompt = hf.build_prompt([SYSTEM, Q1, A1_PLAIN, Q2])
    assert ids[: len(prompt)] == prompt and mask[len(prompt)] == 1 and mask[len(prompt) - 1] == 0


def test_base_renderer(tok):
    r = get_renderer("base", tok)
    assert isinstance(r, BaseRenderer)
    prompt = r.build_prompt([SYSTEM, Q1])
    assert r.decode(prompt, skip_special_tokens=False) == f"{SYSTEM['content']}\n\nQuestion: {Q1['content']}\nAnswer:"
    ids, mask = r.build_conversation([Q1, A1_PLAIN, Q2, A2])
    text = r.decode(ids, skip_special_tokens=False)
    assert text.startswith(f"Question: {Q1['content']}\nAnswer: {A1_PLAIN['content']}{tok.eos_token}\n\nQuestion: ")
    assert _masked_text(r, ids, mask) == f" {A1_PLAIN['content']}{tok.eos_token} {A2['content']}{tok.eos_token}"
    assert ids[: len(r.build_prompt([Q1]))] == r.build_prompt([Q1])
    assert r.stop_token_ids[0] == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|endoftext|>") in r.stop_token_ids
    # Base models run on into the next question and rarely box: cut there, fall back to the last number.
    assert r.parse_answer(" 42\nQuestion: What is 5 + 5?\nAnswer: 10") == "42"
    assert r.parse_answer(" It is \\boxed{7}, not 8.") == "7"


# ----------------------------------------------------------------------------------------------------------------
# Teacher sequences, factory, validation
# ----------------------------------------------------------------------------------------------------------------


def test_teacher_sequence_keeps_student_completion(tok):
    student = get_renderer("qwen3", tok)
    messages = [SYSTEM, Q1]
    completion = tok.encode("<think>\n12 + 30 = 42\n</think>\n\n\\boxed{42}<|im_end|>", add_special_tokens=False)
    for teacher_name in ("qwen3_nothink", "base", "hf_chat_template"):
        teacher = get_renderer(teacher_name, tok)
        tokens, start = teacher_sequence(student, teacher, messages, completion)
        assert tokens[start:] == completion
        assert tokens[:start] == teacher.build_prompt(messages)
        if teacher_name != "hf_chat_template":  # hf's default rendering equals "qwen3"
            assert tokens[:start] != student.build_prompt(messages)
    # Same renderer both sides: the teacher sees exactly the student's sequence.
    tokens, start = teacher_sequence(student, student, messages, completion)
    assert tokens == student.build_prompt(messages) + completion


def test_teacher_sequence_vocab_check(tok, tmp_path):
    student = get_renderer("qwen3", tok)
    same = get_renderer("qwen3_nothink", load_tokenizer(make_tokenizer_dir(tmp_path / "again")))
    check_same_vocab(student, same)  # a separate but identical tokenizer is fine
    bigger_tok = load_tokenizer(make_tokenizer_dir(tmp_path / "bigger"))
    bigger_tok.add_tokens(["<extra_token>"])
    with pytest.raises(ValueError, match="different sizes"):
        teacher_sequence(student, get_renderer("qwen3", bigger_tok), [Q1], [1, 2, 3])
    other = get_renderer("qwen3", load_tokenizer(make_tokenizer_dir(tmp_path / "other")))
    other._vocab_fingerprint = "0" * 64  # same size, different token -> id map
    with pytest.raises(ValueError, match="different vocabularies"):
        teacher_sequence(student, other, [Q1], [1, 2, 3])


def test_get_renderer_names_and_errors(tok):
    assert RENDERER_NAMES == ("base", "hf_chat_template", "qwen3", "qwen3_nothink")
    for name in RENDERER_NAMES:
        assert get_renderer(name, tok).name == name
    with pytest.raises(ValueError, match=r"unknown renderer 'qwen3-nothink'.*valid names: base, hf_chat_template"):
        get_renderer("qwen3-nothink", tok)
    with pytest.raises(ValueError, match="did you mean 'qwen3_nothink'"):
        get_renderer("qwen3_nothnk", tok)
    with pytest.raises(ValueError, match="resolve it to the student's renderer"):
        get_renderer("same", tok)


def test_message_validation(tok):
    r = get_renderer("qwen3", tok)
    with pytest.raises(ValueError, match="last message is an assistant"):
        r.build_prompt([Q1, A1])
    with pytest.raises(ValueError, match="role"):
        r.build_prompt([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        r.build_prompt([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="empty"):
        r.build_prompt([])
    with pytest.raises(ValueError, match="remote URL"):
        load_tokenizer("gs://bucket/tokenizer")


def test_qwen3_renderer_needs_chat_tokens(tok):
    class NoChatTokens:  # a tokenizer stand-in without <|im_start|> / <|im_end|>
        unk_token_id = None
        unk_token = None

        def convert_tokens_to_ids(self, token):
            return None

    with pytest.raises(ValueError, match="lacks"):
        Qwen3Renderer(NoChatTokens())
