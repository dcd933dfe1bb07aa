"""Trained tokens/s of one full OPD iteration (sample -> teacher-score -> update), three ways, in one run:

1. fused:   `step.build_opd_step` — the whole iteration in ONE jitted XLA program, built as the trainer builds it.
2. unfused: the same opd_jax arithmetic as three jitted programs (sample, teacher-score, update) with host
            round trips between them (`jax.device_get` to numpy, back with `jnp.asarray`) — what a framework
            with a separate inference engine does. The update reuses `StepBuilder.update_phase` with the
            teacher scoring replaced by the precomputed, host-transferred teacher outputs, so no work is
            duplicated; the first step is checked to give the fused step's metrics.
3. trl:     TRL `GKDTrainer` (torch: on CUDA with bf16 autocast when torch sees a GPU, else the CPU), lmbda=1
            (student generates: fully on-policy), beta=1 (reverse KL), the same student/teacher architectures as
            HF `Qwen3ForCausalLM`, same batch and lengths.

`--model` picks the shapes (`benchmarks/shapes.py`): "tiny" (default, the CPU figures) or "qwen3-0.6b" (issue
#16's GPU shapes: a Qwen3-0.6B-shaped student, fp32 params / bf16 compute, a Qwen3-1.7B-shaped bf16 teacher,
128-token prompts, 256 new tokens). JAX runs on its default backend. Besides tokens/s it reports the decode
step time (the sample phase at --new-tokens minus a sample phase of one token, over the steps between), the
time to read the student's weights once at the device's HBM bandwidth (the floor under a decode step), and
the fused step's MFU (analytic FLOPs, `opd_jax.flops`, over the device's bf16 peak).

Every completion runs to `--new-tokens` (no stop tokens), so each iteration trains exactly
batch * new_tokens completion tokens in every variant. Variants are interleaved per round (rotating order)
so they share machine noise; medians are reported.

    python benchmarks/opd_step.py --rounds 7
    python benchmarks/opd_step.py --skip-trl --new-tokens 32
    python benchmarks/opd_step.py --model qwen3-0.6b --rounds 5     # a GPU
    python benchmarks/opd_step.py --smoke                            # tiny and short: checks the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from shapes import MODELS, hf_config, torch_device

from opd_jax import flops
from opd_jax.config.schema import ExperimentConfig, ModelConfig
from opd_jax.models.qwen3 import build_model, param_count
from opd_jax.sampling import SampleOutput, SamplingParams, casts_weights
from opd_jax.step import PromptBatch, StepBuilder, build_opd_step
from opd_jax.train_state import TrainState, init_train_state, make_optimizer, split_model

F32 = jnp.float32



class _PrecomputedTeacher(StepBuilder):
    """`update_phase` whose teacher scoring is replaced by outputs computed earlier in a separate program:
    pass the precomputed `(logprobs, hidden, head)` tuple where `update_phase` expects the teacher params."""

    def teacher_outputs(self, teachers_params, index, t_prompt, t_pmask, completion, cmask):
        return teachers_params


def _copy(tree: Any) -> Any:
    """Fresh buffers (the fused/unfused updates donate their state)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


