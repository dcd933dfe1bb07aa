"""The fused OPD step: one XLA program (decode loop + teacher + optimizer, no host callbacks), learning, the
8-device mesh, the non-finite skip, teacher routing and templates, micro-batching and a LoRA student.

Programs are compiled once per module (each fused-step compile is ~10-20 s of CPU) and shapes are tiny."""

from __future__ import annotations

import glob
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec
from jaxpr_utils import walk

from opd_jax import losses
from opd_jax.config.schema import ExperimentConfig, LoRAConfig, MeshConfig, ModelConfig
from opd_jax.kernels import cpu as cpu_kernels
from opd_jax.mesh import make_mesh
from opd_jax.models.attention import target_platform
from opd_jax.models.qwen3 import abstract_model, positions_from_mask
from opd_jax.sampling import SamplingParams
from opd_jax.step import PromptBatch, StepBuilder, make_opd_step
from opd_jax.train_state import (
    ModelDef,
    TrainState,
    init_train_state,
    make_optimizer,
    split_model,
    state_shardings,
    tree_shardings,
)

# Dimensions divisible by the (fsdp=4, tensor=2) mesh. The teacher's hidden size (48) appears nowhere in the
# student, so it identifies teacher matmuls in the compiled program.
STUDENT = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8)
TEACHER = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=12)
SMALL_TEACHER = ModelConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=1, num_heads=2,
                            num_kv_heads=1, head_dim=8)
G, K, P, PT, NEW = 4, 4, 8, 12, 8  # prompts, samples per prompt, prompt len, teacher prompt len, new tokens
STOPS = (3, 5)  # stop tokens, used by the sampling-micro-batch builder
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def make_cfg(**sampling) -> ExperimentConfig:
    cfg = ExperimentConfig(groups_per_batch=G, group_size=K, steps=1000)
    cfg.sampling.max_new_tokens = NEW
    cfg.sampling.max_prompt_len = P
    for k, v in sampling.items():
        setattr(cfg.sampling, k, v)
    cfg.optim.learning_rate = 2e-2
    cfg.loss.normalization = "token_mean"
    return cfg


def init_model(cfg: ModelConfig, seed: int, lora: LoRAConfig | None = None):
    """`split_model` of a random model, initialized in numpy (eager `build_model` compiles dozens of programs).
    -> (ModelDef, trainable, frozen, trainable axes, frozen axes)."""
    model_def, tr, fr, t_axes, f_axes = split_model(abstract_model(cfg, lora))
    rng = np.random.RandomState(seed)

    def fill(name, x):
        if name.endswith("norm"):
            return np.ones(x.shape)
        if name.startswith("lora_"):
            return np.zeros(x.shape) if name.endswith("_b") else 0.3 * rng.randn(*x.shape)
        return 0.02 * rng.randn(*x.shape)

    tr, fr = ({k: jnp.asarray(fill(k, x), jnp.float32) for k, x in d.items()} for d in (tr, fr))
    return model_def, tr, fr, t_axes, f_axes


