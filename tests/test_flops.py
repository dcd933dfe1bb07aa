"""Model presets, analytic FLOPs and the AIME'24 cost table (pure arithmetic: no JAX, runs in well under a second)."""

from __future__ import annotations

import dataclasses

import pytest

from experiments.aime24 import compute_table as ct
from opd_jax import flops as F
from opd_jax.config.presets import PRESETS, get_preset, resolve_model_config
from opd_jax.config.schema import ModelConfig
from opd_jax.models.weights import num_params


def _m(name: str, **kw) -> ModelConfig:
    return resolve_model_config(ModelConfig(preset=name, **kw))


# ------------------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize(
    "name, expected",
    [("qwen3-0.6b", 0.596e9), ("qwen3-1.7b", 1.72e9), ("qwen3-4b", 4.02e9), ("qwen3-8b", 8.19e9),
     ("qwen3-14b", 14.77e9), ("qwen3-32b", 32.76e9)],
)  # fmt: skip
def test_qwen3_param_counts_match_published_sizes(name: str, expected: float) -> None:
    assert num_params(_m(name)) == pytest.approx(expected, rel=0.005)


def test_preset_fields_and_embedding_tying() -> None:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, preset in PRESETS.items():
        assert set(preset) <= fields, name
    for name in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b"):
        assert PRESETS[name]["tie_embeddings"] is True
    for name in ("qwen3-8b", "qwen3-8b-base", "qwen3-14b", "qwen3-32b"):
        assert PRESETS[name]["tie_embeddings"] is False
        assert PRESETS[name]["vocab_size"] == 151_936 and PRESETS[name]["head_dim"] == 128
    assert PRESETS["qwen3-8b-base"] == PRESETS["qwen3-8b"]
    assert 3e6 < num_params(_m("bench-3m")) < 4e6


def test_tiny_preset_equals_schema_defaults() -> None:
    assert resolve_model_config(ModelConfig(preset="tiny")) == dataclasses.replace(ModelConfig(), preset="tiny")


def test_resolve_keeps_explicit_fields_and_is_idempotent() -> None:
    cfg = resolve_model_config(ModelConfig(preset="qwen3-8b", num_layers=4, dtype="bfloat16", hf_path="/ckpt"))
    assert (cfg.hidden_size, cfg.num_heads, cfg.vocab_size) == (4096, 32, 151_936)
    assert cfg.num_layers == 4  # explicit override wins over the preset's 36
    assert cfg.dtype == "bfloat16" and cfg.hf_path == "/ckpt"
    assert resolve_model_config(cfg) == cfg
    assert resolve_model_config(ModelConfig(preset="Qwen3-0.6B")).hidden_size == 1024  # case-insensitive


def test_resolve_without_preset_is_unchanged() -> None:
    cfg = ModelConfig(hidden_size=128)
    assert resolve_model_config(cfg) == cfg


def test_unknown_preset_lists_names_and_closest() -> None:
    with pytest.raises(ValueError, match="qwen3-8b") as info:
        resolve_model_config(ModelConfig(preset="qwen3-8"))
    assert "Did you mean" in str(info.value) and "bench-3m" in str(info.value)
    with pytest.raises(ValueError):
        get_preset("llama-7b")


def test_kv_cache_bytes_per_token_matches_notes() -> None:
    assert F.kv_cache_bytes_per_token(_m("qwen3-8b")) == 147_456  # "147 KB"
    assert F.kv_cache_bytes_per_token(_m("qwen3-32b")) == 262_144  # "262 KB"
    assert F.kv_cache_bytes_per_token(_m("qwen3-8b"), dtype_bytes=4) == 2 * 147_456
    # One stage-2 step's full student cache: 512 x 4 x 4096 tokens -> ~1.2 TB.
    assert 512 * 4 * 4096 * F.kv_cache_bytes_per_token(_m("qwen3-8b")) == pytest.approx(1.24e12, rel=0.01)


# -------------------------------------------------------------------------------------------------------- FLOPs
def test_embedding_excluded_lm_head_included() -> None:
    for name in ("qwen3-0.6b", "qwen3-8b"):
        cfg = _m(name)
        vh = cfg.vocab_size * cfg.hidden_size
        norms = cfg.num_layers * (2 * cfg.hidden_size + 2 * cfg.head_dim) + cfg.hidden_size
        gather = 0 if cfg.tie_embeddings else vh  # a tied embedding is the lm_head matmul's weight
        assert num_params(cfg) - F.matmul_params(cfg) == gather + norms


def test_forward_flops_hand_count_tiny() -> None:
    cfg = _m("tiny")  # h 64, mlp 128, 2 layers, 4 heads, 2 kv heads, head_dim 16, vocab 512
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    b, s = 3, 10
    expected = 2 * (2 * layer + 512 * 64) * b * s + 4 * 2 * 4 * 16 * b * s * (s + 1) / 2
    assert F.forward_flops(cfg, b, s) == pytest.approx(expected, rel=1e-12)
    dense = F.forward_flops(cfg, b, s, attention="dense")
    assert dense - F.forward_flops(cfg, b, s) == pytest.approx(4 * 2 * 4 * 16 * b * (s * s - s * (s + 1) / 2))
    parts = F.forward_flops_breakdown(cfg, b, s)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))


