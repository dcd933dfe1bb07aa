"""A small, offline, Qwen3-like HF tokenizer for tests.

`make_tokenizer_dir(path)` trains a tiny byte-level BPE (Qwen2's pre-tokenizer regex, so digits split one per token
and whitespace/newlines split like Qwen) on a fixed in-memory corpus, adds Qwen3's chat special tokens, attaches a
Qwen3-style chat template and saves the lot with `PreTrainedTokenizerFast.save_pretrained`. The result loads with
`transformers.AutoTokenizer.from_pretrained(path)` and never touches the network.

`len(tokenizer) == VOCAB_SIZE` (512) so it fits the "tiny" model preset (vocab_size 512).
"""

from __future__ import annotations

import os

VOCAB_SIZE = 512

# Added tokens, in Qwen3's order. <think>/</think> are added but NOT special in Qwen3 (decode keeps them).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]

# Qwen2/Qwen3 pre-tokenizer split regex.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Qwen3 (hybrid thinking) chat template, tools branch omitted: system/user/assistant turns, reasoning stripped
# from assistant turns before the last user query, and the empty think block added to the generation prompt when
# enable_thinking=False.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string"
    " and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}"
    "{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}"
    "{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Fixed training text: chat glue, math prose, LaTeX. Any text still encodes (byte-level fallback).
_CORPUS = [
    "user\nassistant\nsystem\n",
    "Question: What is 12 + 30?\nAnswer: 42\n\n",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "The answer is \\boxed{204}. So the final answer is \\boxed{\\frac{1}{2}}.",
    "Let x be a real number such that x^2 - 5x + 6 = 0. Then x = 2 or x = 3.",
    "Every morning Aya goes for a walk and stops at a coffee shop afterwards.",
    "Find the number of minutes the walk takes her, including the minutes spent in the shop.",
    "We have $\\frac{9}{s} + t = 4$ in hours, therefore the total is the sum of the parts.",
    "Okay, let me think about this problem. First, we compute the value of the expression.",
    "You are a helpful assistant. Think carefully before answering the question.",
    "Hello! How can I help you today? The weather is nice and the sun is shining.",
]


def build_tokenizer():
    """Return an in-memory `PreTrainedTokenizerFast` (deterministic: fixed corpus, single pass BPE training)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    n_added = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - n_added,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # Pad the merge budget deterministically if the corpus ran out of pairs, so len() is always VOCAB_SIZE.
    missing = VOCAB_SIZE - n_added - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    hf.chat_template = QWEN3_CHAT_TEMPLATE
    return hf


def make_tokenizer_dir(path: str | os.PathLike) -> str:
    """Build the test tokenizer and save it to `path` (created if needed); returns `str(path)`."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    build_tokenizer().save_pretrained(path)
    return path
