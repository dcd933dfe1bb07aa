"""OPD losses, and logprob/divergence computation in sequence chunks.

Which logprob is which:
- `logp_sampler`: the student's untempered T=1 logprob recorded by the sampler when the token was drawn
  (`SampleOutput.logprobs`). It is the behaviour policy in the importance ratio and the student side of the
  per-token reverse-KL estimate `kl_t = logp_sampler - logp_teacher`.
- `logp_new`: the student's logprob recomputed by the differentiable forward pass in the update.
In the fused synchronous step the two come from the same weights, so the ratio is 1 up to float noise.

Full-vocabulary logits exist only one sequence chunk at a time ([batch, chunk, vocab]); the chunk function
is rematerialized in the backward pass, so no [batch, seq, vocab] fp32 tensor is ever live.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from opd_jax.config.schema import LossConfig

FULL_VOCAB_KINDS = ("reverse_kl", "forward_kl", "jsd", "topk_reverse_kl", "topk_forward_kl")
SAMPLED_KINDS = ("importance_sampling", "ppo")


# ---- chunking ---------------------------------------------------------------------------------------
def chunked_map(fn: Callable[..., dict], chunk: int, *arrays: jax.Array) -> dict:
    """Apply `fn` to sequence chunks of arrays shaped [B, N, ...]; returns fn's per-token outputs as [B, N].

    The sequence is padded up to a multiple of `chunk`; `fn` is checkpointed so the backward pass recomputes
    each chunk's logits instead of storing them."""
    B, N = arrays[0].shape[:2]
    chunk = max(1, min(chunk, N))
    n_chunks = -(-N // chunk)
    pad = n_chunks * chunk - N

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, n_chunks, chunk, *x.shape[2:]), 1, 0)

    body = jax.checkpoint(lambda _, xs: (None, fn(*xs)))
    _, out = jax.lax.scan(body, None, tuple(split(a) for a in arrays))
    return {k: jnp.moveaxis(v, 0, 1).reshape(B, n_chunks * chunk)[:, :N] for k, v in out.items()}


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logz = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - logz


def _xlogy_terms(logp: jax.Array, rhs: jax.Array) -> jax.Array:
    """p * rhs elementwise, with 0 wherever p = 0 (logp = -inf, e.g. a masked logit): the limit of p log p,
    never the NaN of 0 * inf. The unselected branch gets no gradient."""
    p = jnp.exp(logp)
    return jnp.where(p > 0, p * jnp.where(p > 0, rhs, 0.0), 0.0)


