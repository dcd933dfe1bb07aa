"""KV-cache sampler: greedy parity with transformers, cached-decode vs full-forward logits, both logprobs,
sampling statistics and truncation, traced sampling params, stop tokens and early exit, sharded layouts,
prompt packing and determinism.

Every HF model is a tiny random `Qwen3ForCausalLM` built locally. Compiles are kept few: one sampler per
model shape (module fixtures share it across tests, sampling params are traced), one forward program, one
`choose_tokens` program, one stop-token sampler and one sampler per sharded layout.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_utils import tiny_hf
from scipy.special import chdtrc

from opd_jax.config.schema import MeshConfig
from opd_jax.data.task import PromptTooLongError, bucket_length, pad_prompts
from opd_jax.mesh import make_mesh
from opd_jax.models.qwen3 import Qwen3, abstract_model, model_axes, positions_from_mask
from opd_jax.models.weight_mapping import config_from_hf, params_from_hf
from opd_jax.sampling import (
    SampleOutput,
    SamplingParams,
    casts_weights,
    choose_tokens,
    decode_segments,
    make_sampler,
    sample,
    truncate_logits,
)
from opd_jax.train_state import tree_shardings

torch.set_num_threads(1)

P, N, PAD = 8, 12, 0  # prompt bucket, new tokens, pad id
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27], [40, 41, 42]]  # left-padded to P
GREEDY = SamplingParams.create(greedy=True)
CONFIGS = {
    "gqa2-untied": dict(seed=0, initializer_range=0.15),
    "gqa1-tied": dict(seed=1, num_key_value_heads=4, tie_word_embeddings=True, initializer_range=0.15),
}


@dataclass
class Setup:
    hf: Any
    graphdef: Any
    params: dict
    axes: dict
    sampler: Any  # jitted make_sampler(...) at max_new_tokens=N, no stop tokens


def load_from_hf(hf) -> tuple[Any, dict, dict]:
    """(graphdef, params, logical axes) with HF's weights. Unlike `hf_utils.ours_from_hf` this never runs the
    eager random init (one XLA compile per weight shape, ~9 CPU-s), so the module stays fast."""
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    cfg = config_from_hf(hf.config.to_dict())
    graphdef, state = nnx.split(abstract_model(cfg))
    axes, shapes = model_axes(state), nnx.to_pure_dict(state)
    params = params_from_hf(sd, cfg)
    assert params.keys() == shapes.keys()
    for k, v in shapes.items():
        assert params[k].shape == v.shape, k
        params[k] = jnp.asarray(params[k], v.dtype)
    return graphdef, params, axes


@functools.cache
def setup(name: str) -> Setup:
    hf = tiny_hf(**CONFIGS[name])
    graphdef, params, axes = load_from_hf(hf)
    return Setup(hf, graphdef, params, axes, make_sampler(graphdef, max_new_tokens=N, pad_id=PAD))


@functools.cache
def padded() -> tuple[np.ndarray, np.ndarray]:
    tokens, mask, n_trunc = pad_prompts(PROMPTS, P, pad_id=PAD)
    assert n_trunc == 0
    return tokens, mask


def run(s: Setup, sp: SamplingParams, key: int = 0, prompts: tuple[np.ndarray, np.ndarray] | None = None):
    tokens, mask = padded() if prompts is None else prompts
    return jax.device_get(s.sampler(s.params, tokens, mask, jax.random.key(key), sp))


@functools.cache
def greedy_tokens(name: str) -> np.ndarray:
    return np.asarray(run(setup(name), GREEDY).tokens)


def hf_greedy(hf, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """transformers greedy decoding of exactly N new tokens (no EOS)."""
    ids = torch.tensor(np.asarray(input_ids, np.int64))
    kw = {} if attention_mask is None else dict(attention_mask=torch.tensor(np.asarray(attention_mask, np.int64)))
    with torch.no_grad():
        out = hf.generate(ids, do_sample=False, max_new_tokens=N, min_new_tokens=N, eos_token_id=None,
                          pad_token_id=PAD, **kw)
    return out[:, ids.shape[1]:].numpy()


# ---- one forward program: full no-cache logits and cached prefill + one-token-step logits ------------
@functools.cache
def forward_fn(name: str):
    graphdef = setup(name).graphdef

    @jax.jit
    def fwd(params, prompt, prompt_mask, gen, gen_mask):
        """-> (full-forward logits [B, P+N, V], cached-decode logits [B, N, V] predicting gen[:, t])."""
        model = nnx.merge(graphdef, params)
        toks = jnp.concatenate([prompt, gen], axis=1)
        mask = jnp.concatenate([prompt_mask, gen_mask], axis=1)
        hidden, _ = model(toks, positions_from_mask(mask), mask)
        full = model.logits(hidden)

        B = prompt.shape[0]
        plen = jnp.sum(prompt_mask, axis=-1)
        cache = model.init_cache(B, prompt.shape[1] + gen.shape[1])
        hidden, cache = model(prompt, positions_from_mask(prompt_mask), prompt_mask, cache=cache)
        first = model.logits(hidden[:, -1])

        def step(cache, t):
            h, cache = model(gen[:, t][:, None], (plen + t)[:, None], jnp.ones((B, 1), bool), cache=cache)
            return cache, model.logits(h[:, 0])

        _, rest = jax.lax.scan(step, cache, jnp.arange(gen.shape[1] - 1))
        return full, jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)

    return fwd


def forward(name: str, out: SampleOutput) -> tuple[np.ndarray, np.ndarray]:
    """Full-forward logits at the positions predicting each generated token [B, N, V], and cached ones."""
    tokens, mask = padded()
    full, cached = forward_fn(name)(setup(name).params, tokens, mask, out.tokens, out.mask)
    return np.asarray(full[:, P - 1:P + N - 1]), np.asarray(cached)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def at(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, np.asarray(idx)[..., None], axis=-1)[..., 0]


# ---- greedy parity with transformers --------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers(name):
    s = setup(name)
    out = run(s, GREEDY)
    ours = np.asarray(out.tokens)
    for i, p in enumerate(PROMPTS):  # each row vs HF on its own unpadded prompt
        np.testing.assert_array_equal(ours[i], hf_greedy(s.hf, np.asarray([p]))[0], err_msg=f"row {i}")
    tokens, mask = padded()  # and vs HF's own left-padded batched generate
    np.testing.assert_array_equal(ours, hf_greedy(s.hf, tokens, mask))
    assert np.asarray(out.mask).all() and (np.asarray(out.lengths) == N).all() and np.asarray(out.truncated).all()
    np.testing.assert_array_equal(np.asarray(out.sampler_logprobs), 0.0)  # greedy is a point mass


# ---- logits and logprobs ----------------------------------------------------------------------------
def test_cached_decode_logits_equal_full_forward():
    out = run(setup("gqa2-untied"), SamplingParams.create(temperature=1.0), key=3)
    full, cached = forward("gqa2-untied", out)
    assert np.abs(full).max() > 0.1  # not trivially zero
    np.testing.assert_allclose(cached, full, atol=1e-4, rtol=0)


def test_greedy_logprobs_equal_full_forward():
    out = run(setup("gqa2-untied"), GREEDY)
    full, _ = forward("gqa2-untied", out)
    np.testing.assert_array_equal(np.asarray(out.tokens), full.argmax(-1))
    np.testing.assert_allclose(np.asarray(out.logprobs), at(log_softmax(full), out.tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_sampled_logprobs_untempered_and_tempered(temperature):
    out = run(setup("gqa2-untied"), SamplingParams.create(temperature=temperature), key=7)
    full, _ = forward("gqa2-untied", out)
    toks = np.asarray(out.tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs), at(log_softmax(full), toks), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out.sampler_logprobs), at(log_softmax(full / temperature), toks),
                               atol=1e-4, rtol=0)
    if temperature == 1.0:
        np.testing.assert_allclose(np.asarray(out.sampler_logprobs), np.asarray(out.logprobs), atol=1e-5)


def test_truncated_sampler_logprobs_in_sampler():
    """top-k + top-p inside the real sampler: tokens stay in the kept set, sampler logprobs renormalize."""
    T, k, p = 0.9, 6, 0.8
    out = run(setup("gqa2-untied"), SamplingParams.create(temperature=T, top_k=k, top_p=p), key=11)
    full, _ = forward("gqa2-untied", out)
    toks = np.asarray(out.tokens)
    for b, t in itertools.product(range(toks.shape[0]), range(N)):
        q = kept_probs(full[b, t], T, k, p)
        assert q[toks[b, t]] > 0, (b, t)
        np.testing.assert_allclose(out.sampler_logprobs[b, t], np.log(q[toks[b, t]]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.logprobs), at(log_softmax(full), toks), atol=1e-4, rtol=0)


# ---- choose_tokens statistics ------------------------------------------------------------------------
ROWS, V_SMALL = 8192, 24


@functools.cache
def choose_jit():
    return jax.jit(choose_tokens)


@functools.cache
def fixed_logits() -> np.ndarray:
    return (1.5 * np.random.RandomState(0).randn(V_SMALL)).astype(np.float32)


def kept_probs(logits: np.ndarray, T: float, k: int, p: float) -> np.ndarray:
    """Reference in numpy: softmax(logits / T), top-k, then the top-p nucleus of the renormalized top-k."""
    s = logits.astype(np.float64) / T
    order = np.argsort(-s, kind="stable")
    kk = len(s) if k <= 0 else min(k, len(s))
    top = order[:kk]
    pr = np.exp(s[top] - s[top].max())
    pr /= pr.sum()
    before = np.cumsum(pr) - pr
    kept = top[(before < p) | (np.arange(kk) == 0)]
    q = np.zeros(len(s))
    q[kept] = np.exp(s[kept] - s[kept].max())
    return q / q.sum()


def draw(sp: SamplingParams, key: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    logits = jnp.broadcast_to(jnp.asarray(fixed_logits()), (ROWS, V_SMALL))
    return tuple(np.asarray(x) for x in choose_jit()(logits, jax.random.key(key), sp))


def chisquare_p(tokens: np.ndarray, q: np.ndarray) -> float:
    """Chi-square goodness of fit on the support of q, lumping bins with expected count < 5."""
    counts = np.bincount(tokens, minlength=len(q)).astype(np.float64)
    assert counts[q == 0].sum() == 0, "sampled a token outside the support"
    exp = q * len(tokens)
    big = exp >= 5
    small = (~big) & (q > 0)
    obs_b, exp_b = list(counts[big]), list(exp[big])
    if small.any():
        obs_b.append(counts[small].sum())
        exp_b.append(exp[small].sum())
    return chisquare(np.asarray(obs_b), np.asarray(exp_b))


def chisquare(observed: np.ndarray, expected: np.ndarray) -> float:
    """p-value of Pearson's chi-square statistic (scipy.special only: lighter than importing scipy.stats)."""
    stat = float(np.sum((observed - expected) ** 2 / expected))
    return float(chdtrc(len(observed) - 1, stat))


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_sample_frequencies_match_tempered_softmax(temperature):
    toks, lp, slp = draw(SamplingParams.create(temperature=temperature), key=1)
    q = kept_probs(fixed_logits(), temperature, 0, 1.0)
    assert chisquare_p(toks, q) > 1e-3
    # power check: the same samples reject a different temperature's distribution
    wrong = kept_probs(fixed_logits(), temperature * 1.5, 0, 1.0)
    assert chisquare(np.bincount(toks, minlength=V_SMALL), wrong * ROWS) < 1e-6
    np.testing.assert_allclose(lp, log_softmax(fixed_logits())[toks], atol=1e-5)
    np.testing.assert_allclose(slp, np.log(q[toks]), atol=1e-5)


