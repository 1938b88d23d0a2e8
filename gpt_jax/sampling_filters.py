"""Token choice from next-token logits: greedy, temperature, top-k, top-p, composable.

Order (as in most samplers): scale by 1/temperature, keep the `top_k` largest, then keep the
smallest prefix of the sorted survivors whose probability mass reaches `top_p`. `temperature=0`
means greedy (argmax of the raw logits). `top_k=0` and `top_p=1` switch those filters off.

`temperature`, `top_k` and `top_p` are traced values: changing them does not recompile. What is
static is the *shape* of the candidate set: `k_bucket` (top-k runs `lax.top_k` with a power-of-two
`k_bucket >= top_k` and masks the ranks past `top_k`) and `use_top_p` (whether a sort is needed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
MIN_K_BUCKET = 64


def power_of_two_bucket(n: int, minimum: int = 1) -> int:
    """The smallest `minimum * 2**k` (k >= 0) that is >= n: few sizes, few compilations."""
    size = minimum
    while size < n:
        size *= 2
    return size


def k_bucket_for(top_k: int, vocab_size: int) -> int:
    """The static candidate count for `top_k`: 0 (no top-k) or a power of two >= top_k."""
    if top_k <= 0 or top_k >= vocab_size:
        return 0
    return min(power_of_two_bucket(top_k, MIN_K_BUCKET), vocab_size)


def mask_top_k(sorted_BC: jax.Array, top_k: jax.Array) -> jax.Array:
    """Logits sorted in descending order with ranks >= top_k set to -inf (top_k <= 0: none)."""
    ranks_C = jnp.arange(sorted_BC.shape[-1])
    keep_BC = (top_k <= 0) | (ranks_C[None] < top_k)
    return jnp.where(keep_BC, sorted_BC, NEG_INF)


def mask_top_p(sorted_BC: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the shortest descending prefix whose probability reaches top_p (always the first)."""
    probs_BC = jax.nn.softmax(sorted_BC, axis=-1)
    mass_before_BC = jnp.cumsum(probs_BC, axis=-1) - probs_BC
    keep_BC = (mass_before_BC < top_p) | (jnp.arange(sorted_BC.shape[-1])[None] == 0)
    return jnp.where(keep_BC, sorted_BC, NEG_INF)


def candidates(logits_BV: jax.Array, temperature: jax.Array, top_k: jax.Array,
               top_p: jax.Array, *, k_bucket: int, use_top_p: bool):
    """(scaled_BC, ids_BC): filtered, temperature-scaled candidate logits and their token ids.

    `ids_BC` is None when the candidates are the whole vocabulary in order (no filter on).
    """
    scaled_BV = logits_BV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    if k_bucket > 0:
        scaled_BC, ids_BC = jax.lax.top_k(scaled_BV, k_bucket)
        scaled_BC = mask_top_k(scaled_BC, top_k)
    elif use_top_p:
        scaled_BC, ids_BC = jax.lax.top_k(scaled_BV, scaled_BV.shape[-1])  # a full sort
    else:
        scaled_BC, ids_BC = scaled_BV, None
    if use_top_p:
        scaled_BC = mask_top_p(scaled_BC, top_p)
    return scaled_BC, ids_BC


def choose(keys_B: jax.Array, logits_BV: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, *, k_bucket: int, use_top_p: bool):
    """One token per row (a key per row) and its log-prob under the raw model distribution."""
    logits_BV = logits_BV.astype(jnp.float32)

    def draw(_):
        scaled_BC, ids_BC = candidates(logits_BV, temperature, top_k, top_p,
                                       k_bucket=k_bucket, use_top_p=use_top_p)
        pick_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BC)
        if ids_BC is not None:
            pick_B = jnp.take_along_axis(ids_BC, pick_B[:, None], axis=-1)[:, 0]
        return pick_B.astype(jnp.int32)

    def greedy(_):
        return first_argmax(logits_BV)

    # A branch, not a select: greedy decoding skips the random numbers and the sort.
    tokens_B = jax.lax.cond(temperature > 0, draw, greedy, None)
    logit_B = jnp.take_along_axis(logits_BV, tokens_B[:, None], axis=-1)[:, 0]
    return tokens_B, logit_B - jax.nn.logsumexp(logits_BV, axis=-1)


def first_argmax(logits_BV: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the max) as two plain reductions.

    XLA:CPU runs argmax's (value, index) pair reduction unvectorised: 0.9 ms for [8, 50257]
    per decoded token, several times these two passes.
    """
    V = logits_BV.shape[-1]
    is_max_BV = logits_BV == jnp.max(logits_BV, axis=-1, keepdims=True)
    first_B = jnp.min(jnp.where(is_max_BV, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.minimum(first_B, V - 1)  # all-NaN rows: the last id, never out of range
