"""Values a run cannot work with, caught where the config is loaded: every field outside its domain, and every
pair of fields that must agree, each as one `ConfigError` line that names the field(s).

`validate(cfg)` runs inside `config_from_dict`, so every load path (files, overrides, sweeps, `config.yaml` of a
run) is checked before anything is built. What only the run can know (the devices for `mesh.*`, the vocabulary in a
checkpoint's config.json or a tokenizer, the names of the data sources for teacher routing) is checked at set-up,
before compiling, by the code that learns it (`mesh.make_mesh`, `train_state.check_vocabularies`,
`data.text_task`).
"""

from __future__ import annotations

import math

from opd_jax.config.schema import LORA_TARGETS, SOURCE_PREFIXES, ExperimentConfig, ModelConfig
from opd_jax.errors import ConfigError


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def _positive(value, field: str) -> None:
    _check(value >= 1, field, f"must be >= 1, got {value}")


def _non_negative(value, field: str) -> None:
    _check(value >= 0, field, f"must be >= 0, got {value}")


def _finite(value, field: str) -> None:
    _check(math.isfinite(value), field, f"must be a finite number, got {value}")


def _source(spec: str, field: str) -> None:
    prefix, sep, rest = spec.partition(":")
    _check(bool(sep and rest) and prefix in SOURCE_PREFIXES, field,
           f"{spec!r} is not PREFIX:VALUE with PREFIX in {', '.join(SOURCE_PREFIXES)}")


def _model(m: ModelConfig, field: str) -> None:
    if m.hf_path:  # dimensions come from the checkpoint's config.json (checked when it is read)
        return
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim"):
        _positive(getattr(m, name), f"{field}.{name}")
    _check(m.num_heads % m.num_kv_heads == 0, f"{field}.num_heads / {field}.num_kv_heads",
           f"{m.num_heads} query heads cannot be grouped over {m.num_kv_heads} KV heads (must divide)")
    _check(m.head_dim % 2 == 0, f"{field}.head_dim", f"RoPE rotates halves: must be even, got {m.head_dim}")
    _check(m.rope_theta > 0, f"{field}.rope_theta", f"must be > 0, got {m.rope_theta}")
    _check(m.rms_norm_eps > 0, f"{field}.rms_norm_eps", f"must be > 0, got {m.rms_norm_eps}")