class OpdBench:
    """Builds the opd_jax student/teacher/state once and exposes one fused and one unfused iteration."""

    def __init__(self, args: argparse.Namespace):
        cfg = ExperimentConfig(groups_per_batch=args.groups, group_size=args.group_size)
        cfg.sampling.max_new_tokens = args.new_tokens
        cfg.sampling.max_prompt_len = args.prompt_len
        cfg.sampling.stop_token_ids = []  # every row is full length
        cfg.loss.kind = args.loss
        cfg.loss.normalization = "token_mean"
        cfg.optim.learning_rate = args.lr
        self.cfg = cfg
        shapes = MODELS[args.model]
        self.student_cfg, self.teacher_cfg = ModelConfig(**shapes.student), ModelConfig(**shapes.teacher)
        student = build_model(self.student_cfg, 0)
        teacher = build_model(self.teacher_cfg, 1)
        sdef, trainable, frozen, _, _ = split_model(student)
        tdef, tparams, _, _, _ = split_model(teacher)
        self.n_student, self.n_teacher = param_count(trainable), param_count(tparams)
        opt = make_optimizer(cfg.optim, cfg.steps)
        base = init_train_state(opt, trainable, frozen)
        self.teachers = [tparams]
        rng = np.random.default_rng(0)
        toks = jnp.asarray(rng.integers(2, self.student_cfg.vocab_size, (args.groups, args.prompt_len)), jnp.int32)
        ones = jnp.ones(toks.shape, bool)
        self.batch = PromptBatch(tokens=toks, mask=ones, teacher_tokens=toks, teacher_mask=ones,
                                 teacher_index=jnp.zeros((), jnp.int32), answer=jnp.zeros((args.groups, 0), jnp.int32))
        self.prompt_tokens = np.asarray(toks)
        self.key = jax.random.key(args.seed)
        self.sp = SamplingParams.create(temperature=1.0)
        # the fused step exactly as the trainer and `opd-jax compile` build it (here on one device, no shardings)
        builder, fused = build_opd_step(cfg, None, sdef, [tdef], opt, state_shardings=None, teacher_shardings=[None],
                                        example_batch=self.batch)
        pre = _PrecomputedTeacher(cfg, sdef, [tdef], None, opt)
        if cfg.micro_batches != 1:
            raise ValueError("the unfused update feeds whole-batch teacher outputs: micro_batches must be 1")
        self.fused_state, self.unfused_state = _copy(base), _copy(base)
        K = cfg.group_size

        def sample_fn(state: TrainState, batch: PromptBatch, key: jax.Array, sp: SamplingParams) -> SampleOutput:
            # the fused step folds the step into the key first; do the same so both draw identical samples
            return builder.sample_phase(state, batch, jax.random.fold_in(key, state.step), sp)

        def teacher_fn(teachers: list, batch: PromptBatch, samples: SampleOutput):
            tp = jnp.repeat(batch.teacher_tokens, K, axis=0)
            tpm = jnp.repeat(batch.teacher_mask, K, axis=0)
            return builder.teacher_outputs(teachers, batch.teacher_index, tp, tpm, samples.tokens,
                                           samples.mask.astype(F32))

        # AOT-compile everything up front so compile time is measured apart from run time.
        t0 = time.perf_counter()
        self.fused = fused.lower(
            self.fused_state, self.teachers, self.batch, self.key, self.sp).compile()
        self.compile_fused = time.perf_counter() - t0
        s_abs = jax.eval_shape(sample_fn, base, self.batch, self.key, self.sp)
        t_abs = jax.eval_shape(teacher_fn, self.teachers, self.batch, s_abs)
        t0 = time.perf_counter()
        self.sample = jax.jit(sample_fn).lower(base, self.batch, self.key, self.sp).compile()
        self.teacher = jax.jit(teacher_fn).lower(self.teachers, self.batch, s_abs).compile()
        self.update = jax.jit(pre.update_phase, donate_argnums=(0,)).lower(
            self.unfused_state, t_abs, self.batch, s_abs).compile()
        self.compile_unfused = time.perf_counter() - t0
        self.phases: dict[str, list[float]] = {"sample": [], "teacher": [], "update": [], "host_transfer": []}
        # the sample phase for one token (prefill + the first choice, no decode step): decode ms/step by difference
        one = ExperimentConfig(groups_per_batch=args.groups, group_size=args.group_size)
        one.sampling = dataclasses.replace(cfg.sampling, max_new_tokens=1)
        b1 = StepBuilder(one, sdef, [tdef], None, opt)
        self.sample_one = jax.jit(lambda st, b, k, sp: b1.sample_phase(st, b, jax.random.fold_in(k, st.step), sp)
                                  ).lower(base, self.batch, self.key, self.sp).compile()
        self.prefill_times: list[float] = []
        student_model = sdef.merge(trainable, frozen)
        self.cast = casts_weights(student_model, None, cfg.sampling.cast_weights)

    def sample_one_iter(self) -> None:
        t = time.perf_counter()
        _block(self.sample_one(self.unfused_state, self.batch, self.key, self.sp))
        self.prefill_times.append(time.perf_counter() - t)

    def fused_iter(self) -> tuple[float, dict]:
        t0 = time.perf_counter()
        self.fused_state, m = self.fused(self.fused_state, self.teachers, self.batch, self.key, self.sp)
        _block((self.fused_state, m))
        return time.perf_counter() - t0, m

    def unfused_iter(self, record: bool = True) -> tuple[float, dict]:
        t = [time.perf_counter()]
        samples = _block(self.sample(self.unfused_state, self.batch, self.key, self.sp))
        t.append(time.perf_counter())
        samples = jax.tree.map(jnp.asarray, jax.device_get(samples))  # to the "trainer" via host
        t.append(time.perf_counter())
        t_out = _block(self.teacher(self.teachers, self.batch, samples))
        t.append(time.perf_counter())
        t_out = jax.tree.map(jnp.asarray, jax.device_get(t_out))  # teacher outputs back via host
        t.append(time.perf_counter())
        self.unfused_state, m = self.update(self.unfused_state, t_out, self.batch, samples)
        _block((self.unfused_state, m))
        t.append(time.perf_counter())
        d = np.diff(t)
        if record:
            for name, v in zip(("sample", "teacher", "update"), (d[0], d[2], d[4]), strict=True):
                self.phases[name].append(float(v))
            self.phases["host_transfer"].append(float(d[1] + d[3]))
        return t[-1] - t[0], m

    def check_same_work(self) -> None:
        """First step from identical states and key: fused and unfused must agree (also the warm-up)."""
        _, mf = self.fused_iter()
        _, mu = self.unfused_iter(record=False)
        mf, mu = jax.device_get(mf), jax.device_get(mu)
        print("first-step check (fused vs unfused, same key):")
        for k in ("loss", "teacher_kl", "grad_norm", "entropy", "num_tokens"):
            print(f"  {k:<11} fused={float(mf[k]): .6e}  unfused={float(mu[k]): .6e}")
            if not np.allclose(mf[k], mu[k], rtol=1e-4, atol=1e-6):
                raise SystemExit(f"fused and unfused pipelines disagree on {k}: not the same work")
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
            jax.tree.leaves(self.fused_state.trainable), jax.tree.leaves(self.unfused_state.trainable), strict=True))
        print(f"  max |param diff| after the update: {diff:.2e}")


