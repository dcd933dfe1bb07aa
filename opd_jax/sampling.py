"""KV-cache sampler: prefill and a `lax.while_loop` decode, fully traceable.

`sample` is a pure traced function: jit it alone (`make_sampler`) or inline it into a larger jitted step
(the fused OPD step does). Prompts are left-padded to a static bucket; RoPE positions come from the pad mask,
so padding never shifts a row's positions.

Two logprobs are recorded for every sampled token:
- `logprobs`: log softmax(logits) at temperature 1 with no truncation — the student's own distribution,
  which the OPD loss and the reverse-KL estimate use.
- `sampler_logprobs`: log of the probability the token was actually drawn with: softmax(logits / T) after
  top-k/top-p truncation and renormalization. Greedy rows record 0 (a point mass). With T=1 and no
  truncation the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opd_jax.mesh import SAMPLING_RULES, with_logical_constraint
from opd_jax.models.qwen3 import Qwen3, model_axes, positions_from_mask


@struct.dataclass
class SampleOutput:
    tokens: jax.Array  # [B, N] int32; pad after a stop
    mask: jax.Array  # [B, N] bool; True for generated tokens, the stop token included
    lengths: jax.Array  # [B] int32
    logprobs: jax.Array  # [B, N] fp32, untempered full-softmax logprob (T=1)
    sampler_logprobs: jax.Array  # [B, N] fp32, logprob under the distribution actually sampled from
    truncated: jax.Array  # [B] bool: reached max_new_tokens without a stop token


@struct.dataclass
class SamplingParams:
    """Traced sampling controls: changing them never recompiles. temperature <= 0 means greedy."""

    temperature: jax.Array
    top_k: jax.Array  # <= 0: off
    top_p: jax.Array  # >= 1: off

    @classmethod
    def create(cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False):
        return cls(
            temperature=jnp.asarray(0.0 if greedy else temperature, jnp.float32),
            top_k=jnp.asarray(top_k, jnp.int32),
            top_p=jnp.asarray(top_p, jnp.float32),
        )


TOP_K_CAP = 64  # static: a traced top_k in [1, TOP_K_CAP] takes a partial sort (lax.top_k), not a full one
TOP_P_CANDIDATES = 1024  # static: top-p alone first looks for its nucleus among this many largest logits


def truncate_logits(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, cap: int = TOP_K_CAP,
                    p_cap: int = TOP_P_CANDIDATES) -> jax.Array:
    """Mask logits outside top-k, then outside the top-p nucleus of the top-k renormalized distribution
    (the order HF applies them). Ties at the threshold are kept.

    At a 152k vocabulary a full sort at every decode step is the expensive part of sampling, so two exact
    shortcuts come first. The kept set lies inside the top-k, so when 0 < top_k <= cap only the `cap` largest
    logits are sorted (`lax.top_k`). Top-p alone takes the `p_cap` largest logits and their probabilities under
    the whole vocabulary: if, in every row, they hold at least top_p of the mass, the nucleus ends among them.
    Otherwise (a flat distribution), or for a top_k above `cap`, the whole vocabulary is sorted. Every path gives
    the same result; `cap` or `p_cap` 0 turns its shortcut off."""
    V = scaled.shape[-1]
    cap, p_cap = min(cap, V), min(p_cap, V)

    def threshold(desc: jax.Array, k: jax.Array, probs: jax.Array | None = None) -> jax.Array:
        """desc [B, n] descending -> the cut [B, 1]. probs: desc's probabilities (default: softmax of its top k)."""
        rank = jnp.arange(desc.shape[-1])
        if probs is None:
            probs = jax.nn.softmax(jnp.where(rank < k, desc, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above this rank
        keep = (rank < k) & ((before < top_p) | (rank == 0))
        n_keep = jnp.sum(keep, axis=-1, keepdims=True)
        return jnp.take_along_axis(desc, n_keep - 1, axis=-1)

    def full(s: jax.Array) -> jax.Array:
        return threshold(-jnp.sort(-s, axis=-1), jnp.where(top_k > 0, jnp.minimum(top_k, V), V))

    def top_p_alone(s: jax.Array) -> jax.Array:
        desc = jax.lax.top_k(s, p_cap)[0]
        probs = jnp.exp(desc - jax.nn.logsumexp(s, axis=-1, keepdims=True))
        covered = jnp.all(jnp.sum(probs, axis=-1) >= top_p)
        return jax.lax.cond(covered, lambda: threshold(desc, p_cap, probs), lambda: full(s))

    def not_top_k(s: jax.Array) -> jax.Array:  # top-k off (top-p alone), or a top_k above cap
        if 0 < p_cap < V:
            return jax.lax.cond(top_k <= 0, top_p_alone, full, s)
        return full(s)

    if cap > 0:
        cut = jax.lax.cond((top_k > 0) & (top_k <= cap), lambda s: threshold(jax.lax.top_k(s, cap)[0], top_k),
                           not_top_k, scaled)
    else:
        cut = not_top_k(scaled)
    return jnp.where(scaled >= cut, scaled, -jnp.inf)


def choose_tokens(logits: jax.Array, key: jax.Array, sp: SamplingParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [B, V] fp32 -> (tokens, untempered logprob, sampler logprob)."""
    greedy = sp.temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, sp.temperature)
    needs_truncation = (sp.top_k > 0) | (sp.top_p < 1.0)
    scaled = jax.lax.cond(needs_truncation, lambda s: truncate_logits(s, sp.top_k, sp.top_p), lambda s: s, scaled)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    full = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    samp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, full, jnp.where(greedy, 0.0, samp)


def reshard_for_sampling(model: Qwen3, mesh: Mesh | None, layout: str) -> Qwen3:
    """Apply the decode-time weight layout with sharding constraints inside the same program, so decode does
    not all-gather FSDP shards at every token."""
    if mesh is None or layout == "train":
        return model
    graphdef, state = nnx.split(model)
    axes, params = model_axes(state), nnx.to_pure_dict(state)
    rules = SAMPLING_RULES[layout]
    params = jax.tree.map(
        lambda a, x: with_logical_constraint(x, a, mesh, rules), axes, params, is_leaf=lambda a: isinstance(a, tuple)
    )
    return nnx.merge(graphdef, params)


def sample(
    model: Qwen3,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    sp: SamplingParams,
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh: Mesh | None = None,
    layout: str = "train",
) -> SampleOutput:
    """Sample `max_new_tokens` (static) continuations of left-padded prompts [B, P]. Traceable."""
    B, P = prompt_tokens.shape
    N = int(max_new_tokens)
    model = reshard_for_sampling(model, mesh, layout)
    rules = SAMPLING_RULES[layout]
    prompt_mask = prompt_mask.astype(bool)
    prompt_len = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
    stops = jnp.asarray(list(stop_token_ids) or [-1], jnp.int32)

    cache = model.init_cache(B, P + N, mesh=mesh, rules=rules)
    hidden, cache = model(prompt_tokens, positions_from_mask(prompt_mask), prompt_mask, cache=cache, mesh=mesh,
                          rules=rules, cache_empty=True)
    logits = model.logits(hidden[:, -1])
    tok, lp, slp = choose_tokens(logits, jax.random.fold_in(key, 0), sp)

    def put(buf, t, val):
        return jax.lax.dynamic_update_slice(buf, val[:, None].astype(buf.dtype), (0, t))

    state = dict(
        t=jnp.ones((), jnp.int32),
        tokens=put(jnp.full((B, N), pad_id, jnp.int32), 0, tok),
        mask=put(jnp.zeros((B, N), bool), 0, jnp.ones((B,), bool)),
        logprobs=put(jnp.zeros((B, N), jnp.float32), 0, lp),
        sampler_logprobs=put(jnp.zeros((B, N), jnp.float32), 0, slp),
        done=jnp.isin(tok, stops),
        last=tok,
        cache=cache,
    )

    def cond(s):
        return (s["t"] < N) & ~jnp.all(s["done"])

    def body(s):
        t = s["t"]
        positions = (prompt_len + t - 1)[:, None]
        hidden, cache = model(s["last"][:, None], positions, jnp.ones((B, 1), bool), cache=s["cache"], mesh=mesh,
                              rules=rules)
        tok, lp, slp = choose_tokens(model.logits(hidden[:, 0]), jax.random.fold_in(key, t), sp)
        live = ~s["done"]
        tok = jnp.where(live, tok, pad_id)
        return dict(
            t=t + 1,
            tokens=put(s["tokens"], t, tok),
            mask=put(s["mask"], t, live),
            logprobs=put(s["logprobs"], t, jnp.where(live, lp, 0.0)),
            sampler_logprobs=put(s["sampler_logprobs"], t, jnp.where(live, slp, 0.0)),
            done=s["done"] | jnp.isin(tok, stops),
            last=tok,
            cache=cache,
        )

    s = jax.lax.while_loop(cond, body, state)
    return SampleOutput(
        tokens=s["tokens"],
        mask=s["mask"],
        lengths=jnp.sum(s["mask"], axis=-1).astype(jnp.int32),
        logprobs=s["logprobs"],
        sampler_logprobs=s["sampler_logprobs"],
        truncated=~s["done"],
    )


_SAMPLERS: dict[tuple, tuple] = {}  # see make_sampler


def make_sampler(
    model_def,
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh: Mesh | None = None,
    layout: str = "train",
    replicate_outputs: bool = False,
):
    """The one jitted sampler on its own: `fn(params, prompt_tokens, prompt_mask, key, SamplingParams) ->
    SampleOutput`, for eval, teacher sampling, visualization and benchmarks (the fused step inlines `sample`).

    model_def: an `nnx.GraphDef` (params: the pure state dict) or anything with `.merge(*params)`, such as
    `train_state.ModelDef` (params: a tuple, e.g. `(trainable, frozen)`). `replicate_outputs=True` (with a mesh)
    returns replicated samples, so every process can read them all back. Samplers are cached on
    (model_def, settings): building one twice does not recompile."""
    stops = tuple(int(t) for t in stop_token_ids)
    key = (id(model_def), int(max_new_tokens), stops, pad_id, id(mesh), layout, replicate_outputs)
    if key in _SAMPLERS:
        return _SAMPLERS[key][-1]
    if hasattr(model_def, "merge"):
        merge = lambda params: model_def.merge(*params)  # noqa: E731
    else:
        merge = lambda params: nnx.merge(model_def, params)  # noqa: E731
    out_sh = NamedSharding(mesh, PartitionSpec()) if (replicate_outputs and mesh is not None) else None

    @partial(jax.jit, out_shardings=out_sh)
    def run(params, prompt_tokens, prompt_mask, key, sp):
        return sample(merge(params), prompt_tokens, prompt_mask, key, sp, max_new_tokens=max_new_tokens,
                      stop_token_ids=stops, pad_id=pad_id, mesh=mesh, layout=layout)

    if len(_SAMPLERS) >= 16:
        _SAMPLERS.pop(next(iter(_SAMPLERS)))
    _SAMPLERS[key] = (model_def, mesh, run)  # holds model_def and mesh alive, so their ids stay theirs
    return run
