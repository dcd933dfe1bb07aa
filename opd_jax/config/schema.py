"""The typed schema of an opd_jax run. YAML files and `key=value` overrides fill these dataclasses.

Every field has a default so a partial YAML file is a valid config; `loader.py` checks keys and types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

# Chat templates (opd_jax.data.renderers builds one per name; a test holds the two lists equal).
RendererName = Literal["base", "hf_chat_template", "qwen3", "qwen3_nothink"]
# Projections LoRA may adapt: the matrices of `opd_jax.models.weights` (a test holds the two equal).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# `data.source` / `eval.source` prefixes (opd_jax.data.sources.open_source; synthetic: opd_jax.data.synthetic).
SOURCE_PREFIXES = ("hf", "jsonl", "parquet", "tfds", "preset", "synthetic")


@dataclass
class ModelConfig:
    """A Qwen3 dense model. `preset` fills the dimensions; explicit fields override the preset."""

    preset: str | None = None  # e.g. "qwen3-0.6b", "qwen3-8b", "tiny"
    # HF checkpoint the weights load from: a local dir, gs://..., or a Hub id (org/name[@revision])
    hf_path: str | None = None
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; logits are always fp32
    remat: Literal["none", "full", "dots"] = "none"  # rematerialization of each scanned layer
    # keys per chunk of memory-efficient attention over whole sequences (training, teacher scoring, prefill):
    # O(T * chunk) scores instead of O(T^2). 0 = dense (also used when there are <= chunk keys).
    attention_chunk: int = 0
    # one-token decode attention by the XLA:CPU kernel in opd_jax/kernels where it applies (a CPU program, fp32
    # cache, one device); false keeps the pure-JAX path there too. GPU/TPU programs never use it.
    cpu_decode_kernel: bool = True
    # one-token decode attention (opd_jax.models.attention.decode_kind): "auto" = the CPU block loop (and kernel)
    # on a CPU, dense attention over a static prefix of the cache on a TPU, the Triton flash-decoding kernel of
    # opd_jax/kernels/gpu.py on a GPU (dense for caches of <= 256 slots); or force "blocks" | "dense" | "pallas".
    decode_attention: Literal["auto", "blocks", "dense", "pallas"] = "auto"
    # trace the layer loop of one-token decode steps unrolled (static weight and cache slices) instead of as a
    # scan; more compile time. For profiling the scan's per-layer slicing and for exact per-step cost_analysis().
    decode_unroll: bool = False


@dataclass
class LoRAConfig:
    """Low-rank adapters on the layer matrices instead of full fine-tuning (rank 0 = off)."""

    rank: int = 0  # 0 disables LoRA: full fine-tuning
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class MeshConfig:
    """Mesh axis sizes; -1 takes the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass
class SamplingConfig:
    """How the student samples its rollouts inside the step (and the prompt budget of training and eval)."""

    max_prompt_len: int = 64  # prompt bucket; prompts are left-padded to this
    max_new_tokens: int = 32  # static: the KV cache holds max_prompt_len + max_new_tokens
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    truncate_prompts: bool = False  # False: an over-long prompt is an error; True: left-truncate and count
    micro_batches: int = 1  # sample the batch in this many sequential chunks inside the step
    layout: Literal["train", "replicated", "tensor"] = "train"  # weight layout used during decode
    # cast the student's weights to its compute dtype once per sampling call, before the prefill, instead of in
    # every layer at every decode step (a temporary copy in the compute dtype). "auto" = on for GPU/TPU programs
    # whose params are wider than the compute dtype (fp32 params, bf16 compute); never changes a result.
    cast_weights: Literal["auto", "always", "never"] = "auto"
    # run the decode loop as this many while loops over consecutive token ranges, each attending over a static
    # prefix of the cache that covers it: with "dense" decode attention a step reads O(filled) slots up to the
    # segment size, with no data-dependent loop inside the step. 0 = auto: one segment per 1024 new tokens (at
    # most 8) with dense decode attention, else 1.
    decode_segments: int = 0