@pytest.mark.parametrize("T,k,p", [(1.0, 5, 1.0), (1.0, 0, 0.6), (0.8, 8, 0.7), (1.3, 3, 0.95), (1.0, 1, 1.0),
                                   (1.0, 0, 0.0), (1.0, 100, 1.0)])
def test_top_k_top_p_kept_set(T, k, p):
    toks, lp, slp = draw(SamplingParams.create(temperature=T, top_k=k, top_p=p), key=2)
    q = kept_probs(fixed_logits(), T, k, p)
    kept = set(np.flatnonzero(q))
    assert set(np.unique(toks)) <= kept, f"sampled outside the kept set {sorted(kept)}"
    if k > 0 and k < V_SMALL:
        assert len(kept) <= k
    if len(kept) > 1:
        assert chisquare_p(toks, q) > 1e-3
    np.testing.assert_allclose(slp, np.log(q[toks]), atol=1e-5)  # renormalized over the kept set
    np.testing.assert_allclose(lp, log_softmax(fixed_logits())[toks], atol=1e-5)  # untempered, untruncated


@pytest.mark.parametrize("k,p", [(1, 1.0), (20, 0.95), (64, 0.5), (65, 1.0), (200, 0.9), (0, 0.95), (5, 0.0)])
def test_partial_sort_top_k_equals_full_sort(k, p):
    """top_k <= cap uses lax.top_k over `cap` candidates; the kept set is the full sort's, ties included."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 1000)).astype(np.float32)
    logits[:, 500:520] = 3.0  # a 20-way tie near the top of every row
    logits = jnp.asarray(np.round(logits, 1))  # and many ties throughout
    fn = jax.jit(truncate_logits, static_argnames="cap")
    got = fn(logits, jnp.int32(k), jnp.float32(p), cap=64)
    want = fn(logits, jnp.int32(k), jnp.float32(p), cap=0)  # always the full sort
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    assert (np.isfinite(np.asarray(got)).sum(-1) >= 1).all()


@pytest.mark.parametrize("scale,p", [(5.0, 0.9), (5.0, 0.99), (8.0, 0.5), (1.0, 0.9), (0.0, 0.7)])
def test_top_p_alone_candidates_equal_full_sort(scale, p):
    """Top-p alone looks for the nucleus among the largest `p_cap` logits first and falls back to the full sort
    when they hold less than top_p of the mass (scale 1 and the all-tied scale 0 here): same kept set either
    way, ties included."""
    rng = np.random.default_rng(0)
    logits = np.round(scale * rng.normal(size=(4, 2000)), 1).astype(np.float32)  # many ties
    logits[2] = np.round(scale * rng.normal(size=2000) * 1.5, 1)  # one row peakier than the rest
    logits = jnp.asarray(logits)
    fn = jax.jit(truncate_logits, static_argnames=("cap", "p_cap"))
    got = fn(logits, jnp.int32(0), jnp.float32(p), cap=64, p_cap=128)
    want = fn(logits, jnp.int32(0), jnp.float32(p), cap=0, p_cap=0)  # always the full sort
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    kept = np.isfinite(np.asarray(got)).sum(-1)
    assert (kept >= 1).all()
    if scale == 0.0:
        assert (kept == 2000).all()  # all tied: the cut keeps every tie


def test_choose_tokens_greedy():
    toks, lp, slp = draw(SamplingParams.create(greedy=True, top_k=3, top_p=0.5))
    assert (toks == fixed_logits().argmax()).all()
    np.testing.assert_array_equal(slp, 0.0)
    np.testing.assert_allclose(lp, log_softmax(fixed_logits())[toks], atol=1e-5)


def test_sampling_params_are_traced():
    """Temperature, top-k and top-p are traced: new values reuse the compiled program."""
    draw(SamplingParams.create(temperature=0.5))
    n = choose_jit()._cache_size()
    for sp in [SamplingParams.create(temperature=2.0, top_k=4), SamplingParams.create(top_p=0.3),
               SamplingParams.create(greedy=True)]:
        draw(sp)
    assert choose_jit()._cache_size() == n == 1
    s = setup("gqa2-untied")
    for sp in [GREEDY, SamplingParams.create(temperature=0.3, top_k=7, top_p=0.9), SamplingParams.create()]:
        run(s, sp)
    assert s.sampler._cache_size() == 1


def test_determinism():
    s, sp = setup("gqa2-untied"), SamplingParams.create(temperature=1.0)
    a, b, c = run(s, sp, key=5), run(s, sp, key=5), run(s, sp, key=6)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.sampler_logprobs), np.asarray(b.sampler_logprobs))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


# ---- stop tokens and early exit ---------------------------------------------------------------------
def first_stop(g: np.ndarray, stops: set[int]) -> np.ndarray:
    """Index of each row's first stop token, or -1."""
    hit = np.isin(g, list(stops))
    return np.where(hit.any(-1), hit.argmax(-1), -1)