@pytest.mark.parametrize("name", ["qwen3-8b", "bench-3m"])
def test_decode_matches_forward_over_prompt_plus_new(name: str) -> None:
    cfg = _m(name)
    b, p, n = 4, 100, 1000
    dec = F.decode_flops(cfg, b, p, n)
    # Exact: decoding n tokens processes p + n - 1 positions with n lm_head positions.
    assert dec == pytest.approx(F.forward_flops(cfg, b, p + n - 1, lm_head_tokens=n), rel=1e-12)
    assert dec == pytest.approx(F.forward_flops(cfg, b, p + n, lm_head_tokens=n), rel=0.01)
    assert F.decode_flops(cfg, b, p, n, attention="dense") > dec
    assert F.decode_flops(cfg, b, p, 0) == 0.0


def test_train_flops_multipliers() -> None:
    cfg = _m("qwen3-8b")
    fwd = F.forward_flops(cfg, 2, 512)
    assert F.train_flops(cfg, 2, 512) == pytest.approx(3 * fwd)
    assert F.train_flops(dataclasses.replace(cfg, remat="full"), 2, 512) > 3 * fwd
    assert F.train_flops(dataclasses.replace(cfg, remat="full"), 2, 512, remat="none") == pytest.approx(3 * fwd)
    # chunked attention's backward recomputes Q.K^T: half the forward's attention FLOPs again (hardware FLOPs)
    attn = F.forward_flops_breakdown(cfg, 2, 512)["attention"]
    chunked = dataclasses.replace(cfg, attention_chunk=128)
    assert F.train_flops(chunked, 2, 512) == pytest.approx(3 * fwd + 0.5 * attn)
    assert F.train_flops(chunked, 2, 512, remat="none") == pytest.approx(3 * fwd)
    assert F.train_flops(chunked, 2, 128) == pytest.approx(F.train_flops(cfg, 2, 128))  # one chunk: dense
    lora = F.train_flops(cfg, 2, 512, lora_rank=128)
    assert 2 * fwd < lora < 3 * fwd  # frozen base: no weight gradients
    assert F.train_flops(cfg, 2, 512, lm_head_tokens=256) < 3 * fwd


def test_opd_step_flops_keys_and_scale() -> None:
    student, teacher = _m("qwen3-8b-base"), _m("qwen3-32b")
    out = F.opd_step_flops(student, teacher, 512 * 4, 128, 4000)
    assert set(out) == {"student_sampling", "teacher_scoring", "student_training", "total", "student_total",
                        "teacher_total"}  # fmt: skip
    assert out["total"] == pytest.approx(out["student_total"] + out["teacher_total"])
    assert out["student_total"] == pytest.approx(out["student_sampling"] + out["student_training"])
    # The blog's per-step arithmetic: teacher 2*N_32B*T, student 8*N_8B*T, T ~ 2048 * 4.1K tokens.
    assert out["teacher_total"] * 150 == pytest.approx(8.4e19, rel=0.1)
    assert out["student_total"] * 150 == pytest.approx(8.2e19, rel=0.1)
    rl = F.rl_step_flops(student, 8, 64, 64)
    assert rl["teacher_scoring"] == 0.0 and rl["total"] == pytest.approx(rl["student_total"])
    sft = F.sft_flops(student, 8, 128, teacher=teacher, prompt_len=32)
    assert sft["student_sampling"] == 0.0 and sft["teacher_total"] == F.decode_flops(teacher, 8, 32, 96)


def test_tpu_hours() -> None:
    assert F.CHIPS["v5p"].peak_flops == 459e12 and F.CHIPS["v5p"].hbm_gb == 95
    hours = F.tpu_hours(1.66e20, "v5p", 0.35)
    assert hours == pytest.approx(1.66e20 / (459e12 * 0.35) / 3600)
    assert F.tpu_hours(1.66e20, "v5p", 0.35, num_chips=64) == pytest.approx(hours / 64)
    with pytest.raises(ValueError):
        F.tpu_hours(1e20, "v7", 0.35)


# ---------------------------------------------------------------------------------------------------- the table
def test_published_ratios_reproduce_blog() -> None:
    r = ct.published_ratios()
    assert round(r["sft2m_vs_opd"], 1) == 9.0  # 1.5e21 / 1.66e20
    assert 29.0 <= r["sft2m_with_teacher_vs_opd"] <= 31.0  # "~30x": 4.9e21 / 1.66e20 = 29.5
    assert round(r["rl_vs_opd_gpu_hours"], 1) == 10.0  # 17,920 / 1,800


def test_report_headlines() -> None:
    lines, head = ct.build_report(published_only=True)
    assert head["sft2m_vs_opd"] == "9.0x" and head["sft2m_with_teacher_vs_opd"] == "29.5x"
    assert float(head["stage2_v5p_hours"]) == pytest.approx(287, abs=1)
    assert lines[-1] == f"{list(head)[-1]}: {list(head.values())[-1]}"
    _, head = ct.build_report()
    assert "sft2m_vs_opd_analytic" in head and head["sft2m_vs_opd"] == "9.0x"


def test_analytic_opd_row_close_to_published() -> None:
    rows = ct.analytic_rows(ct.Assumptions())
    assert rows["OPD"].student_flops == pytest.approx(8.2e19, rel=0.1)
    assert rows["OPD"].teacher_flops == pytest.approx(8.4e19, rel=0.1)
    assert rows["SFT-2M"].student_flops == pytest.approx(4 * rows["SFT-400K"].student_flops)