def _tiny_tokenizer(vocab_size: int):
    """A local word-level tokenizer over "t{i}" words (no download); chat template = contents joined by spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1} | {f"t{i}": i for i in range(2, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
        chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}",
    )


def _hf_qwen3(dims: dict, seed: int):
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(hf_config(dims))
    if dims.get("param_dtype") == "bfloat16":  # the teacher's weights in bf16, as its config says
        model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = None  # no stop token: every completion is full length
    return model


def run_with_trl(args: argparse.Namespace, prompts: np.ndarray, rounds: list[Callable[[str], None]],
                 times: list[float], cpus: list[float], tokens: list[int]) -> dict:
    """Run GKDTrainer.train() for warm-up + rounds steps. Each step is timed from on_step_begin to on_step_end
    (generate -> student/teacher forward -> loss -> backward -> optimizer step; batch collation excluded).
    The opd_jax variants of each round run inside the callbacks, before or after the TRL step."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    shapes = MODELS[args.model]
    student, teacher = _hf_qwen3(shapes.student, 0), _hf_qwen3(shapes.teacher, 1)
    tokenizer = _tiny_tokenizer(shapes.student["vocab_size"])
    device, bf16 = torch_device()
    # Each of the G prompts appears group_size times: the same 32 sequences per step as opd_jax.
    rows = np.repeat(prompts, args.group_size, axis=0)
    data = Dataset.from_list([{"messages": [{"role": "user", "content": " ".join(f"t{t}" for t in r)},
                                            {"role": "assistant", "content": "t2"}]} for r in rows])

    class Trainer(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))  # trained completion tokens
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Interleave(TrainerCallback):
        """Round r runs opd_jax variants before/after TRL's step r (order rotates across rounds)."""

        def __init__(self):
            self.t0 = self.c0 = 0.0

        def _round(self, state) -> int:
            return state.global_step - args.trl_warmup  # global_step counts completed steps

        def on_step_begin(self, a, state, control, **kw):
            r = self._round(state)
            if r >= 0:
                rounds[r]("before")
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            dt, dc = time.perf_counter() - self.t0, time.process_time() - self.c0
            r = self._round(state) - 1  # global_step was incremented before on_step_end
            if r >= 0:
                times.append(dt)
                cpus.append(dc)
                rounds[r]("after")

    with tempfile.TemporaryDirectory() as out:
        gcfg = GKDConfig(
            output_dir=out, per_device_train_batch_size=rows.shape[0], max_steps=args.trl_warmup + args.rounds,
            learning_rate=args.lr, lr_scheduler_type="constant", lmbda=1.0, beta=1.0, temperature=1.0,
            max_new_tokens=args.new_tokens, gradient_checkpointing=False, bf16=bf16, use_cpu=device == "cpu",
            report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0,
            seed=args.seed,
        )
        trainer = Trainer(model=student, teacher_model=teacher, args=gcfg, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Interleave()])
        trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return dict(trl=trl.__version__, torch=torch.__version__, threads=torch.get_num_threads(), device=device,
                bf16=bf16, peak_gib=peak, gkd_loss="generalized JSD, beta=1 (full-vocab reverse KL)")


