"""The one table of Qwen3's weights: for each parameter its shape, logical axes, Hugging Face tensor name and, for a
matrix, the einsum that applies it.

Every reader of the layout uses this table: the model (`qwen3.py` builds and applies the weights), the HF mapping
(`weight_mapping.py`, `hf_io.py` name, transpose and reshape tensors) and the FLOP counts (`opd_jax.flops` sums the
matrices). As levanter's `Qwen3Config` owns its HF mapping, adding a weight here is the only place to add it.

Layer weights are stored stacked: the parameter has a leading `layers` axis before `shape(cfg)`, and the HF name
holds `{i}` for the layer index. Matrices keep heads as their own axis ([in, heads, head_dim] / [heads, head_dim,
out]); HF stores a torch `Linear` ([out, in], heads merged), so `linear` weights are transposed and reshaped on the
way in and out. This module imports no JAX.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from opd_jax.config.presets import resolve_model_config
from opd_jax.config.schema import ModelConfig


@dataclass(frozen=True)
class Weight:
    shape: Callable[[ModelConfig], tuple[int, ...]]  # one layer's slice for layer weights
    axes: tuple[str, ...]  # logical axes of `shape` (opd_jax.mesh.RULES maps them to mesh axes)
    hf: str  # HF tensor name; "{i}" is the layer index
    linear: bool = False  # a torch Linear weight in HF ([out, in], heads merged)
    einsum: str | None = None  # matrices: h @ W as an einsum over [batch, time, ...] activations
    n_in: int = 1  # how many leading dims of `shape` are the matrix's input (o: heads and head_dim)

    @property
    def is_norm(self) -> bool:
        return self.axes == ("norm",) or self.axes == ("head_dim",)

    def matrix(self, cfg: ModelConfig) -> tuple[int, int]:
        """(in, out) features of a matrix weight."""
        s = self.shape(cfg)
        return math.prod(s[: self.n_in]), math.prod(s[self.n_in:])


_L = "model.layers.{i}."
LAYER_WEIGHTS: dict[str, Weight] = {
    "attn_norm": Weight(lambda c: (c.hidden_size,), ("norm",), _L + "input_layernorm.weight"),
    "q": Weight(lambda c: (c.hidden_size, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"),
                _L + "self_attn.q_proj.weight", True, "btd,dhk->bthk"),
    "k": Weight(lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                _L + "self_attn.k_proj.weight", True, "btd,dhk->bthk"),
    "v": Weight(lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                _L + "self_attn.v_proj.weight", True, "btd,dhk->bthk"),
    "q_norm": Weight(lambda c: (c.head_dim,), ("head_dim",), _L + "self_attn.q_norm.weight"),
    "k_norm": Weight(lambda c: (c.head_dim,), ("head_dim",), _L + "self_attn.k_norm.weight"),
    "o": Weight(lambda c: (c.num_heads, c.head_dim, c.hidden_size), ("heads", "head_dim", "embed"),
                _L + "self_attn.o_proj.weight", True, "bthk,hkd->btd", n_in=2),
    "mlp_norm": Weight(lambda c: (c.hidden_size,), ("norm",), _L + "post_attention_layernorm.weight"),
    "gate": Weight(lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), _L + "mlp.gate_proj.weight",
                   True, "btd,df->btf"),
    "up": Weight(lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), _L + "mlp.up_proj.weight",
                 True, "btd,df->btf"),
    "down": Weight(lambda c: (c.intermediate_size, c.hidden_size), ("mlp", "embed"), _L + "mlp.down_proj.weight",
                   True, "btf,fd->btd"),
}
GLOBAL_WEIGHTS: dict[str, Weight] = {
    "embed": Weight(lambda c: (c.vocab_size, c.hidden_size), ("vocab", "embed"), "model.embed_tokens.weight"),
    "final_norm": Weight(lambda c: (c.hidden_size,), ("norm",), "model.norm.weight"),
    # absent when cfg.tie_embeddings (the head is the transposed embedding)
    "lm_head": Weight(lambda c: (c.hidden_size, c.vocab_size), ("embed", "vocab"), "lm_head.weight", True),
}
# The layer matrices, in order: what LoRA may adapt and what FLOPs count per token.
MATRICES: tuple[str, ...] = tuple(name for name, w in LAYER_WEIGHTS.items() if w.einsum is not None)


def weight(name: str) -> Weight:
    """The table entry of parameter `name` (a layer weight or a global one). Raises KeyError naming the valid ones."""
    if name in LAYER_WEIGHTS:
        return LAYER_WEIGHTS[name]
    if name in GLOBAL_WEIGHTS:
        return GLOBAL_WEIGHTS[name]
    raise KeyError(f"no weight {name!r} in the Qwen3 table; known: {sorted(LAYER_WEIGHTS) + sorted(GLOBAL_WEIGHTS)}")


__all__ = ["Weight", "LAYER_WEIGHTS", "GLOBAL_WEIGHTS", "MATRICES", "weight"]


def num_params(cfg: ModelConfig) -> int:
    """Total parameters from this table: embeddings (lm_head once more when untied), every layer weight, norms
    included. A preset in `cfg` is resolved first."""
    cfg = resolve_model_config(cfg)
    layer = sum(math.prod(w.shape(cfg)) for w in LAYER_WEIGHTS.values())
    glob = sum(math.prod(w.shape(cfg)) for name, w in GLOBAL_WEIGHTS.items()
               if not (name == "lm_head" and cfg.tie_embeddings))
    return glob + cfg.num_layers * layer
