"""Hugging Face Qwen3 <-> opd_jax: config.json <-> `ModelConfig`, and one HF tensor <-> one slice of our parameter.

HF stores one tensor per layer in torch `Linear` layout ([out, in]); opd_jax stacks layers on a leading axis and
keeps heads as their own axis ([in, heads, head_dim]). Which tensor is which, and its shapes, come from the one
weight table, `opd_jax.models.weights`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from opd_jax.config.schema import ModelConfig
from opd_jax.models.weights import GLOBAL_WEIGHTS, LAYER_WEIGHTS, weight


def hf_to_ours(t: np.ndarray, linear: bool, our_shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor -> our layout (transpose Linear weights, then split the head axis)."""
    if linear:
        t = t.T
    if t.size != int(np.prod(our_shape)):
        raise ValueError(f"size mismatch: HF tensor {t.shape} cannot become {our_shape}")
    return t.reshape(our_shape)


def ours_to_hf(t: np.ndarray, name: str) -> np.ndarray:
    """One slice of our parameter `name` (one layer of a stacked weight) -> its HF tensor: input and output dims
    merged (e.g. o: [heads, head_dim, hidden] -> [heads*head_dim, hidden]), then Linear weights transposed."""
    w = weight(name)
    if w.linear:
        t = t.reshape(int(np.prod(t.shape[: w.n_in])), -1).T
    return np.ascontiguousarray(t)


def params_from_hf(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """An in-memory HF state dict (name -> numpy array, e.g. a torch model's `state_dict()`) -> our pure params
    dict of `build_model(cfg)` (numpy, stacked layers). Raises KeyError naming a missing HF tensor."""
    out = {name: np.stack([hf_to_ours(state_dict[w.hf.format(i=i)], w.linear, w.shape(cfg))
                           for i in range(cfg.num_layers)]) for name, w in LAYER_WEIGHTS.items()}
    for name, w in GLOBAL_WEIGHTS.items():
        if name == "lm_head" and cfg.tie_embeddings:
            continue
        out[name] = hf_to_ours(state_dict[w.hf], w.linear, w.shape(cfg))
    return out


def hf_expected_names(cfg: ModelConfig) -> set[str]:
    """Every HF tensor name a checkpoint of `cfg` holds."""
    names = {w.hf.format(i=i) for w in LAYER_WEIGHTS.values() for i in range(cfg.num_layers)}
    names |= {w.hf for ours, w in GLOBAL_WEIGHTS.items() if not (ours == "lm_head" and cfg.tie_embeddings)}
    return names


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from an HF Qwen3 `config.json` dict."""
    if hf.get("model_type") not in (None, "qwen3"):
        raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not a Qwen3 dense model")
    heads = hf["num_attention_heads"]
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 1e6))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    return dataclasses.replace(cfg, **overrides)  # a misspelled override raises


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "max_position_embeddings": 40960,
        "torch_dtype": cfg.param_dtype,
    }
