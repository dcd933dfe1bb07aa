"""Names and layouts: Hugging Face Qwen3 tensors <-> opd_jax stacked parameters.

HF stores one tensor per layer in torch `Linear` layout ([out, in]); opd_jax stacks layers on a leading axis
and keeps heads as their own axis ([in, heads, head_dim]). Each entry says how to turn one HF tensor into
one layer slice of our parameter, and back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from opd_jax.config.schema import ModelConfig


@dataclass(frozen=True)
class LayerTensor:
    ours: str  # stacked parameter name
    hf: str  # HF name with "{i}" for the layer index
    linear: bool  # torch Linear weight ([out, in]) that must be transposed


LAYER_TENSORS = (
    LayerTensor("attn_norm", "model.layers.{i}.input_layernorm.weight", False),
    LayerTensor("q", "model.layers.{i}.self_attn.q_proj.weight", True),
    LayerTensor("k", "model.layers.{i}.self_attn.k_proj.weight", True),
    LayerTensor("v", "model.layers.{i}.self_attn.v_proj.weight", True),
    LayerTensor("q_norm", "model.layers.{i}.self_attn.q_norm.weight", False),
    LayerTensor("k_norm", "model.layers.{i}.self_attn.k_norm.weight", False),
    LayerTensor("o", "model.layers.{i}.self_attn.o_proj.weight", True),
    LayerTensor("mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", False),
    LayerTensor("gate", "model.layers.{i}.mlp.gate_proj.weight", True),
    LayerTensor("up", "model.layers.{i}.mlp.up_proj.weight", True),
    LayerTensor("down", "model.layers.{i}.mlp.down_proj.weight", True),
)
# Non-layer tensors: ours -> (hf name, is a torch Linear weight).
GLOBAL_TENSORS = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}


def layer_slice_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    c = cfg
    return {
        "attn_norm": (c.hidden_size,), "mlp_norm": (c.hidden_size,),
        "q_norm": (c.head_dim,), "k_norm": (c.head_dim,),
        "q": (c.hidden_size, c.num_heads, c.head_dim),
        "k": (c.hidden_size, c.num_kv_heads, c.head_dim),
        "v": (c.hidden_size, c.num_kv_heads, c.head_dim),
        "o": (c.num_heads, c.head_dim, c.hidden_size),
        "gate": (c.hidden_size, c.intermediate_size), "up": (c.hidden_size, c.intermediate_size),
        "down": (c.intermediate_size, c.hidden_size),
    }[name]


def hf_to_ours(t: np.ndarray, linear: bool, our_shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor -> our layout (transpose Linear weights, then split the head axis)."""
    if linear:
        t = t.T
    if t.size != int(np.prod(our_shape)):
        raise ValueError(f"size mismatch: HF tensor {t.shape} cannot become {our_shape}")
    return t.reshape(our_shape)


def ours_to_hf(t: np.ndarray, linear: bool, name: str) -> np.ndarray:
    """Our layout -> one HF tensor (merge head axes, transpose Linear weights)."""
    if linear:
        if name == "o":  # [heads, head_dim, hidden] -> [heads*head_dim, hidden]
            t = t.reshape(-1, t.shape[-1])
        else:  # [in, ...out] -> [in, out]
            t = t.reshape(t.shape[0], -1)
        t = t.T
    return np.ascontiguousarray(t)


def hf_expected_names(cfg: ModelConfig) -> set[str]:
    names = {lt.hf.format(i=i) for lt in LAYER_TENSORS for i in range(cfg.num_layers)}
    names |= {hf for ours, (hf, _) in GLOBAL_TENSORS.items() if not (ours == "lm_head" and cfg.tie_embeddings)}
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