def unigram_teacher(params: dict) -> dict:
    """From the main teacher (head already 8x): a peaky teacher whose next-token distribution barely depends on
    the context (layers zeroed, embeddings near one shared vector), which a tiny student learns in ~100 steps."""
    rng = np.random.RandomState(7)
    p = {k: np.asarray(v) for k, v in params.items()}
    for name in PROJECTIONS:
        p[name] = np.zeros_like(p[name])
    p["embed"] = 0.02 * rng.randn(1, p["embed"].shape[1]) + 0.3 * p["embed"]
    p["lm_head"] = 2 * p["lm_head"]  # logits ~16x those of a fresh model
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def left_pad(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    tokens, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
    return tokens, mask


def prompt_batch(seed: int, teacher_index: int = 0) -> PromptBatch:
    """G prompts of different lengths; the teacher sees them in another template ([60, 61] + prompt + [62])."""
    rng = np.random.RandomState(seed)
    rows = [list(rng.randint(6, 60, n)) for n in (P, 6, 5, P)]
    tokens, mask = left_pad(rows, P)
    t_tokens, t_mask = left_pad([[60, 61, *r, 62] for r in rows], PT)
    return PromptBatch(tokens=jnp.asarray(tokens), mask=jnp.asarray(mask), teacher_tokens=jnp.asarray(t_tokens),
                       teacher_mask=jnp.asarray(t_mask), teacher_index=jnp.asarray(teacher_index, jnp.int32),
                       answer=jnp.zeros((G, 0), jnp.int32))


def new_state(optimizer, trainable, frozen) -> TrainState:
    """A fresh state on copies of the weights (the fused step donates its state)."""
    trainable = jax.tree.map(jnp.copy, trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=optimizer.init(trainable))


def to_numpy(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.array(x), tree)


def full_logits(model_def: ModelDef, params, tokens, mask) -> jax.Array:
    model = model_def.merge(params)
    hidden, _ = model(tokens, positions_from_mask(mask), mask)
    return model.logits(hidden)


@pytest.fixture(scope="module")
def env() -> SimpleNamespace:
    e = SimpleNamespace()
    e.cfg = make_cfg()
    e.sdef, e.tr, e.fr, e.t_axes, e.f_axes = init_model(STUDENT, 0)
    e.tdef, e.tp, _, e.teacher_axes, _ = init_model(TEACHER, 1)
    e.tp["lm_head"] = 8 * e.tp["lm_head"]
    e.t2def, e.tp2, *_ = init_model(SMALL_TEACHER, 2)
    e.opt = make_optimizer(e.cfg.optim, e.cfg.steps)
    e.builder = StepBuilder(e.cfg, e.sdef, [e.tdef], None, e.opt)
    e.batch = prompt_batch(0)
    e.key = jax.random.key(0)
    e.sp = SamplingParams.create()
    e.step = make_opd_step(e.builder, None, None, e.batch)
    # sampling in 2 micro-batches, with stop tokens: fixed samples for the update-phase tests
    e.sampler = jax.jit(StepBuilder(make_cfg(micro_batches=2), e.sdef, [e.tdef], None, e.opt,
                                    stop_token_ids=STOPS).sample_phase)
    e.samples = e.sampler(new_state(e.opt, e.tr, e.fr), e.batch, jax.random.key(1), e.sp)
    e.sgd = optax.sgd(1.0)  # update-phase tests: the update is exactly -grad
    e.teacher_logits = jax.jit(lambda params, tokens, mask: full_logits(e.tdef, params, tokens, mask))
    return e


def compile_events() -> tuple[list[str], Callable[[], None]]:
    events: list[str] = []

    def listener(name, _secs, **_kw):
        if name.endswith("backend_compile_duration"):
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events, lambda: jax.monitoring.unregister_event_duration_listener(listener)


# ---- one program --------------------------------------------------------------------------------------
def test_fused_step_is_one_program(env, tmp_path):
    state = new_state(env.opt, env.tr, env.fr)
    args = (state, [env.tp], env.batch, env.key, env.sp)

    # the traced step: exactly one outer while loop (the decode; layers and chunks are scans) in the same jaxpr as
    # the teacher's matmuls and Adam's sqrt on parameter-shaped moments, and no host callback of any kind. The
    # only other while is, on a CPU program ("blocks" decode attention), the pure-JAX decode attention's loop over
    # filled cache blocks inside it (the kernel branch beside it replaces that loop when compiled for a CPU); GPU
    # and TPU programs have none (tests/test_decode.py)
    platform = target_platform(None)
    blocks = abstract_model(STUDENT).decode_kind(P + NEW) == "blocks"
    eqns = list(walk(jax.make_jaxpr(env.builder.fused)(*args).jaxpr))
    prims = Counter(e.primitive.name for e in eqns)
    whiles = [e for e in eqns if e.primitive.name == "while"]
    inner = {id(e) for w in whiles for e in walk(w.params["body_jaxpr"].jaxpr) if e.primitive.name == "while"}
    (decode,) = [w for w in whiles if id(w) not in inner]
    assert len(whiles) - 1 == len(inner) == int(blocks)
    assert any(e.primitive.name == "dot_general" for e in walk(decode.params["body_jaxpr"].jaxpr))
    assert any(e.primitive.name == "dot_general" and any(TEACHER.hidden_size in v.aval.shape for v in e.invars)
               for e in eqns)
    assert any(e.primitive.name == "sqrt" and e.invars[0].aval.shape == env.tr["embed"].shape for e in eqns)
    assert not [name for name in prims if "callback" in name], prims

    # the lowered module: the same three pieces in one StableHLO module, no python callback custom_call
    events, unregister = compile_events()
    try:
        lowered = env.step.lower(*args)
        text = lowered.as_text()
        assert "stablehlo.while" in text
        assert any("stablehlo.dot_general" in line and f"x{TEACHER.hidden_size}x" in line for line in text.splitlines())
        embed_type = "tensor<{}xf32>".format("x".join(map(str, env.tr["embed"].shape)))
        assert any("stablehlo.sqrt" in line and embed_type in line for line in text.splitlines())
        assert "callback" not in text.lower()
        compiled = lowered.compile()
        assert len(events) <= 1  # one backend compile (none if an earlier test already built it): one executable
        hlo = compiled.as_text()
        assert hlo.count("HloModule ") == 1 and "callback" not in hlo.lower()
        # on one CPU device the decode attention is the FFI kernel, in the same module; a program compiled for a
        # GPU or TPU never holds it, even where the host could build it
        if cpu_kernels.available() and platform == "cpu":
            assert cpu_kernels.DECODE_ATTENTION in hlo
        elif platform != "cpu":
            assert cpu_kernels.DECODE_ATTENTION not in hlo
        # new state + metrics, all produced by that executable
        assert jax.tree.structure(compiled.out_info[0]) == jax.tree.structure(state)

        # calling the jitted step reuses it: no retrace, no recompile, one executable launch per call
        events.clear()
        state, metrics = env.step(*args)
        jax.block_until_ready(metrics)
        with jax.profiler.trace(str(tmp_path)):
            state, metrics = env.step(state, [env.tp], env.batch, env.key, env.sp)
            jax.block_until_ready((state, metrics))
        assert events == [] and env.step._cache_size() == 1
    finally:
        unregister()
    (xplane,) = glob.glob(str(tmp_path / "**" / "*.xplane.pb"), recursive=True)
    names = Counter(ev.name for plane in jax.profiler.ProfileData.from_file(xplane).planes
                    for line in plane.lines for ev in line.events)
    launches = {n: c for n, c in names.items() if "LoadedExecutable::Execute" in n and "Helper" in n}
    assert sum(launches.values()) == 1, launches
    assert not [n for n in names if "callback" in n.lower()]
    assert int(state.step) == 2 and float(metrics["skipped"]) == 0.0
    assert np.isfinite(float(metrics["loss"]))


# ---- learning -----------------------------------------------------------------------------------------
def test_distillation_moves_student_to_teacher(env):
    """200 fused steps toward a fixed, different (wider, peaky) teacher: the per-token reverse KL of the
    student's own samples halves, and the student's greedy completions on held-out prompts become likely under
    the teacher and match the teacher's own greedy completions."""
    teacher = unigram_teacher(env.tp)
    held = prompt_batch(123)
    t_prompts, t_pmask = (jnp.repeat(x, K, axis=0) for x in (held.teacher_tokens, held.teacher_mask))

    def evaluate(state) -> tuple[float, float]:
        """(teacher's mean logprob of the student's greedy tokens, fraction of them that are the teacher's
        greedy choice after the same prefix)."""
        out = env.sampler(state, held, env.key, SamplingParams.create(greedy=True))
        tokens = jnp.concatenate([t_prompts, out.tokens], axis=1)
        mask = jnp.concatenate([t_pmask, out.mask], axis=1)
        logits = env.teacher_logits(teacher, tokens, mask)[:, PT - 1:-1]
        m = out.mask.astype(jnp.float32)
        lp = losses.token_logprobs(logits, out.tokens)
        agree = (jnp.argmax(logits, -1) == out.tokens).astype(jnp.float32)
        return float(jnp.sum(lp * m) / jnp.sum(m)), float(jnp.sum(agree * m) / jnp.sum(m))

    state = new_state(env.opt, env.tr, env.fr)
    lp_before, agree_before = evaluate(state)
    pool = [prompt_batch(seed) for seed in range(1, 33)]
    kls = []
    for i in range(200):
        state, metrics = env.step(state, [teacher], pool[i % len(pool)], env.key, env.sp)
        kls.append(float(metrics["teacher_kl"]))
    assert np.all(np.isfinite(kls))
    first, last = np.mean(kls[:10]), np.mean(kls[-10:])
    assert last <= 0.5 * first, (first, last)
    lp_after, agree_after = evaluate(state)
    assert lp_after >= lp_before + 1.0, (lp_before, lp_after)
    assert agree_after >= agree_before + 0.3, (agree_before, agree_after)


# ---- the 8-device mesh -----------------------------------------------------------------------------------
def test_mesh_step_matches_single_device(env):
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    shardings = state_shardings(env.opt, env.tr, env.fr, env.t_axes, env.f_axes, mesh)
    t_shardings = [tree_shardings(mesh, env.teacher_axes, env.tp)]
    step = make_opd_step(StepBuilder(env.cfg, env.sdef, [env.tdef], mesh, env.opt), shardings, t_shardings,
                         env.batch)
    state = init_train_state(env.opt, jax.tree.map(jnp.copy, env.tr), env.fr, shardings)
    teachers = jax.device_put([env.tp], t_shardings)
    # the weights and their Adam moments really are split over the mesh
    embed_spec = PartitionSpec("tensor", "fsdp")  # (vocab, embed)
    assert state.trainable["embed"].sharding.spec == embed_spec
    assert state.trainable["q"].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert teachers[0]["lm_head"].sharding.spec == PartitionSpec("fsdp", "tensor")
    mu = state.opt_state[0][0].mu
    assert mu["embed"].sharding.spec == embed_spec and not mu["embed"].sharding.is_fully_replicated
    assert len(state.trainable["embed"].addressable_shards) == 8
    assert state.trainable["embed"].addressable_shards[0].data.shape == (32, 8)

    ref_state = new_state(env.opt, env.tr, env.fr)
    for _ in range(2):
        state, metrics = step(state, teachers, env.batch, env.key, env.sp)
        ref_state, ref = env.step(ref_state, [env.tp], env.batch, env.key, env.sp)
        for k in ref:
            np.testing.assert_allclose(float(metrics[k]), float(ref[k]), rtol=1e-4, atol=1e-4, err_msg=k)
        assert float(metrics["skipped"]) == 0.0
    assert state.trainable["embed"].sharding.spec == embed_spec  # the state stays in its layout


# ---- non-finite loss ---------------------------------------------------------------------------------------
def test_nonfinite_loss_skips_the_update(env):
    state = new_state(env.opt, env.tr, env.fr)
    before = to_numpy((state.trainable, state.opt_state))
    bad = dict(env.tp, lm_head=env.tp["lm_head"].at[0, 0].set(jnp.nan))  # NaN teacher logprobs
    state, metrics = env.step(state, [bad], env.batch, env.key, env.sp)
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    after = to_numpy((state.trainable, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, after, before)  # weights and moments untouched
    assert int(state.step) == 1
    # a finite step afterwards updates normally
    state, metrics = env.step(state, [env.tp], env.batch, env.key, env.sp)
    assert float(metrics["skipped"]) == 0.0
    assert not np.array_equal(np.asarray(state.trainable["embed"]), before[0]["embed"])


# ---- update phase: micro-batches, teacher routing and templates -----------------------------------------
@pytest.fixture(scope="module")
def updates(env) -> dict:
    """Jitted update phases (SGD lr 1: new params = params - grads) on the same fixed samples: teacher A alone,
    teacher B alone, and both teachers routed by index with 2 gradient-accumulation micro-batches (one program
    serves the micro-batch and the routing tests: each update-phase compile costs ~10 s of CPU)."""
    def update(teachers, micro_batches=1, kind="importance_sampling"):
        cfg = make_cfg()
        cfg.micro_batches, cfg.loss.kind = micro_batches, kind
        return jax.jit(StepBuilder(cfg, env.sdef, teachers, None, env.sgd).update_phase)

    return {"A": update([env.tdef]), "B": update([env.t2def]), "AB/2": update([env.tdef, env.t2def], 2)}


def run_update(env: SimpleNamespace, fn: Callable, teachers: list, index: int = 0) -> tuple[TrainState, dict]:
    state = new_state(env.sgd, env.tr, env.fr)
    batch = env.batch.replace(teacher_index=jnp.asarray(index, jnp.int32))
    return fn(state, teachers, batch, env.samples)


def test_samples_have_stops_and_full_rows(env):
    lengths = np.asarray(env.samples.lengths)
    assert lengths.min() < NEW and lengths.max() == NEW  # the update tests see partial masks


def test_micro_batches_give_the_same_update(env, updates):
    s1, m1 = run_update(env, updates["A"], [env.tp])
    s2, m2 = run_update(env, updates["AB/2"], [env.tp, env.tp2], index=0)
    assert float(m1["grad_norm"]) > 1e-3
    for k in m1:
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for k in s1.trainable:
        np.testing.assert_allclose(np.asarray(s2.trainable[k]), np.asarray(s1.trainable[k]), rtol=0, atol=1e-5,
                                   err_msg=k)


def test_teachers_routed_by_index_match_each_teacher_alone(env, updates):
    for index, alone, params in ((0, "A", env.tp), (1, "B", env.tp2)):
        s_multi, m_multi = run_update(env, updates["AB/2"], [env.tp, env.tp2], index)
        s_alone, m_alone = run_update(env, updates[alone], [params])
        np.testing.assert_allclose(float(m_multi["teacher_kl"]), float(m_alone["teacher_kl"]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(s_multi.trainable["embed"]), np.asarray(s_alone.trainable["embed"]),
                                   atol=1e-5)
    # the two teachers really differ
    assert abs(float(run_update(env, updates["A"], [env.tp])[1]["teacher_kl"])
               - float(run_update(env, updates["B"], [env.tp2])[1]["teacher_kl"])) > 1e-2


def test_teacher_template_scores_exactly_the_completion(env):
    """The teacher sees its own prompt template (different tokens and length); its logprobs are those of the
    sampled completion tokens, as a plain forward over [teacher prompt, completion] (right-padded) gives."""
    samples = env.samples
    t_prompts, t_pmask = (jnp.repeat(x, K, axis=0) for x in (env.batch.teacher_tokens, env.batch.teacher_mask))
    teacher_outputs = jax.jit(env.builder.teacher_outputs)
    lp = teacher_outputs([env.tp], env.batch.teacher_index, t_prompts, t_pmask, samples.tokens, samples.mask)[0]
    # manual: strip the teacher prompt's left padding, append the completion, right-pad
    rows, starts = [], []
    for i in range(G * K):
        prompt = np.asarray(t_prompts[i])[np.asarray(t_pmask[i])]
        n = int(samples.lengths[i])
        rows.append([*prompt, *np.asarray(samples.tokens[i, :n])])
        starts.append(len(prompt))
    tokens = np.zeros((G * K, PT + NEW), np.int32)
    mask = np.zeros((G * K, PT + NEW), bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, True
    logp = np.asarray(jax.nn.log_softmax(env.teacher_logits(env.tp, jnp.asarray(tokens), jnp.asarray(mask))))
    for i in range(G * K):
        n, s0 = int(samples.lengths[i]), starts[i]
        ref = logp[i, np.arange(s0 - 1, s0 + n - 1), tokens[i, s0:s0 + n]]
        np.testing.assert_allclose(np.asarray(lp[i, :n]), ref, rtol=1e-5, atol=2e-5, err_msg=f"row {i}")
    # the teacher template matters: scoring under the student's prompt gives different numbers
    p_s, m_s = (jnp.repeat(x, K, axis=0) for x in (env.batch.tokens, env.batch.mask))
    lp_student_template = teacher_outputs([env.tp], env.batch.teacher_index, p_s, m_s, samples.tokens,
                                          samples.mask)[0]
    assert float(jnp.max(jnp.abs(lp_student_template - lp) * samples.mask)) > 1e-3


def test_loss_covers_truncated_rows_and_the_stop_token_and_nothing_after_it(env, updates):
    """Issue #26 (what the loss sees at the end of a row): the update equals, to float precision, the gradient of a
    reference written from the sampled token ids alone. A row's loss tokens are its tokens up to and including its
    first stop token, or all NEW tokens when it has none (truncated); each gets the advantage -(log p_sampler - log
    p_teacher) of its own token; nothing after a stop counts. The reference never reads the sampler's mask."""
    samples = env.samples
    tokens = np.asarray(samples.tokens)
    lengths = []
    for row in tokens:
        stops = [t for t, x in enumerate(row) if int(x) in STOPS]
        lengths.append(stops[0] + 1 if stops else NEW)
    lengths = np.asarray(lengths)
    assert (lengths < NEW).any() and (~np.isin(tokens, STOPS).any(axis=1)).any()  # both kinds of row present
    np.testing.assert_array_equal(np.asarray(samples.lengths), lengths)
    np.testing.assert_array_equal(np.asarray(samples.truncated), ~np.isin(tokens, STOPS).any(axis=1))
    keep = np.arange(NEW)[None, :] < lengths[:, None]
    assert (tokens[~keep] == 0).all()  # pad after the stop

    prompts, pmask = (np.repeat(np.asarray(x), K, axis=0) for x in (env.batch.tokens, env.batch.mask))
    t_prompts, t_pmask = (np.repeat(np.asarray(x), K, axis=0) for x in (env.batch.teacher_tokens,
                                                                       env.batch.teacher_mask))

    def completion_logprobs(model_def, params, prompt, prompt_mask, width):
        # [prompt, completion] with every completion position visible: causal attention keeps later tokens out
        full = jnp.concatenate([prompt, tokens], axis=1)
        m = jnp.concatenate([prompt_mask, np.ones_like(tokens, bool)], axis=1)
        logp = jax.nn.log_softmax(full_logits(model_def, params, full, m)[:, width - 1: width + NEW - 1])
        return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]

    lp_teacher = completion_logprobs(env.tdef, env.tp, t_prompts, t_pmask, PT)
    lp_sampler = np.asarray(samples.logprobs)
    advantage = np.where(keep, -(lp_sampler - np.asarray(lp_teacher)), 0.0)

    def reference_loss(trainable):
        lp = completion_logprobs(env.sdef, trainable, prompts, pmask, P)  # no LoRA: frozen is empty
        ratio = jnp.exp(lp - jax.lax.stop_gradient(lp))
        return jnp.sum(jnp.where(keep, -ratio * advantage, 0.0)) / keep.sum()  # make_cfg: token_mean

    ref_grads = jax.grad(reference_loss)(env.tr)
    state, metrics = run_update(env, updates["A"], [env.tp])
    np.testing.assert_allclose(float(metrics["num_tokens"]), keep.sum())
    np.testing.assert_allclose(float(metrics["teacher_kl"]), float(-advantage.sum() / keep.sum()), rtol=1e-5)
    for k in env.tr:  # SGD with lr 1: params - new params = grads
        np.testing.assert_allclose(np.asarray(env.tr[k]) - np.asarray(state.trainable[k]), np.asarray(ref_grads[k]),
                                   rtol=1e-4, atol=1e-6, err_msg=k)
    # tokens after a stop do not matter: garbage there (still masked) leaves the update unchanged
    garbage = samples.replace(tokens=jnp.where(jnp.asarray(keep), samples.tokens, 7),
                              logprobs=jnp.where(jnp.asarray(keep), samples.logprobs, -3.0))
    state2, _ = updates["A"](new_state(env.sgd, env.tr, env.fr), [env.tp], env.batch, garbage)
    for k in env.tr:
        np.testing.assert_allclose(np.asarray(state2.trainable[k]), np.asarray(state.trainable[k]), atol=1e-7,
                                   err_msg=k)


def test_full_vocab_teachers_of_different_widths(env):
    """Full-vocabulary losses route teachers of different hidden sizes too (their hidden states and heads are
    zero-padded to one width); the padded teacher's logits are unchanged."""
    cfg = make_cfg()
    cfg.loss.kind = "reverse_kl"
    builder = StepBuilder(cfg, env.sdef, [env.tdef, env.t2def], None, env.sgd)
    t_prompts, t_pmask = (jnp.repeat(x, K, axis=0) for x in (env.batch.teacher_tokens, env.batch.teacher_mask))

    @jax.jit
    def teacher_logits(index):
        lp, h, head = builder.teacher_outputs([env.tp, env.tp2], index, t_prompts, t_pmask, env.samples.tokens,
                                              env.samples.mask)
        return lp, jnp.einsum("bnd,dv->bnv", h, head)

    lp, logits = teacher_logits(jnp.asarray(1, jnp.int32))
    assert logits.shape == (G * K, NEW, TEACHER.vocab_size)
    # the small teacher's own logits for the completion, from a plain forward
    tokens = jnp.concatenate([t_prompts, env.samples.tokens], 1)
    mask = jnp.concatenate([t_pmask, env.samples.mask], 1)
    ref = jax.jit(lambda p, t, m: full_logits(env.t2def, p, t, m))(env.tp2, tokens, mask)[:, PT - 1:-1]
    m = np.asarray(env.samples.mask)
    np.testing.assert_allclose(np.asarray(logits)[m], np.asarray(ref)[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lp)[m], np.asarray(losses.token_logprobs(ref, env.samples.tokens))[m],
                               rtol=1e-5, atol=1e-5)


# ---- sampling micro-batches ----------------------------------------------------------------------------------
def test_sampling_micro_batches_give_valid_samples(env):
    s = env.samples
    tokens, mask, lp = np.asarray(s.tokens), np.asarray(s.mask), np.asarray(s.logprobs)
    assert tokens.shape == mask.shape == lp.shape == (G * K, NEW)
    assert np.all((tokens >= 0) & (tokens < STUDENT.vocab_size))
    assert np.all(mask[:, 0]) and np.all(mask[:, 1:] <= mask[:, :-1])  # a prefix
    np.testing.assert_array_equal(np.asarray(s.lengths), mask.sum(-1))
    for i in range(G * K):
        n = int(s.lengths[i])
        stopped = tokens[i, n - 1] in STOPS
        assert bool(s.truncated[i]) == (not stopped)
        assert not np.isin(tokens[i, :n - 1], STOPS).any()
        assert np.all(tokens[i, n:] == 0) and np.all(lp[i, n:] == 0)
    assert np.all(lp[mask] < 0)
    np.testing.assert_allclose(np.asarray(s.sampler_logprobs), lp, atol=1e-6)  # T=1, no truncation
    # each row's logprobs are its own prompt's: a teacher-forced forward of the student agrees
    prompts, pmask = (jnp.repeat(x, K, axis=0) for x in (env.batch.tokens, env.batch.mask))
    tok = jnp.concatenate([prompts, s.tokens], 1)
    full_mask = jnp.concatenate([pmask, s.mask], 1)
    forced = losses.token_logprobs(jax.jit(lambda p, t, m: full_logits(env.sdef, p, t, m))(env.tr, tok, full_mask)
                                   [:, P - 1:-1], s.tokens)
    np.testing.assert_allclose(np.asarray(forced)[mask], lp[mask], rtol=1e-4, atol=1e-4)
    # the two micro-batches draw with different keys: rows of one prompt are not all identical
    assert len({tuple(r) for r in tokens[:K]}) > 1


# ---- LoRA student --------------------------------------------------------------------------------------
def test_lora_student(env):
    sdef, lora, base, *_ = init_model(STUDENT, 0, LoRAConfig(rank=4))
    base = jax.tree.map(jnp.copy, env.tr)  # the same base weights as the full student
    assert sdef.lora and lora and all(k.startswith("lora_") for k in lora)
    assert not [k for k in base if k.startswith("lora_")]
    builder = StepBuilder(env.cfg, sdef, [env.tdef], None, env.opt)
    step = make_opd_step(builder, None, None, env.batch)
    state = new_state(env.opt, lora, base)
    # optimizer moments exist for the LoRA leaves only
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(lora))
    assert jax.tree.structure(state.opt_state[0][0].mu) == jax.tree.structure(lora)
    base_before, lora_before = to_numpy(base), to_numpy(lora)

    # B = 0: the first step's samples and teacher KL are the full student's
    _, ref = env.step(new_state(env.opt, env.tr, env.fr), [env.tp], env.batch, env.key, env.sp)
    state, metrics = step(state, [env.tp], env.batch, env.key, env.sp)
    np.testing.assert_allclose(float(metrics["teacher_kl"]), float(ref["teacher_kl"]), rtol=1e-5)
    state, metrics = step(state, [env.tp], env.batch, env.key, env.sp)
    assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, to_numpy(state.frozen), base_before)  # base weights frozen
    assert set(state.trainable) == set(lora)
    assert all(not np.array_equal(np.asarray(state.trainable[k]), lora_before[k]) for k in lora if k.endswith("_b"))


def test_lora_factors_shard_over_fsdp_and_match_unsharded(env):
    """Under pure FSDP every LoRA factor and its Adam moments are split over the mesh (the rank axis takes
    `fsdp` where the factor's other axes are tensor-parallel ones, which pure FSDP leaves whole), and the
    sharded LoRA step equals the single-device one."""
    sdef, lora, _, t_axes, f_axes = init_model(STUDENT, 0, LoRAConfig(rank=8))
    base = jax.tree.map(jnp.copy, env.tr)
    mesh = make_mesh(MeshConfig(fsdp=8, tensor=1))
    shardings = state_shardings(env.opt, lora, base, t_axes, f_axes, mesh)
    t_shardings = [tree_shardings(mesh, env.teacher_axes, env.tp)]
    step = make_opd_step(StepBuilder(env.cfg, sdef, [env.tdef], mesh, env.opt), shardings, t_shardings, env.batch)
    state = init_train_state(env.opt, jax.tree.map(jnp.copy, lora), base, shardings)
    for name, x in state.trainable.items():
        assert not x.sharding.is_fully_replicated, (name, x.sharding.spec)
        assert not state.opt_state[0][0].mu[name].sharding.is_fully_replicated, name
    assert state.trainable["lora_q_b"].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)  # (L, r, H, D)
    assert state.trainable["lora_q_a"].sharding.spec == PartitionSpec(None, "fsdp", None)  # (L, embed, r)

    ref_step = make_opd_step(StepBuilder(env.cfg, sdef, [env.tdef], None, env.opt), None, None, env.batch)
    ref_state = new_state(env.opt, lora, base)
    teachers = jax.device_put([env.tp], t_shardings)
    for _ in range(2):
        state, metrics = step(state, teachers, env.batch, env.key, env.sp)
        ref_state, ref = ref_step(ref_state, [env.tp], env.batch, env.key, env.sp)
        for k in ref:
            np.testing.assert_allclose(float(metrics[k]), float(ref[k]), rtol=1e-4, atol=1e-4, err_msg=k)
    for k in lora:
        np.testing.assert_allclose(np.asarray(state.trainable[k]), np.asarray(ref_state.trainable[k]), atol=1e-5,
                                   err_msg=k)