def _models(cfg: ExperimentConfig) -> None:
    _model(cfg.student, "student")
    _non_negative(cfg.student.attention_chunk, "student.attention_chunk")
    names = [t.name for t in cfg.teachers]
    dup = sorted({n for n in names if names.count(n) > 1})
    _check(not dup, "teachers.*.name", f"teacher names must be unique, {dup} repeats")
    # routing: a teacher with no `datasets` takes the data no other teacher names; two of them would be ambiguous
    catch_all = [i for i, t in enumerate(cfg.teachers) if not t.datasets]
    if cfg.scores_with_teachers and len(cfg.teachers) > 1 and len(catch_all) > 1:
        fields = " / ".join(f"teachers.{i}.datasets" for i in catch_all)
        _check(False, fields, f"{len(catch_all)} teachers ({', '.join(repr(cfg.teachers[i].name) for i in catch_all)}) "
               "have no datasets; a teacher with no datasets takes the data no other teacher names, so at most one "
               "may leave it empty: name the datasets the others score")
    routed: dict[str, str] = {}
    for i, t in enumerate(cfg.teachers):
        f = f"teachers.{i}"
        _model(t.model, f"{f}.model")
        _non_negative(t.model.attention_chunk, f"{f}.model.attention_chunk")
        for d in t.datasets:
            _check(bool(d.strip()), f"{f}.datasets", "a dataset name is empty")
            _check(d not in routed, f"{f}.datasets", f"dataset {d!r} is already routed to teacher {routed.get(d)!r}")
            routed[d] = t.name
        # explicit vocabularies must agree when the step scores with the teacher: it scores the student's token ids
        if cfg.scores_with_teachers and not t.model.hf_path and not cfg.student.hf_path and not t.model.preset \
                and not cfg.student.preset:
            _check(t.model.vocab_size == cfg.student.vocab_size, f"student.vocab_size / {f}.model.vocab_size",
                   f"the student ({cfg.student.vocab_size}) and the teacher ({t.model.vocab_size}) must share one "
                   "vocabulary: the teacher scores the student's token ids")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Raise ConfigError naming the field(s) of the first value `cfg` cannot run with; return `cfg` otherwise."""
    c = cfg
    _non_negative(c.steps, "steps")
    _positive(c.groups_per_batch, "groups_per_batch")
    _positive(c.group_size, "group_size")
    _positive(c.micro_batches, "micro_batches")
    _check(c.batch_size % c.micro_batches == 0, "micro_batches / groups_per_batch x group_size",
           f"micro_batches={c.micro_batches} must divide the batch of {c.groups_per_batch} x {c.group_size} = "
           f"{c.batch_size} sequences")
    _positive(c.max_nonfinite_steps, "max_nonfinite_steps")
    _check(not (c.resume and c.overwrite), "resume / overwrite", "pass one of them, not both")
    _models(c)

    lo = c.lora
    _non_negative(lo.rank, "lora.rank")
    if lo.rank > 0:
        _check(lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha}")
        _check(bool(lo.targets), "lora.targets", "empty: name at least one of " + ", ".join(LORA_TARGETS))
        bad = [t for t in lo.targets if t not in LORA_TARGETS]
        _check(not bad, "lora.targets", f"unknown module(s) {bad}; valid: {', '.join(LORA_TARGETS)}")

    for axis in ("data", "fsdp", "tensor"):
        v = getattr(c.mesh, axis)
        _check(v >= 1 or v == -1, f"mesh.{axis}", f"must be positive or -1 (the remaining devices), got {v}")
    free = [a for a in ("data", "fsdp", "tensor") if getattr(c.mesh, a) == -1]
    _check(len(free) <= 1, "mesh", f"at most one axis may be -1, got {free}")

    s = c.sampling
    _positive(s.max_prompt_len, "sampling.max_prompt_len")
    _positive(s.max_new_tokens, "sampling.max_new_tokens")
    _check(s.temperature >= 0 and math.isfinite(s.temperature), "sampling.temperature",
           f"must be >= 0 (0 = greedy), got {s.temperature}")
    _non_negative(s.top_k, "sampling.top_k")
    _check(0 < s.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    _check(all(t >= 0 for t in s.stop_token_ids), "sampling.stop_token_ids", f"ids must be >= 0: {s.stop_token_ids}")
    _positive(s.micro_batches, "sampling.micro_batches")
    _check(c.batch_size % s.micro_batches == 0, "sampling.micro_batches / groups_per_batch x group_size",
           f"sampling.micro_batches={s.micro_batches} must divide the batch of {c.batch_size} sequences")
    if not c.student.hf_path and not c.student.preset:
        _check(all(t < c.student.vocab_size for t in s.stop_token_ids), "sampling.stop_token_ids",
               f"ids must be < student.vocab_size={c.student.vocab_size}: {s.stop_token_ids}")

    lc = c.loss
    _finite(lc.kl_penalty_coef, "loss.kl_penalty_coef")
    _finite(lc.task_reward_coef, "loss.task_reward_coef")
    _check(0 <= lc.discount <= 1, "loss.discount", f"must be in [0, 1], got {lc.discount}")
    _check(lc.clip_eps > 0, "loss.clip_eps", f"must be > 0, got {lc.clip_eps}")
    _check(0 <= lc.beta <= 1, "loss.beta", f"must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {lc.beta}")
    _positive(lc.topk, "loss.topk")
    if lc.kind.startswith("topk_") and not c.student.hf_path and not c.student.preset:
        _check(lc.topk < c.student.vocab_size, "loss.topk / student.vocab_size",
               f"top-{lc.topk} of a {c.student.vocab_size}-token vocabulary leaves no tail bucket")
    _non_negative(lc.kl_clip, "loss.kl_clip")
    _positive(lc.logprob_chunk, "loss.logprob_chunk")

    o = c.optim
    _check(o.learning_rate >= 0 and math.isfinite(o.learning_rate), "optim.learning_rate",
           f"must be >= 0, got {o.learning_rate}")
    _non_negative(o.warmup_steps, "optim.warmup_steps")
    _check(0 <= o.b1 < 1, "optim.b1", f"must be in [0, 1), got {o.b1}")
    _check(0 <= o.b2 < 1, "optim.b2", f"must be in [0, 1), got {o.b2}")
    _check(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
    _non_negative(o.weight_decay, "optim.weight_decay")
    _non_negative(o.grad_clip, "optim.grad_clip")

    _source(c.data.source, "data.source")
    _non_negative(c.data.max_examples, "data.max_examples")
    e = c.eval
    if e.source:
        _source(e.source, "eval.source")
    _non_negative(e.every, "eval.every")
    _positive(e.k, "eval.k")
    _non_negative(e.num_problems, "eval.num_problems")
    _check(e.temperature >= 0, "eval.temperature", f"must be >= 0 (0 = greedy), got {e.temperature}")
    _check(0 < e.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {e.top_p}")
    _non_negative(e.top_k, "eval.top_k")
    if e.batch_size != "auto":
        _positive(e.batch_size, "eval.batch_size")
    _positive(e.max_new_tokens, "eval.max_new_tokens")

    _non_negative(c.checkpoint.every, "checkpoint.every")
    _positive(c.checkpoint.max_to_keep, "checkpoint.max_to_keep")

    g = c.guard
    _positive(g.window, "guard.window")
    _check(0 < g.truncation_rise <= 1, "guard.truncation_rise", f"must be in (0, 1] (a share of rollouts), got "
           f"{g.truncation_rise}")
    _check(0 <= g.kl_fall < 1, "guard.kl_fall", f"must be in [0, 1), got {g.kl_fall}")
    return cfg


__all__ = ["validate"]