def pick_stops(g: np.ndarray) -> tuple[int, ...]:
    """Stop ids from the greedy output such that one row stops at step 0, one mid-way, one never; plus an id
    that is never generated (several stop ids)."""
    unused = next(t for t in range(127, 0, -1) if t not in g and t != PAD)
    found = []
    for a, b in itertools.product(set(g[:, 0].tolist()) - {PAD}, set(g[:, 1:-1].ravel().tolist()) - {PAD}):
        fs = first_stop(g, {a, b})
        mid = fs[(fs > 0) & (fs < N - 1)]
        if (fs == 0).any() and len(mid) and (fs == -1).any():
            found.append((-int(mid.max()), a, b))  # prefer the latest mid-way stop
    assert found, f"no suitable stop ids in greedy output\n{g}"
    _, a, b = min(found)
    return (int(a), int(b), unused)


@functools.cache
def stop_sampler(stops: tuple[int, ...]):
    """The sampler with stop ids, its model wrapped to count forward calls (prefill + decode iterations)."""
    s = setup("gqa2-untied")
    calls: list[int] = []

    class Counting:
        def __init__(self, model: Qwen3):
            self.model = model

        def __getattr__(self, name):  # init_cache, logits, decode_kind, cfg, dtypes: the model's
            return getattr(self.model, name)

        def __call__(self, tokens, *a, **kw):
            jax.debug.callback(lambda t: calls.append(int(t.shape[1])), tokens)
            return self.model(tokens, *a, **kw)

    @jax.jit
    def fn(params, tokens, mask, key, sp):
        return sample(Counting(nnx.merge(s.graphdef, params)), tokens, mask, key, sp, max_new_tokens=N,
                      stop_token_ids=stops, pad_id=PAD)

    def call(tokens, mask, sp=GREEDY):
        calls.clear()
        out = jax.device_get(fn(s.params, tokens, mask, jax.random.key(0), sp))
        jax.effects_barrier()
        return out, len(calls)

    return call