def test_forward_kl_update_is_sft_on_the_teachers_own_sequences(env):
    """Ties the OPD update path to the SFT path: on sequences a near-deterministic teacher wrote itself, the
    full-vocabulary forward KL to that teacher is the NLL of its tokens, so the two gradients must agree."""
    from opd_jax.baselines.sft import SFTBatch, pack_rows, sft_step
    from opd_jax.sampling import SampleOutput, sample

    cfg = make_cfg()
    cfg.group_size, cfg.loss.kind = 1, "forward_kl"
    tp = dict(env.tp, lm_head=50 * env.tp["lm_head"])  # 400x a fresh head: a one-hot teacher
    b = env.batch.replace(teacher_tokens=env.batch.tokens, teacher_mask=env.batch.mask)  # one template
    written = jax.jit(lambda p, t, m: sample(env.tdef.merge(p), t, m, jax.random.key(3),
                                             SamplingParams.create(greedy=True), max_new_tokens=NEW))(
        tp, b.tokens, b.mask)
    zeros = jnp.zeros(written.tokens.shape, jnp.float32)
    samples = SampleOutput(tokens=written.tokens, mask=written.mask, lengths=written.lengths, logprobs=zeros,
                           sampler_logprobs=zeros, truncated=written.truncated)
    state = new_state(env.sgd, env.tr, env.fr)
    new, _ = jax.jit(StepBuilder(cfg, env.sdef, [env.tdef], None, env.sgd).update_phase)(state, [tp], b, samples)
    g_opd = jax.tree.map(lambda x, y: np.asarray(x - y), env.tr, new.trainable)

    rows = []
    for pt, pm, ct in zip(*map(np.asarray, (b.tokens, b.mask, written.tokens)), strict=True):
        rows.append(([int(t) for t in pt[pm]] + [int(t) for t in ct], [0] * int(pm.sum()) + [1] * NEW))
    arrays, _ = pack_rows(rows, P + NEW)
    sft_new, _ = jax.jit(lambda s, bb: sft_step(env.sdef, env.sgd, None, s, bb, logprob_chunk=4))(
        new_state(env.sgd, env.tr, env.fr), SFTBatch(**{k: jnp.asarray(v) for k, v in arrays.items()}))
    g_sft = jax.tree.map(lambda x, y: np.asarray(x - y), env.tr, sft_new.trainable)
    a = np.concatenate([g.ravel() for g in jax.tree.leaves(g_opd)])
    s = np.concatenate([g.ravel() for g in jax.tree.leaves(g_sft)])
    assert np.linalg.norm(s) > 0
    # not bit-equal: the teacher is almost, not exactly, one-hot (measured: cosine 0.99988, 1.6% apart)
    assert a @ s / (np.linalg.norm(a) * np.linalg.norm(s)) > 0.999
    assert np.linalg.norm(a - s) < 0.05 * np.linalg.norm(s)
