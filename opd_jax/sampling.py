"""KV-cache sampler: prefill and a `lax.while_loop` decode, fully traceable.

`sample` is a pure traced function: jit it alone (`make_sampler`) or inline it into a larger jitted step
(the fused OPD step does). Prompts are left-padded to a static bucket; RoPE positions come from the pad mask,
so padding never shifts a row's positions.

On GPU and TPU programs (issue #16) the sampler casts the student's weights to the compute dtype once per call
(`cast_weights`) and, with the TPU's dense decode attention, runs the decode loop in segments, each attending
over a static prefix of the cache (`decode_segments`); the decode attention itself is picked per program by
`opd_jax.models.attention.decode_kind`.

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
from opd_jax.models.attention import DECODE_BLOCK, target_platform
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


def choose_tokens(logits: jax.Array, key: jax.Array, sp: SamplingParams, truncation: bool = True
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [B, V] fp32 -> (tokens, untempered logprob, sampler logprob). `key`: one key for the batch, or [B]
    keys, one per row (each row's draw then depends on its own key alone, not on the batch around it).
    `truncation=False` (static) leaves out the top-k/top-p branch, which otherwise runs only when `sp` asks for
    it (a `lax.cond`): for cost accounting of untruncated sampling, where XLA's `cost_analysis()` would count both
    branches."""
    greedy = sp.temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, sp.temperature)
    if truncation:
        needs_truncation = (sp.top_k > 0) | (sp.top_p < 1.0)
        scaled = jax.lax.cond(needs_truncation, lambda s: truncate_logits(s, sp.top_k, sp.top_p), lambda s: s,
                              scaled)
    if key.ndim == 1:  # one key per row
        sampled = jax.vmap(lambda k, row: jax.random.categorical(k, row, axis=-1))(key, scaled)
    else:
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


def cast_for_sampling(model: Qwen3) -> Qwen3:
    """The model with every floating weight wider than its compute dtype cast to it (fp32 params with bf16
    compute: a bf16 copy, half the params' bytes), so decode reads the narrow copy at every step instead of
    reading and converting the wide weights in every layer at every step. The values each layer computes with are
    the same as without (the layers cast the same weights to the same dtype); only where the cast happens moves."""
    dtype = jnp.dtype(model.dtype)
    graphdef, state = nnx.split(model)

    def cast(x):
        wider = jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize > dtype.itemsize
        return x.astype(dtype) if wider else x

    return nnx.merge(graphdef, jax.tree.map(cast, state))


def casts_weights(model: Qwen3, mesh: Mesh | None, cast_weights: str) -> bool:
    """Whether `sample` casts the weights once (`cast_for_sampling`): `sampling.cast_weights` "always", "never",
    or "auto" = on GPU/TPU programs (`target_platform(mesh)`) whose params are wider than the compute dtype.
    On a CPU "auto" keeps the per-layer cast: XLA:CPU fuses it into the weight-slice copies it makes anyway."""
    if cast_weights not in ("auto", "always", "never"):
        raise ValueError(f"sampling.cast_weights must be 'auto', 'always' or 'never', got {cast_weights!r}")
    wider = jnp.dtype(model.param_dtype).itemsize > jnp.dtype(model.dtype).itemsize
    if cast_weights == "auto":
        return wider and target_platform(mesh) != "cpu"
    return cast_weights == "always"


SEGMENT_TOKENS = 1024  # decode_segments=0 with dense decode attention: one segment per this many new tokens
MAX_SEGMENTS = 8  # ... and at most this many (each is a copy of the decode loop in the program)