def test_stop_tokens_end_rows_independently():
    g = greedy_tokens("gqa2-untied")
    stops = pick_stops(g)
    out, n_calls = stop_sampler(stops)(*padded())
    fs = first_stop(g, set(stops))
    toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
    for r in range(len(PROMPTS)):
        end = N if fs[r] < 0 else fs[r] + 1
        np.testing.assert_array_equal(toks[r, :end], g[r, :end], err_msg=f"row {r}")
        assert (toks[r, end:] == PAD).all() and mask[r, :end].all() and not mask[r, end:].any(), r
        assert out.lengths[r] == end and bool(out.truncated[r]) == (fs[r] < 0), r
        assert (np.asarray(out.logprobs)[r, end:] == 0).all()
    assert n_calls == N  # one row never stops: prefill + N - 1 decode steps


def test_early_exit_when_all_rows_stop():
    g = greedy_tokens("gqa2-untied")
    stops = pick_stops(g)
    fs = first_stop(g, set(stops))
    r0 = int(np.flatnonzero(fs == 0)[0])
    prompt = pad_prompts([PROMPTS[r0]] * len(PROMPTS), P, pad_id=PAD)[:2]
    out, n_calls = stop_sampler(stops)(*prompt)
    assert n_calls == 1  # prefill only: the decode loop never ran
    assert (np.asarray(out.tokens)[:, 0] == g[r0, 0]).all() and (np.asarray(out.tokens)[:, 1:] == PAD).all()
    assert (np.asarray(out.lengths) == 1).all() and not np.asarray(out.truncated).any()
    # rows stopping mid-way: the loop runs until the last one stops, not to N
    rows = [r for r in range(len(PROMPTS)) if fs[r] >= 0]
    prompts = [PROMPTS[r] for r in rows] * (len(PROMPTS) // len(rows) + 1)
    out, n_calls = stop_sampler(stops)(*pad_prompts(prompts[: len(PROMPTS)], P, pad_id=PAD)[:2])
    expect = max(fs[r] for r in rows) + 1
    assert n_calls == expect < N
    assert not np.asarray(out.truncated).any() and not np.asarray(out.mask)[:, expect:].any()


# ---- sharded sampling -------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["train", "replicated", "tensor"])
def test_sharded_sampler_matches_unsharded(layout):
    s = setup("gqa2-untied")
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    params = jax.device_put(s.params, tree_shardings(mesh, s.axes, s.params))
    assert len(jax.tree.leaves(params)[0].sharding.device_set) == 8
    fn = make_sampler(s.graphdef, max_new_tokens=N, pad_id=PAD, mesh=mesh, layout=layout)
    tokens, mask = padded()
    key = jax.random.key(0)
    out = jax.device_get(fn(params, tokens, mask, key, GREEDY))
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy_tokens("gqa2-untied"))
    ref = run(s, GREEDY)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-4)
    # sampling too: the same key gives the same tokens regardless of layout
    sp = SamplingParams.create(temperature=1.0)
    out = jax.device_get(fn(params, tokens, mask, key, sp))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(run(s, sp).tokens))


