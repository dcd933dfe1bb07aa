"""Model shapes the benchmarks take with `--model` (`opd_step.py`, `sampler.py`), and how they run torch.

- "tiny": the CPU defaults (a 3.4M-param student, an 11M-param teacher, vocab 512, fp32).
- "qwen3-0.6b": issue #16's GPU shapes: a Qwen3-0.6B-shaped student with an untied head (752M parameters, fp32
  params, bf16 compute) and a Qwen3-1.7B-shaped teacher with an untied head (2.03B, bf16), vocabulary 151,936,
  128-token prompts, 256 new tokens. Dimensions from the Qwen3 model cards (hidden 1024 / 2048, intermediate
  3072 / 6144, 28 layers, 16 query / 8 KV heads, head_dim 128, rope theta 1e6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TINY_STUDENT = dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=64)
TINY_TEACHER = dict(vocab_size=512, hidden_size=384, intermediate_size=1152, num_layers=6, num_heads=6, num_kv_heads=2,
                    head_dim=64)
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                  num_kv_heads=8, head_dim=128, rope_theta=1e6, param_dtype="float32", dtype="bfloat16")
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                  num_kv_heads=8, head_dim=128, rope_theta=1e6, param_dtype="bfloat16", dtype="bfloat16")


@dataclass(frozen=True)
class Shapes:
    student: dict  # opd_jax ModelConfig fields
    teacher: dict
    prompt_len: int
    sampler_new_tokens: list[int] = field(default_factory=list)  # sampler.py's default --new-tokens
    opd_new_tokens: int = 64  # opd_step.py's default --new-tokens


MODELS: dict[str, Shapes] = {
    "tiny": Shapes(TINY_STUDENT, TINY_TEACHER, prompt_len=32, sampler_new_tokens=[64, 256], opd_new_tokens=64),
    "qwen3-0.6b": Shapes(QWEN3_0_6B, QWEN3_1_7B, prompt_len=128, sampler_new_tokens=[256], opd_new_tokens=256),
}


def hf_config(dims: dict, max_positions: int = 4096):
    """A transformers `Qwen3Config` with the dimensions of `dims` (untied head, no stop token)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=dims["vocab_size"], hidden_size=dims["hidden_size"],
                       intermediate_size=dims["intermediate_size"], num_hidden_layers=dims["num_layers"],
                       num_attention_heads=dims["num_heads"], num_key_value_heads=dims["num_kv_heads"],
                       head_dim=dims["head_dim"], rope_theta=dims.get("rope_theta", 10000.0),
                       max_position_embeddings=max_positions, tie_word_embeddings=False, rms_norm_eps=1e-6,
                       pad_token_id=0, bos_token_id=None, eos_token_id=None)


def torch_device() -> tuple[str, bool]:
    """(torch device, whether to autocast to bf16): CUDA with bf16 autocast when torch sees a GPU, as a TRL or
    transformers user would run it; else the CPU in fp32."""
    import torch

    return ("cuda", True) if torch.cuda.is_available() else ("cpu", False)