@dataclass
class LossConfig:
    """The OPD objective: the per-token advantage from the teacher, the policy-gradient or divergence loss."""

    kind: Literal[
        "importance_sampling", "ppo", "reverse_kl", "forward_kl", "jsd", "topk_reverse_kl", "topk_forward_kl"
    ] = "importance_sampling"
    kl_penalty_coef: float = 1.0
    discount: float = 0.0
    clip_eps: float = 0.2  # ppo
    beta: float = 0.5  # jsd: 0 = forward KL, 1 = reverse KL
    topk: int = 16  # topk_* variants
    task_reward_coef: float = 0.0  # A = coef*A_task - kl_penalty_coef*KL (rl / mixed)
    kl_clip: float = 0.0  # > 0: clip the per-token kl_t to [-kl_clip, kl_clip] in the advantage (0 = off, as published)
    normalization: Literal["sum", "token_mean", "sequence_mean"] = "sum"
    logprob_chunk: int = 128  # sequence chunk for logprob / KL computation


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (published defaults: b=(0.9, 0.95), no decay, no clipping)."""

    learning_rate: float = 1e-4
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 = off (as published)


@dataclass
class TeacherConfig:
    """A frozen teacher: its model, its chat template, and the datasets routed to it."""

    name: str = "teacher"
    model: ModelConfig = field(default_factory=ModelConfig)
    renderer: Literal["same", RendererName] = "same"  # chat template for the teacher; "same" reuses the student's
    datasets: list[str] = field(default_factory=list)  # route these dataset names to this teacher


@dataclass
class DataConfig:
    """Where training prompts come from and how they are rendered for the student."""

    source: str = "synthetic:arithmetic"  # hf:NAME, jsonl:PATH, parquet:PATH, tfds:NAME/CONFIG:SPLIT, synthetic:TASK
    name: str = ""  # dataset name used for teacher routing; "" = derived from the source
    prompt_field: str = "question"
    answer_field: str = "answer"
    split: str = "train"
    renderer: RendererName = "qwen3"  # student chat template
    tokenizer: str | None = None  # HF tokenizer dir; None = the student's hf_path
    shuffle_seed: int = 0
    max_examples: int = 0  # 0 = all


@dataclass
class EvalConfig:
    """Held-out evaluation during and after training (avg@k, pass@k), and what `opd-jax eval` runs."""

    source: str = ""  # same grammar as DataConfig.source; "" disables eval
    prompt_field: str = "question"
    answer_field: str = "answer"
    split: str = "test"
    every: int = 0  # steps; 0 = only at the end
    k: int = 1  # samples per problem
    num_problems: int = 0  # 0 = all
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 32
    # sequences sampled at once: "auto" = on a TPU or GPU the largest batch whose KV cache, weights and temporaries
    # the compiler fits in the chip's memory (compiled and checked, opd_jax.eval.batch), rounded to the batch axes;
    # on a CPU min(64, problems x k); an integer is used as given (rounded up to the batch axes)
    batch_size: int | Literal["auto"] = "auto"


@dataclass
class CheckpointConfig:
    """Orbax checkpoints of the train state in <run_dir>/checkpoints, and how a resume picks one."""

    every: int = 0  # steps; 0 = only the final save
    max_to_keep: int = 3
    async_save: bool = True
    resume_step: int | None = None  # resume from this step instead of the latest
    fallback_to_intact: bool = False  # resume: if the latest checkpoint is damaged, take the newest intact one


@dataclass
class LoggingConfig:
    """Metric sinks: metrics.jsonl always; TensorBoard, W&B and a progress bar as chosen."""

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "opd_jax"
    progress: bool = True


@dataclass
class GuardConfig:
    """The length-collapse watch on the training rollouts (opd_jax.guards, experiments/opd_collapse).

    It fires when the truncation rate has risen by `truncation_rise` over the run's first `window` steps while the
    reverse KL per rollout (teacher_kl x mean_length) has not fallen by `kl_fall`. Runs without a teacher KL are not
    watched."""

    on_collapse: Literal["warn", "stop", "off"] = "warn"  # stop: checkpoint and stop the run (opd-jax train exits 3)
    window: int = 5  # steps averaged, for the first window (the reference) and the latest one
    # rise of the mean truncation rate (a share of rollouts, 0-1) that counts; 0.15 fired 0-12 steps before the
    # truncation rate reached 0.5 in all 32 collapsed runs and in none of 49 stable ones (experiments/opd_collapse)
    truncation_rise: float = 0.15
    kl_fall: float = 0.0  # the KL per rollout "falls" when it drops below (1 - kl_fall) x its first-window level


@dataclass
class DistributedConfig:
    """Multi-host set-up. On TPU pods and under SLURM `jax.distributed.initialize()` finds these itself."""

    initialize: Literal["auto", "always", "never"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclass
class ExperimentConfig:
    """One run: the algorithm, its models, data, sampling, loss, optimizer and where it writes."""

    algorithm: Literal["opd", "sft", "rl"] = "opd"
    run_dir: str = "runs/default"
    seed: int = 0
    steps: int = 10
    groups_per_batch: int = 4  # prompts per step
    group_size: int = 4  # samples per prompt
    micro_batches: int = 1  # gradient accumulation inside the step
    max_nonfinite_steps: int = 3  # consecutive non-finite losses before stopping
    # true: continue from the run dir's latest checkpoint (an error when it has none); "auto": continue when there is
    # one, else start fresh (what a requeued job wants); false: the run dir must be new or empty (or overwrite=true)
    resume: Literal[False, True, "auto"] = False
    overwrite: bool = False  # move an existing run dir aside (renamed <run_dir>.old-<time>, never deleted)
    # JAX's persistent compilation cache: "auto" = $OPD_JAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/opd_jax/xla
    # (~/.cache/opd_jax/xla without XDG_CACHE_HOME); "" = off
    compilation_cache: str = "auto"
    topology: str | None = None  # AOT target, e.g. "v5p-64"
    student: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    teachers: list[TeacherConfig] = field(default_factory=lambda: [TeacherConfig()])
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def batch_size(self) -> int:
        return self.groups_per_batch * self.group_size

    @property
    def scores_with_teachers(self) -> bool:
        """Whether the step scores with the teachers: OPD always; RL only as a KL reference (kl_penalty_coef != 0);
        SFT never. The trainer loads, `opd-jax compile` lowers and validation checks the teachers by this rule."""
        return self.algorithm == "opd" or (self.algorithm == "rl" and self.loss.kl_penalty_coef != 0)


def replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)