# ---- the accelerator decode paths, run on the CPU -----------------------------------------------------
@functools.cache
def graphdef_with(name: str, **changes):
    """The setup's model definition with config changes (same params): another decode attention, dtype."""
    cfg = dataclasses.replace(config_from_hf(setup(name).hf.config.to_dict()), **changes)
    return nnx.split(abstract_model(cfg))[0]


@pytest.mark.parametrize("kind", ["dense", "pallas"])
def test_accelerator_decode_logprobs_equal_full_forward(kind):
    """The GPU/TPU decode attentions on a CPU (the GPU kernel through the Pallas interpreter), each on the flat
    cache layout: sampled tokens as on the CPU path with the same key, logprobs equal to a full forward."""
    s = setup("gqa2-untied")
    fn = make_sampler(graphdef_with("gqa2-untied", decode_attention=kind), max_new_tokens=N, pad_id=PAD)
    tokens, mask = padded()
    sp = SamplingParams.create(temperature=1.0)
    out = jax.device_get(fn(s.params, tokens, mask, jax.random.key(3), sp))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(run(s, sp, key=3).tokens))
    full, _ = forward("gqa2-untied", out)
    np.testing.assert_allclose(np.asarray(out.logprobs), at(log_softmax(full), out.tokens), atol=1e-4, rtol=0)