def entropy(logits: jax.Array) -> jax.Array:
    """-sum_v p log p over the last axis; logits of -inf (probability 0) contribute 0."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(_xlogy_terms(logp, logp), axis=-1)


# ---- full-vocabulary divergences (per token) ---------------------------------------------------------
def kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """KL(p || q) = sum_v p (log p - log q) over the last axis, from log-probabilities. Tokens with p = 0
    contribute 0 even where q = 0 too (a logit of -inf in both: the true value is finite); p > 0 with q = 0 is
    +inf, as it should be."""
    return jnp.sum(_xlogy_terms(logp, logp - logq), axis=-1)


def reverse_kl(s_logits: jax.Array, t_logits: jax.Array) -> jax.Array:
    return kl(jax.nn.log_softmax(s_logits, -1), jax.nn.log_softmax(t_logits, -1))


def forward_kl(s_logits: jax.Array, t_logits: jax.Array) -> jax.Array:
    return kl(jax.nn.log_softmax(t_logits, -1), jax.nn.log_softmax(s_logits, -1))


def jsd(s_logits: jax.Array, t_logits: jax.Array, beta: float) -> jax.Array:
    """Generalized JSD: beta*KL(t||m) + (1-beta)*KL(s||m), m = beta*t + (1-beta)*s.

    The interior formula vanishes as beta -> 0 or 1 (beta would end up scaling the learning rate), so the
    endpoints are the exact forward (beta=0) and reverse (beta=1) KL."""
    if beta == 0.0:
        return forward_kl(s_logits, t_logits)
    if beta == 1.0:
        return reverse_kl(s_logits, t_logits)
    ls, lt = jax.nn.log_softmax(s_logits, -1), jax.nn.log_softmax(t_logits, -1)
    both_zero = jnp.isneginf(ls) & jnp.isneginf(lt)  # m = 0 there; keep logaddexp (and its gradient) off -inf
    a, b = (jnp.where(both_zero, 0.0, x) for x in (ls + jnp.log1p(-beta), lt + jnp.log(beta)))
    lm = jnp.where(both_zero, -jnp.inf, jnp.logaddexp(a, b))
    return beta * kl(lt, lm) + (1.0 - beta) * kl(ls, lm)


def topk_kl(s_logits: jax.Array, t_logits: jax.Array, k: int, reverse: bool) -> jax.Array:
    """KL over k+1 buckets: the top-k tokens (the student's for reverse KL, the teacher's for forward KL)
    plus one tail bucket with the leftover mass. Differentiates through the student's distribution, so the
    gradient is not the zero-expectation one of a detached top-k advantage."""
    ls, lt = jax.nn.log_softmax(s_logits, -1), jax.nn.log_softmax(t_logits, -1)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(ls if reverse else lt), k)

    def buckets(logp):
        top = jnp.take_along_axis(logp, idx, axis=-1)
        # log(1 - sum p_top), kept finite when the top-k hold all the mass
        tail = jnp.log(jnp.clip(1.0 - jnp.sum(jnp.exp(top), -1, keepdims=True), 1e-20, 1.0))
        return jnp.concatenate([top, tail], axis=-1)

    bs, bt = buckets(ls), buckets(lt)
    return kl(bs, bt) if reverse else kl(bt, bs)


def divergence(cfg: LossConfig, s_logits: jax.Array, t_logits: jax.Array) -> jax.Array:
    kind = cfg.kind
    if kind == "reverse_kl":
        return reverse_kl(s_logits, t_logits)
    if kind == "forward_kl":
        return forward_kl(s_logits, t_logits)
    if kind == "jsd":
        return jsd(s_logits, t_logits, cfg.beta)
    if kind == "topk_reverse_kl":
        return topk_kl(s_logits, t_logits, cfg.topk, reverse=True)
    if kind == "topk_forward_kl":
        return topk_kl(s_logits, t_logits, cfg.topk, reverse=False)
    raise ValueError(f"loss.kind {kind!r} is not a full-vocabulary divergence")


# ---- advantages and policy-gradient losses ------------------------------------------------------------
def discounted_sum(x: jax.Array, mask: jax.Array, gamma: float) -> jax.Array:
    """A_t = sum_{s>=t} gamma^(s-t) x_s over masked tokens (right-to-left scan). gamma=0 returns x."""
    x = x * mask
    if gamma == 0.0:
        return x

    def step(carry, xt):
        carry = xt + gamma * carry
        return carry, carry

    _, out = jax.lax.scan(step, jnp.zeros(x.shape[0], x.dtype), jnp.moveaxis(x, 1, 0), reverse=True)
    return jnp.moveaxis(out, 0, 1) * mask


def opd_advantages(
    cfg: LossConfig,
    logp_sampler: jax.Array,
    logp_teacher: jax.Array,
    mask: jax.Array,
    task_advantage: jax.Array | None = None,
) -> jax.Array:
    """A_t = -kl_coef * (logp_sampler - logp_teacher) (discounted if gamma > 0) + task_coef * A_task.
    `kl_clip` > 0 bounds each token's kl_t: a near-deterministic teacher puts -15..-25 nats on a wrong token, and
    those few tokens would otherwise set the whole batch's update direction."""
    kl_t = jnp.where(mask > 0, logp_sampler - logp_teacher, 0.0)  # a masked -inf teacher logprob is no NaN
    if cfg.kl_clip > 0:
        kl_t = jnp.clip(kl_t, -cfg.kl_clip, cfg.kl_clip)
    adv = discounted_sum(-cfg.kl_penalty_coef * kl_t, mask, cfg.discount)
    if task_advantage is not None:
        ta = task_advantage if task_advantage.ndim == 2 else task_advantage[:, None]
        adv = adv + cfg.task_reward_coef * ta * mask
    return jax.lax.stop_gradient(adv * mask)


def policy_gradient_loss(
    cfg: LossConfig, logp_new: jax.Array, logp_sampler: jax.Array, advantages: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-token loss of the importance-sampling (or PPO-clipped) policy gradient, and the ratio."""
    ratio = jnp.exp(logp_new - jax.lax.stop_gradient(logp_sampler))
    adv = jax.lax.stop_gradient(advantages)
    if cfg.kind == "ppo":
        clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
        per_token = -jnp.minimum(ratio * adv, clipped * adv)
    else:
        per_token = -ratio * adv
    return per_token * mask, ratio


def normalizer(normalization: str, mask: jax.Array) -> jax.Array:
    """Global denominator for a token-summed loss, computed once for the whole batch so micro-batches add up."""
    if normalization == "sum":
        return jnp.ones((), jnp.float32)
    if normalization == "token_mean":
        return jnp.maximum(jnp.sum(mask), 1.0).astype(jnp.float32)
    if normalization == "sequence_mean":
        return jnp.maximum(jnp.sum(jnp.any(mask, axis=-1)), 1.0).astype(jnp.float32)
    raise ValueError(f"loss.normalization: unknown {normalization!r}")


def reduce_tokens(per_token: jax.Array, mask: jax.Array, normalization: str, denom: jax.Array) -> jax.Array:
    """Sum a per-token loss with the configured normalization; `denom` comes from `normalizer` on the batch."""
    if normalization == "sequence_mean":
        lengths = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        return jnp.sum(jnp.sum(per_token * mask, axis=-1) / lengths) / denom
    return jnp.sum(per_token * mask) / denom
