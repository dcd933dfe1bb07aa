"""Tiny random HF Qwen3 models built locally (no download), and the same weights as an opd_jax model."""

from __future__ import annotations

import jax.numpy as jnp
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd_jax.models.qwen3 import Qwen3, build_model
from opd_jax.models.weight_mapping import config_from_hf, params_from_hf


def tiny_hf(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    kw = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rope_theta=10000.0)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**kw)).eval()
    with torch.no_grad():  # HF inits norms to 1; randomize them so the test sees every weight
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def ours_from_hf(hf: Qwen3ForCausalLM) -> Qwen3:
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    cfg = config_from_hf(hf.config.to_dict())
    m = build_model(cfg)
    for name, arr in params_from_hf(sd, cfg).items():
        getattr(m, name)[...] = jnp.asarray(arr)
    return m
