"""Named model dimensions and the rule that merges them into a `ModelConfig`.

The loader expands a preset when a config is loaded (`config.loader`: fields the config sets explicitly win, whatever
they equal); `resolve_model_config` is the same merge for a `ModelConfig` built in Python, where an explicit field can
only be told apart from an unset one by differing from the `ModelConfig()` default.

The Qwen3 entries copy the official Hugging Face `config.json` files (hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, rope_theta, rms_norm_eps,
tie_word_embeddings, vocab_size). `tiny` and `bench-3m` are toy models for tests and CPU benchmarks.
"""

from __future__ import annotations

import dataclasses
import difflib

from opd_jax.config.schema import ModelConfig

_QWEN3_COMMON: dict = {"vocab_size": 151_936, "head_dim": 128, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6}


def _qwen3(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, tied: bool) -> dict:
    return {
        **_QWEN3_COMMON,
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "tie_embeddings": tied,
    }


PRESETS: dict[str, dict] = {
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, tied=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8, tied=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, tied=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, tied=False),
    "qwen3-8b-base": _qwen3(4096, 12288, 36, 32, 8, tied=False),  # the published OPD student; same dims as 8b
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, 8, tied=False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, 8, tied=False),
    # Unit-test model: equal to the ModelConfig defaults so `preset: tiny` and no preset agree.
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_embeddings": False,
    },
    # ~3.4M parameters: the CPU throughput reference point in OPD_NOTES.md.
    "bench-3m": {
        "vocab_size": 512,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 64,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_embeddings": False,
    },
}


def get_preset(name: str) -> dict:
    """The preset's fields; unknown names raise ValueError with the valid names and the closest match."""
    key = name.strip().lower()
    if key in PRESETS:
        return dict(PRESETS[key])
    close = difflib.get_close_matches(key, PRESETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown model preset {name!r}.{hint} Valid presets: {', '.join(sorted(PRESETS))}")


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Fill `cfg` from its preset; a field that differs from the `ModelConfig()` default counts as explicit.

    A field explicitly set to its default value cannot be told apart from an unset one, so the preset wins
    there (e.g. `tie_embeddings: false` on `qwen3-0.6b` stays tied). Resolving twice gives the same result.
    """
    if cfg.preset is None:
        return dataclasses.replace(cfg)
    preset = get_preset(cfg.preset)
    defaults = ModelConfig()
    merged = {
        key: (getattr(cfg, key) if getattr(cfg, key) != getattr(defaults, key) else value)
        for key, value in preset.items()
    }
    return dataclasses.replace(cfg, **merged)