def test_unrolled_decode_layers_equal_the_scan():
    """`model.decode_unroll` (the decode step's layers traced one by one, static slices) samples exactly what the
    layer scan samples."""
    s = setup("gqa2-untied")
    tokens, mask = padded()
    sp = SamplingParams.create(temperature=1.0)
    out = jax.device_get(make_sampler(graphdef_with("gqa2-untied", decode_unroll=True), max_new_tokens=N, pad_id=PAD)(
        s.params, tokens, mask, jax.random.key(3), sp))
    ref = run(s, sp, key=3)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5, rtol=0)


def test_decode_segments_equal_one_loop():
    """Dense decode attention in three segments (a 64- then a 128-slot prefix, then the whole 192-slot cache)
    against the CPU block loop over the same 140-token greedy decode: same tokens, logprobs within 1e-5."""
    s = setup("gqa2-untied")
    n = 140
    tokens, mask = padded()
    assert [e for e, _ in decode_segments(P, n, "dense", 3)] == [57, 121, n]
    ref = make_sampler(s.graphdef, max_new_tokens=n, pad_id=PAD)(s.params, tokens, mask, jax.random.key(0), GREEDY)
    seg = make_sampler(graphdef_with("gqa2-untied", decode_attention="dense"), max_new_tokens=n, pad_id=PAD,
                       segments=3)(s.params, tokens, mask, jax.random.key(0), GREEDY)
    np.testing.assert_array_equal(np.asarray(seg.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(seg.logprobs), np.asarray(ref.logprobs), atol=1e-5, rtol=0)


def test_weights_cast_once_change_nothing():
    """fp32 params with bf16 compute: casting the weights once per sampling call gives bit-identical samples and
    logprobs to the per-layer cast (the same weights are cast to the same dtype, only earlier)."""
    s = setup("gqa2-untied")
    gd = graphdef_with("gqa2-untied", dtype="bfloat16", decode_attention="dense")
    tokens, mask = padded()
    sp = SamplingParams.create(temperature=1.0)
    outs = [jax.device_get(make_sampler(gd, max_new_tokens=N, pad_id=PAD, cast_weights=c)(
        s.params, tokens, mask, jax.random.key(5), sp)) for c in ("always", "never")]
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert casts_weights(nnx.merge(gd, s.params), None, "always")
    assert not casts_weights(nnx.merge(gd, s.params), None, "auto")  # a CPU program keeps the per-layer cast


@pytest.mark.parametrize("kind", ["dense", "pallas"])
def test_sharded_accelerator_decode_matches_unsharded(kind):
    """Batch over fsdp, KV heads over tensor: dense attention is partitioned by GSPMD, the GPU kernel runs per
    shard; both give the unsharded CPU path's greedy tokens and logprobs."""
    s = setup("gqa2-untied")
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    params = jax.device_put(s.params, tree_shardings(mesh, s.axes, s.params))
    fn = make_sampler(graphdef_with("gqa2-untied", decode_attention=kind), max_new_tokens=N, pad_id=PAD,
                      mesh=mesh, layout="tensor")
    tokens, mask = padded()
    out = jax.device_get(fn(params, tokens, mask, jax.random.key(0), GREEDY))
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy_tokens("gqa2-untied"))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(run(s, GREEDY).logprobs), atol=1e-4)


