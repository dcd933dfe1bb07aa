"""Analytic FLOP counts for Qwen3-style dense models and the OPD / SFT / RL steps built on them.

What is counted (a multiply-add is 2 FLOPs, matching XLA's `cost_analysis()` for dot ops):
  * every weight matmul of a layer: q, k, v, o, gate, up, down (2 * params per token);
  * the attention score (q.k) and value (p.v) matmuls: 4 * num_heads * head_dim per (query, key) pair per layer;
    K/V are not repeated for GQA, so this uses num_heads, not num_kv_heads;
  * the lm_head matmul (vocab * hidden per logit position), tied or not;
  * LoRA adapters, unmerged: 2 * rank * (in + out) per token per adapted matrix.
What is not counted: the embedding lookup (a gather), RMSNorm, RoPE, softmax, SiLU, residual adds, log-softmax
over the vocabulary, the optimizer update. These are O(hidden) or O(vocab) per token instead of O(hidden^2),
so they are small for real models but NOT for toy ones (vocab 512, hidden 64): compare against XLA with a
tolerance, or with models whose hidden size is a few hundred or more.

Attention modes:
  * "causal": only unmasked (query, key) pairs, i.e. the minimum work (flash/splash kernels with block skipping
    approach it). A full forward over S tokens has S(S+1)/2 pairs.
  * "dense": every query against every key slot of the buffer it is computed against, masked or not. That is
    what a plain `einsum + mask` computes and what XLA counts: S*S for a forward, P*P for a prefill, and
    `cache_len` per decode step. The sampler's decode reads only the filled 64-slot blocks of the cache, so
    its real attention work lies between the two.

Decoding convention: the prefill runs the prompt and takes logits at its last position only (token 1); then
`new_tokens - 1` decode steps each feed one token and take its logits. So decoding N tokens processes
P + N - 1 positions, with N lm_head positions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from opd_jax.config.presets import resolve_model_config
from opd_jax.config.schema import ModelConfig
from opd_jax.models.weights import LAYER_WEIGHTS, MATRICES

AttentionMode = Literal["causal", "dense"]
LORA_TARGETS: tuple[str, ...] = MATRICES


@dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # bf16 dense peak FLOP/s per chip
    hbm_gb: float
    hbm_bandwidth: float  # bytes/s: what a memory-bound step (decode) can at best stream


# Peak bf16 FLOP/s and HBM per chip: TPUs from OPD_NOTES.md ("Chips"), HBM bandwidths from Google Cloud's TPU
# system-architecture pages (v4 1,228 GB/s, v5e 819, v5p 2,765, v6e 1,640); GPUs from NVIDIA's data sheets
# (dense bf16 tensor-core peak; H200: 141 GB at 4.8 TB/s).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32.0, 1228e9),
    "v5e": Chip("v5e", 197e12, 16.0, 819e9),
    "v5p": Chip("v5p", 459e12, 95.0, 2765e9),
    "v6e": Chip("v6e", 918e12, 32.0, 1640e9),
    "a100": Chip("a100", 312e12, 80.0, 2039e9),
    "h100": Chip("h100", 989e12, 80.0, 3350e9),
    "h200": Chip("h200", 989e12, 141.0, 4800e9),
    "b200": Chip("b200", 2250e12, 180.0, 8000e9),
}
# XLA's fp32 matmul peak measured on the 2-core CPU dev host (OPD_NOTES.md, "CPU matmul speed"): a CPU "chip".
CPU = Chip("cpu", 3.4e11, float("nan"), float("nan"))


def chip_of(device) -> Chip | None:
    """The `CHIPS` entry of a `jax.Device` (by its `device_kind`, e.g. "TPU v5p", "TPU v5 lite", "NVIDIA H200"),
    `CPU` for a CPU device, None when unknown."""
    kind = str(getattr(device, "device_kind", "")).lower().replace(" ", "").replace("lite", "e")
    for name, chip in CHIPS.items():
        if name in kind:
            return chip
    return CPU if getattr(device, "platform", "") == "cpu" else None


def peak_flops_per_device(device) -> float:
    """bf16 peak FLOP/s of one device, for MFU (NaN when unknown). `OPD_PEAK_FLOPS` overrides it."""
    if "OPD_PEAK_FLOPS" in os.environ:
        return float(os.environ["OPD_PEAK_FLOPS"])
    chip = chip_of(device)
    return chip.peak_flops if chip is not None else float("nan")


# ----------------------------------------------------------------------------------------------- parameter counts
def _matrix_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each weight matrix of one layer, from the model's weight table."""
    return {name: LAYER_WEIGHTS[name].matrix(cfg) for name in MATRICES}


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Weight-matrix parameters of one decoder layer (norm weights excluded: they do no matmul)."""
    return sum(i * o for i, o in _matrix_shapes(resolve_model_config(cfg)).values())


def lm_head_params(cfg: ModelConfig) -> int:
    cfg = resolve_model_config(cfg)
    return cfg.vocab_size * cfg.hidden_size


def matmul_params(cfg: ModelConfig, *, include_lm_head: bool = True) -> int:
    """Parameters that take part in a per-token matmul: all layers (+ lm_head); never the embedding gather."""
    cfg = resolve_model_config(cfg)
    return cfg.num_layers * layer_matmul_params(cfg) + (lm_head_params(cfg) if include_lm_head else 0)


def lora_params(cfg: ModelConfig, rank: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    """Parameters of rank-`rank` adapters (A: in x r, B: r x out) on `targets` in every layer."""
    if rank <= 0:
        return 0
    cfg = resolve_model_config(cfg)
    shapes = _matrix_shapes(cfg)
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; valid: {list(shapes)}")
    return cfg.num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """K and V for every layer: 2 * layers * kv_heads * head_dim * bytes (8B: 147,456; 32B: 262,144)."""
    cfg = resolve_model_config(cfg)
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def attention_flops(cfg: ModelConfig, query_key_pairs: float) -> float:
    """Score + value matmul FLOPs over all layers for this many (query, key) pairs."""
    cfg = resolve_model_config(cfg)
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * query_key_pairs


def _causal_pairs(seq_len: int) -> int:
    return seq_len * (seq_len + 1) // 2


# ------------------------------------------------------------------------------------------------------ forward
def forward_flops_breakdown(
    cfg: ModelConfig,
    batch: int,
    seq_len: int,
    *,
    context_len: float | None = None,
    lm_head_tokens: int | None = None,
    lora_rank: int = 0,
    lora_targets: Sequence[str] = LORA_TARGETS,
    attention: AttentionMode = "causal",
) -> dict[str, float]:
    """One forward over `batch` sequences of `seq_len` tokens, split into matmul / lora / attention / lm_head.

    context_len: keys each query attends to (overrides `attention`); default: causal S(S+1)/2 pairs per
    sequence, or S*S for "dense". lm_head_tokens: logit positions per sequence (default all `seq_len`).
    """
    cfg = resolve_model_config(cfg)
    tokens = batch * seq_len
    if context_len is not None:
        pairs = float(tokens) * context_len
    elif attention == "dense":
        pairs = float(batch) * seq_len * seq_len
    else:
        pairs = float(batch) * _causal_pairs(seq_len)
    head_positions = batch * (seq_len if lm_head_tokens is None else lm_head_tokens)
    out = {
        "matmul": 2.0 * cfg.num_layers * layer_matmul_params(cfg) * tokens,
        "lora": 2.0 * lora_params(cfg, lora_rank, lora_targets) * tokens,
        "attention": attention_flops(cfg, pairs),
        "lm_head": 2.0 * lm_head_params(cfg) * head_positions,
    }
    out["total"] = sum(out.values())
    return out


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int, **kw) -> float:
    """Prefill / full-sequence forward FLOPs: `forward_flops_breakdown(...)["total"]` (same arguments)."""
    return forward_flops_breakdown(cfg, batch, seq_len, **kw)["total"]


# ------------------------------------------------------------------------------------------------------- decode
def decode_flops_breakdown(
    cfg: ModelConfig,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    *,
    lora_rank: int = 0,
    lora_targets: Sequence[str] = LORA_TARGETS,
    attention: AttentionMode = "causal",
    cache_len: int | None = None,
) -> dict[str, float]:
    """Prefill of the prompt + `new_tokens - 1` single-token steps with a KV cache (see the module docstring).

    "causal": decode step j attends to the P + j + 1 keys written so far. "dense": the prefill is P x P and every
    decode step attends over the whole static cache, `cache_len` slots (default P + new_tokens).
    """
    cfg = resolve_model_config(cfg)
    if new_tokens <= 0:
        return {"matmul": 0.0, "lora": 0.0, "attention": 0.0, "lm_head": 0.0, "total": 0.0}
    prefill = forward_flops_breakdown(
        cfg, batch, prompt_len, lm_head_tokens=1, lora_rank=lora_rank, lora_targets=lora_targets, attention=attention
    )
    steps = new_tokens - 1
    if attention == "dense":
        pairs = float(steps) * (prompt_len + new_tokens if cache_len is None else cache_len)
    else:
        pairs = float(steps) * (prompt_len + 1) + steps * (steps - 1) / 2
    step = {
        "matmul": 2.0 * cfg.num_layers * layer_matmul_params(cfg) * batch * steps,
        "lora": 2.0 * lora_params(cfg, lora_rank, lora_targets) * batch * steps,
        "attention": attention_flops(cfg, batch * pairs),
        "lm_head": 2.0 * lm_head_params(cfg) * batch * steps,
    }
    out = {k: prefill[k] + step[k] for k in step}
    out["total"] = sum(out.values())
    return out


def decode_flops(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, **kw) -> float:
    """Sampling FLOPs, prefill + KV-cached decode: `decode_flops_breakdown(...)["total"]` (same arguments)."""
    return decode_flops_breakdown(cfg, batch, prompt_len, new_tokens, **kw)["total"]


# -------------------------------------------------------------------------------------------------------- train
def train_flops(
    cfg: ModelConfig,
    batch: int,
    seq_len: int,
    *,
    lm_head_tokens: int | None = None,
    lora_rank: int = 0,
    lora_targets: Sequence[str] = LORA_TARGETS,
    attention: AttentionMode = "causal",
    context_len: float | None = None,
    remat: str | None = None,
) -> float:
    """Forward + backward FLOPs of one training step (optimizer excluded).

    Full fine-tuning: 3x forward (backward = dX + dW, each as big as the forward). lm_head_tokens=N puts the
    lm_head on N positions per sequence only, e.g. the completion. LoRA (rank > 0): frozen base matmuls and
    lm_head need dX only (2x), adapters 3x. Attention has no weights; its backward is 2x forward either way.
    remat (default cfg.remat): "full" re-runs each layer's forward in the backward (+1x layers, not lm_head);
    "dots" saves matmul outputs, so no matmul FLOPs are recomputed. Chunked attention (cfg.attention_chunk below
    seq_len) recomputes each block's scores in its backward: +0.5x attention (the Q.K^T half). Pass
    remat="none" for model FLOPs (MFU): no recomputation of either kind.
    """
    cfg = resolve_model_config(cfg)
    fwd = forward_flops_breakdown(
        cfg,
        batch,
        seq_len,
        context_len=context_len,
        lm_head_tokens=lm_head_tokens,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        attention=attention,
    )
    frozen_mult = 2.0 if lora_rank > 0 else 3.0
    total = frozen_mult * (fwd["matmul"] + fwd["lm_head"]) + 3.0 * (fwd["lora"] + fwd["attention"])
    if (cfg.remat if remat is None else remat) == "full":
        total += fwd["matmul"] + fwd["lora"] + fwd["attention"]
    if remat != "none" and 0 < cfg.attention_chunk < seq_len:
        total += 0.5 * fwd["attention"]
    return total


# --------------------------------------------------------------------------------------------------- algorithms
def _step_dict(sampling: float, scoring: float, training: float) -> dict[str, float]:
    return {
        "student_sampling": sampling,
        "teacher_scoring": scoring,
        "student_training": training,
        "student_total": sampling + training,
        "teacher_total": scoring,
        "total": sampling + scoring + training,
    }


def opd_step_flops(
    student: ModelConfig,
    teacher: ModelConfig,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    lora_rank: int = 0,
    *,
    lora_targets: Sequence[str] = LORA_TARGETS,
    attention: AttentionMode = "causal",
    cache_len: int | None = None,
    logits: Literal["completion", "all"] = "completion",
    remat: str | None = None,
) -> dict[str, float]:
    """One on-policy distillation step over `batch` sequences (prompts x samples).

    student_sampling: prefill + decode of `new_tokens`. teacher_scoring: one frozen forward over the full
    prompt + completion. student_training: fwd + bwd over the same sequence (the importance ratio uses these
    logprobs). logits="completion" puts the lm_head on the `new_tokens` positions whose logprobs the loss needs;
    "all" on every position (what an implementation that does not slice computes).
    """
    seq_len = prompt_len + new_tokens
    head = new_tokens if logits == "completion" else None
    sampling = decode_flops(
        student,
        batch,
        prompt_len,
        new_tokens,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        attention=attention,
        cache_len=cache_len,
    )
    scoring = forward_flops(teacher, batch, seq_len, lm_head_tokens=head, attention=attention)
    training = train_flops(
        student,
        batch,
        seq_len,
        lm_head_tokens=head,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        attention=attention,
        remat=remat,
    )
    return _step_dict(sampling, scoring, training)


def rl_step_flops(
    policy: ModelConfig,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    lora_rank: int = 0,
    *,
    reference: ModelConfig | None = None,
    lora_targets: Sequence[str] = LORA_TARGETS,
    attention: AttentionMode = "causal",
    cache_len: int | None = None,
    logits: Literal["completion", "all"] = "completion",
    remat: str | None = None,
) -> dict[str, float]:
    """One on-policy RL step: the OPD step with a task reward instead of a teacher.

    A `reference` model (KL regularizer) is scored like the OPD teacher; without one `teacher_scoring` is 0.
    Reward computation (a verifier) is not FLOPs on the accelerator and is not counted.
    """
    kw = dict(lora_targets=lora_targets, attention=attention, cache_len=cache_len, logits=logits, remat=remat)
    if reference is not None:
        return opd_step_flops(policy, reference, batch, prompt_len, new_tokens, lora_rank, **kw)
    out = opd_step_flops(policy, policy, batch, prompt_len, new_tokens, lora_rank, **kw)
    return _step_dict(out["student_sampling"], 0.0, out["student_training"])


def sft_flops(
    student: ModelConfig,
    batch: int,
    seq_len: int,
    *,
    teacher: ModelConfig | None = None,
    prompt_len: int = 0,
    lora_rank: int = 0,
    lora_targets: Sequence[str] = LORA_TARGETS,
    attention: AttentionMode = "causal",
    logits: Literal["completion", "all"] = "all",
    remat: str | None = None,
) -> dict[str, float]:
    """Supervised fine-tuning on `batch` sequences of `seq_len` tokens, optionally with the teacher's data cost.

    teacher: if given, `teacher_scoring` holds the cost of sampling the data: prefill of `prompt_len` tokens
    + decode of `seq_len - prompt_len` tokens, one sample per example (no rejection sampling). The keys match
    `opd_step_flops`: student_sampling is 0 (SFT does not sample from the student).
    """
    completion = seq_len - prompt_len
    head = completion if logits == "completion" else None
    training = train_flops(
        student,
        batch,
        seq_len,
        lm_head_tokens=head,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        attention=attention,
        remat=remat,
    )
    data = 0.0
    if teacher is not None:
        if prompt_len <= 0 or completion <= 0:
            raise ValueError("teacher sampling needs 0 < prompt_len < seq_len")
        data = decode_flops(teacher, batch, prompt_len, completion, attention=attention)
    return _step_dict(0.0, data, training)


# ------------------------------------------------------------------------------------------------------- chips
def tpu_hours(flops: float, chip: str | Chip, mfu: float, num_chips: int | None = None) -> float:
    """Hours to execute `flops` at `mfu` of the chip's bf16 peak.

    num_chips=None: chip-hours (the cost); otherwise wall-clock hours on that many chips (perfect scaling).
    """
    spec = chip if isinstance(chip, Chip) else CHIPS.get(chip.lower())
    if spec is None:
        raise ValueError(f"unknown chip {chip!r}; valid: {', '.join(CHIPS)}")
    if not 0.0 < mfu <= 1.0:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    chip_hours = flops / (spec.peak_flops * mfu) / 3600.0
    return chip_hours if num_chips is None else chip_hours / num_chips