def decode_segments(prompt_len: int, new_tokens: int, kind: str, segments: int = 0) -> list[tuple[int, int | None]]:
    """The decode loop's segments as [(t_end, limit)]: segment s runs the decode steps t < t_end left after the
    segment before (step t writes slot prompt_len + t - 1), and attends over the first `limit` cache slots, which
    hold every slot it fills. `segments` 0 = auto (see `SamplingConfig.decode_segments`); only "dense" decode
    attention reads a prefix, so every other kind gets one segment with no limit. Ends are placed so that limits
    fall on DECODE_BLOCK multiples. ValueError for a negative count."""
    if segments < 0:
        raise ValueError(f"sampling.decode_segments must be >= 0, got {segments}")
    P, N = prompt_len, new_tokens
    if kind != "dense":
        return [(N, None)]
    k = segments or min(MAX_SEGMENTS, max(1, -(-N // SEGMENT_TOKENS)))
    if k == 1 or N <= 1:
        return [(N, None)]
    ends = []
    for i in range(1, k):
        end = min(N, -(-(P - 1 + -(-i * N // k)) // DECODE_BLOCK) * DECODE_BLOCK - P + 1)
        if end > (ends[-1] if ends else 1) and end < N:
            ends.append(end)
    return [(e, P + e - 1) for e in ends] + [(N, None)]


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
    cast_weights: str = "auto",
    segments: int = 0,
    active: jax.Array | None = None,
) -> SampleOutput:
    """Sample `max_new_tokens` (static) continuations of left-padded prompts [B, P]. Traceable.

    key: one key for the batch, or [B] keys, one per row: each row's tokens then depend on its own key only, so a
    row samples the same completion in any batch (evaluation: results independent of the batch size, up to the
    floating-point effects of another batch shape). active: [B] bool, False for padding rows, which count as
    finished from the start (the decode loop ends when the real rows have; their outputs are empty).
    cast_weights: `sampling.cast_weights` ("auto" | "always" | "never"; see `casts_weights`). segments:
    `sampling.decode_segments` (0 = auto; see `decode_segments`): the decode `while_loop` runs as that many loops
    over consecutive step ranges, each attending over a static cache prefix."""
    B, P = prompt_tokens.shape
    N = int(max_new_tokens)
    model = reshard_for_sampling(model, mesh, layout)
    if casts_weights(model, mesh, cast_weights):
        model = cast_for_sampling(model)
    plan = decode_segments(P, N, model.decode_kind(P + N, mesh), segments)
    rules = SAMPLING_RULES[layout]
    prompt_mask = prompt_mask.astype(bool)
    prompt_len = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
    stops = jnp.asarray(list(stop_token_ids) or [-1], jnp.int32)

    cache = model.init_cache(B, P + N, mesh=mesh, rules=rules)
    hidden, cache = model(prompt_tokens, positions_from_mask(prompt_mask), prompt_mask, cache=cache, mesh=mesh,
                          rules=rules, cache_empty=True)
    logits = model.logits(hidden[:, -1])
    step_key = jax.vmap(jax.random.fold_in, in_axes=(0, None)) if key.ndim == 1 else jax.random.fold_in
    tok, lp, slp = choose_tokens(logits, step_key(key, 0), sp)
    live0 = jnp.ones((B,), bool) if active is None else active.astype(bool)
    tok = jnp.where(live0, tok, pad_id)

    def put(buf, t, val):
        return jax.lax.dynamic_update_slice(buf, val[:, None].astype(buf.dtype), (0, t))

    state = dict(
        t=jnp.ones((), jnp.int32),
        tokens=put(jnp.full((B, N), pad_id, jnp.int32), 0, tok),
        mask=put(jnp.zeros((B, N), bool), 0, live0),
        logprobs=put(jnp.zeros((B, N), jnp.float32), 0, jnp.where(live0, lp, 0.0)),
        sampler_logprobs=put(jnp.zeros((B, N), jnp.float32), 0, jnp.where(live0, slp, 0.0)),
        done=jnp.isin(tok, stops) | ~live0,
        last=tok,
        cache=cache,
    )

    def cond(s):
        return (s["t"] < N) & ~jnp.all(s["done"])

    def body(s, limit=None):
        t = s["t"]
        positions = (prompt_len + t - 1)[:, None]
        hidden, cache = model(s["last"][:, None], positions, jnp.ones((B, 1), bool), cache=s["cache"], mesh=mesh,
                              rules=rules, decode_limit=limit)
        tok, lp, slp = choose_tokens(model.logits(hidden[:, 0]), step_key(key, t), sp)
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

    s = state
    for end, limit in plan:  # one while loop per segment; the last (or only one) ends at N
        seg_cond = cond if end == N else (lambda s, end=end: cond(s) & (s["t"] < end))
        s = jax.lax.while_loop(seg_cond, partial(body, limit=limit), s)
    return SampleOutput(
        tokens=s["tokens"],
        mask=s["mask"],
        lengths=jnp.sum(s["mask"], axis=-1).astype(jnp.int32),
        logprobs=s["logprobs"],
        sampler_logprobs=s["sampler_logprobs"],
        truncated=~s["done"] & live0,
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
    cast_weights: str = "auto",
    segments: int = 0,
):
    """The one jitted sampler on its own: `fn(params, prompt_tokens, prompt_mask, key, SamplingParams, active=None)
    -> SampleOutput` (key and active as in `sample`), for eval, teacher sampling, visualization and benchmarks (the
    fused step inlines `sample`).

    model_def: an `nnx.GraphDef` (params: the pure state dict) or anything with `.merge(*params)`, such as
    `train_state.ModelDef` (params: a tuple, e.g. `(trainable, frozen)`). `replicate_outputs=True` (with a mesh)
    returns replicated samples, so every process can read them all back. cast_weights, segments: as in `sample`.
    Samplers are cached on (model_def, settings): building one twice does not recompile."""
    stops = tuple(int(t) for t in stop_token_ids)
    key = (id(model_def), int(max_new_tokens), stops, pad_id, id(mesh), layout, replicate_outputs, cast_weights,
           segments)
    if key in _SAMPLERS:
        return _SAMPLERS[key][-1]
    if hasattr(model_def, "merge"):
        merge = lambda params: model_def.merge(*params)  # noqa: E731
    else:
        merge = lambda params: nnx.merge(model_def, params)  # noqa: E731
    out_sh = NamedSharding(mesh, PartitionSpec()) if (replicate_outputs and mesh is not None) else None

    @partial(jax.jit, out_shardings=out_sh)
    def run(params, prompt_tokens, prompt_mask, key, sp, active=None):
        return sample(merge(params), prompt_tokens, prompt_mask, key, sp, max_new_tokens=max_new_tokens,
                      stop_token_ids=stops, pad_id=pad_id, mesh=mesh, layout=layout, cast_weights=cast_weights,
                      segments=segments, active=active)

    if len(_SAMPLERS) >= 16:
        _SAMPLERS.pop(next(iter(_SAMPLERS)))
    _SAMPLERS[key] = (model_def, mesh, run)  # holds model_def and mesh alive, so their ids stay theirs
    return run