def _set_threads(n: int) -> None:
    """Same intra-op thread count for XLA and torch. XLA_FLAGS is read when the CPU backend starts (first
    JAX op), so setting it here, before any JAX op, takes effect."""
    if n == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(MODELS), help="shapes: see benchmarks/shapes.py")
    p.add_argument("--rounds", type=int, default=5, help="timed iterations per variant (after warm-up)")
    p.add_argument("--new-tokens", type=int, default=None, help="default: the model's (shapes.py)")
    p.add_argument("--prompt-len", type=int, default=None, help="default: the model's (shapes.py)")
    p.add_argument("--groups", type=int, default=8, help="prompts per step (groups_per_batch)")
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt")
    p.add_argument("--loss", default="importance_sampling", choices=["importance_sampling", "reverse_kl"],
                   help="opd_jax loss: sampled-token OPD (default) or full-vocab reverse KL (= GKD beta=1)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads for both XLA (1: single-threaded Eigen) and torch; 0: each runtime's "
                        "default. 1 by default: on a shared, oversubscribed host torch's OpenMP pool slows 5-9x")
    p.add_argument("--trl-warmup", type=int, default=1, help="untimed TRL steps before the rounds")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 8 new tokens, 2 rounds: checks the script runs")
    args = p.parse_args()
    if args.smoke:
        args.model, args.new_tokens, args.rounds = "tiny", 8, 2
    shapes = MODELS[args.model]
    args.new_tokens = args.new_tokens or shapes.opd_new_tokens
    args.prompt_len = args.prompt_len or shapes.prompt_len
    if args.threads > 0:
        _set_threads(args.threads)
    else:
        import torch

        args.threads = torch.get_num_threads()

    dev0 = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev0.platform} ({dev0.device_kind}) x{jax.device_count()} "
          f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); batch {args.groups}x{args.group_size}, "
          f"prompt {args.prompt_len}, new tokens {args.new_tokens}, loss {args.loss}")
    c0 = time.process_time()
    bench = OpdBench(args)
    setup_cpu = time.process_time() - c0
    print(f"model {args.model}: student {bench.n_student / 1e6:.2f}M params ({bench.student_cfg.param_dtype} params, "
          f"{bench.student_cfg.dtype} compute), teacher {bench.n_teacher / 1e6:.2f}M params "
          f"({bench.teacher_cfg.param_dtype})")
    print(f"compile (wall): fused {bench.compile_fused:.1f}s, unfused (3 programs) {bench.compile_unfused:.1f}s; "
          f"setup+compile CPU {setup_cpu:.1f}s")
    bench.check_same_work()

    names = ["fused", "unfused"] + ([] if args.skip_trl else ["trl"])
    times: dict[str, list[float]] = {n: [] for n in names}  # wall seconds per iteration
    cpus: dict[str, list[float]] = {n: [] for n in names}  # process CPU seconds per iteration
    tokens: dict[str, list[int]] = {n: [] for n in names}

    def run_variant(name: str) -> None:
        if name == "unfused":
            bench.sample_one_iter()  # beside the unfused sample phase, for the decode step time
        c = time.process_time()
        dt, m = bench.fused_iter() if name == "fused" else bench.unfused_iter()
        cpus[name].append(time.process_time() - c)
        times[name].append(dt)
        tokens[name].append(int(m["num_tokens"]))

    def make_round(r: int) -> Callable[[str], None]:
        order = names[r % len(names):] + names[: r % len(names)]
        before = order[: order.index("trl")] if "trl" in order else order
        after = order[order.index("trl") + 1:] if "trl" in order else []
        return lambda when: [run_variant(n) for n in (before if when == "before" else after)]

    rounds = [make_round(r) for r in range(args.rounds)]
    info: dict = {}
    if args.skip_trl:
        for r in range(args.rounds):
            rounds[r]("before")
    else:
        try:
            info = run_with_trl(args, bench.prompt_tokens, rounds, times["trl"], cpus["trl"], tokens["trl"])
            tokens["trl"] = tokens["trl"][args.trl_warmup:]
        except Exception as e:  # noqa: BLE001 - e.g. out of GPU memory beside JAX: keep the opd_jax figures
            print(f"TRL failed, continuing without it: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            names.remove("trl")
            for n in names:  # the rounds TRL did not get to
                while len(times[n]) < args.rounds:
                    run_variant(n)

    per_iter = args.groups * args.group_size * args.new_tokens
    rate, cpu_rate = {}, {}
    print(f"\n{'variant':<9} {'median s/iter':>13} {'min s/iter':>10} {'median CPU s':>12} {'tokens/iter':>11} "
          f"{'tokens/s':>9} {'tokens/CPU-s':>12}  n")
    for n in names:
        if not tokens[n] or set(tokens[n]) != {per_iter}:
            raise SystemExit(f"{n}: trained {sorted(set(tokens[n]))} tokens per iteration, expected {per_iter}")
        wall, cpu = statistics.median(times[n]), statistics.median(cpus[n])
        rate[n], cpu_rate[n] = per_iter / wall, per_iter / cpu
        print(f"{n:<9} {wall:>13.3f} {min(times[n]):>10.3f} {cpu:>12.3f} {per_iter:>11d} {rate[n]:>9.0f} "
              f"{cpu_rate[n]:>12.0f}  {len(times[n])}")
    ph = {k: statistics.median(v) for k, v in bench.phases.items()}
    total = sum(ph.values())
    print("unfused phase medians (wall): " + ", ".join(f"{k} {v * 1e3:.1f} ms ({100 * v / total:.1f}%)"
                                                        for k, v in ph.items()))
    if info:
        print(f"trl {info['trl']} GKDTrainer, torch {info['torch']} on {info['device']} (bf16 autocast "
              f"{info['bf16']}, {info['threads']} threads), loss {info['gkd_loss']}, peak memory "
              f"{info['peak_gib']:.1f} GiB")
    # decode step time, the weight-read floor under it, and MFU
    B = args.groups * args.group_size
    decode_ms = 1e3 * (ph["sample"] - statistics.median(bench.prefill_times)) / max(args.new_tokens - 1, 1)
    dev = jax.devices()[0]
    chip = flops.chip_of(dev)
    s_cfg = bench.student_cfg
    w_bytes = (bench.n_student - s_cfg.vocab_size * s_cfg.hidden_size * (not s_cfg.tie_embeddings)) * (
        2 if bench.cast or s_cfg.param_dtype == "bfloat16" else 4)  # the embedding is gathered, not read
    bw = chip.hbm_bandwidth if chip is not None else float("nan")
    step_flops = flops.opd_step_flops(s_cfg, bench.teacher_cfg, B, args.prompt_len, args.new_tokens,
                                      remat="none")["total"]
    peak = flops.peak_flops_per_device(dev) * jax.device_count()
    mfu = step_flops / (statistics.median(times["fused"]) * peak)
    print()
    print(f"device: {dev.device_kind}")
    print(f"fused_compile_s: {bench.compile_fused:.1f}")
    print(f"decode_ms_per_step: {decode_ms:.2f}")
    print(f"decode_weight_gb: {w_bytes / 1e9:.2f}")  # the student's weights as a decode step reads them
    print("decode_weight_read_ms: " + (f"{1e3 * w_bytes / bw:.2f}" if bw == bw else "n/a"))
    print("decode_vs_weight_read: " + (f"{decode_ms / (1e3 * w_bytes / bw):.2f}x" if bw == bw else "n/a"))
    print(f"fused_step_flops: {step_flops:.3e}")
    print(f"fused_mfu_percent: {100 * mfu:.2f}")  # of the devices' bf16 peak (flops.peak_flops_per_device)
    print(f"fused_tokens_per_s: {rate['fused']:.0f}")
    print(f"unfused_tokens_per_s: {rate['unfused']:.0f}")
    if "trl" in rate:
        print(f"trl_tokens_per_s: {rate['trl']:.0f}")
    print(f"fused_vs_unfused: {rate['fused'] / rate['unfused']:.2f}x")
    if "trl" in rate:
        print(f"fused_vs_trl: {rate['fused'] / rate['trl']:.2f}x")
    # CPU-time ratios: robust to how much of the shared host each iteration happened to get
    print(f"fused_vs_unfused_cpu: {cpu_rate['fused'] / cpu_rate['unfused']:.2f}x")
    if "trl" in rate:
        print(f"fused_vs_trl_cpu: {cpu_rate['fused'] / cpu_rate['trl']:.2f}x")


if __name__ == "__main__":
    main()