# ---- host-side prompt packing -----------------------------------------------------------------------
def test_pad_prompts_left_pads():
    tokens, mask, n = pad_prompts([[1, 2, 3], [4]], 5, pad_id=9)
    np.testing.assert_array_equal(tokens, [[9, 9, 1, 2, 3], [9, 9, 9, 9, 4]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert n == 0 and tokens.dtype == np.int32 and mask.dtype == bool
    tokens, mask, _ = pad_prompts([[1, 2, 3], [4]], 64, bucket=True)
    assert tokens.shape == (2, 16)
    assert [bucket_length(n, 64) for n in (1, 16, 17, 33, 70)] == [16, 16, 32, 64, 64]


def test_pad_prompts_errors_and_truncation():
    with pytest.raises(ValueError, match="row 1 is empty"):
        pad_prompts([[1], [], [2]], 4)
    with pytest.raises(PromptTooLongError, match=r"row 2 has 5 tokens.*max_prompt_len=4"):
        pad_prompts([[1], [2, 3], [1, 2, 3, 4, 5]], 4)
    tokens, mask, n = pad_prompts([[1, 2, 3, 4, 5, 6], [7], [1, 2, 3, 4, 5]], 4, truncate=True)
    assert n == 2
    np.testing.assert_array_equal(tokens, [[3, 4, 5, 6], [0, 0, 0, 7], [2, 3, 4, 5]])
    assert mask.sum() == 9
