"""Log-likelihood of continuations after contexts, in fixed-shape sharded batches.

`loglikelihoods(model_cfg, params, requests)` scores each (context ids, continuation ids)
pair: the row is `context + continuation`, left-truncated to the model's `block_size + 1`
tokens, fed as inputs[:-1] against targets[1:], and only the continuation's targets count.
Every row of one call is right-padded to the same power-of-two length and the rows are cut
into batches of `batch_rows`, so one compiled forward serves every batch of the call.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt_jax.errors import EvalError
from gpt_jax.model import GPT, ModelConfig
from gpt_jax.serve.engine import bucket
from gpt_jax.sharding import activate, batch_sharding, batch_shards


class Request(NamedTuple):
    context: Sequence[int]  # at least one token
    continuation: Sequence[int]  # at least one token, at most block_size


class Score(NamedTuple):
    logprob: float  # sum of the continuation tokens' log-probabilities (natural log)
    tokens: int  # continuation tokens scored
    greedy: bool  # every continuation token was the argmax of its logits


def pack_rows(requests: Sequence[Request], block_size: int, length: int,
              rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, mask), each [rows, length]: one request per row, right-padded.

    Padding rows/columns have mask 0; with causal attention they never affect a real token.
    """
    inputs_NT = np.zeros((rows, length), np.int32)
    targets_NT = np.zeros((rows, length), np.int32)
    mask_NT = np.zeros((rows, length), np.float32)
    for r, (context, continuation) in enumerate(requests):
        seq = (list(context) + list(continuation))[-(block_size + 1):]
        n = len(seq) - 1
        inputs_NT[r, :n], targets_NT[r, :n] = seq[:-1], seq[1:]
        mask_NT[r, n - len(continuation):n] = 1.0
    return inputs_NT, targets_NT, mask_NT


def check_requests(requests: Sequence[Request], vocab_size: int, block_size: int) -> None:
    for i, (context, continuation) in enumerate(requests):
        if not len(context):
            raise EvalError(f"request {i} has an empty context; start it with a BOS token")
        if not 1 <= len(continuation) <= block_size:
            raise EvalError(f"request {i}: the continuation has {len(continuation)} tokens; "
                            f"allowed: 1 to block_size={block_size}")
        bad = [t for t in (*context, *continuation) if not 0 <= t < vocab_size]
        if bad:
            raise EvalError(f"request {i} has token id {bad[0]} outside the model's vocabulary "
                            f"[0, {vocab_size})")


def loglikelihoods(model_cfg: ModelConfig, params, requests: Sequence[Request], *,
                   batch_rows: int = 32, mesh: Mesh | None = None, rules=None) -> list[Score]:
    """One `Score` per request, in order. With `mesh`, rows are split over its batch axes."""
    if not requests:
        return []
    if mesh is not None and rules is None:
        raise EvalError("mesh given without rules; pass the config's logical axis rules")
    requests = [Request(list(map(int, c)), list(map(int, x))) for c, x in requests]
    check_requests(requests, model_cfg.vocab_size, model_cfg.block_size)
    longest = max(min(len(c) + len(x), model_cfg.block_size + 1) - 1 for c, x in requests)
    length = bucket(longest, model_cfg.block_size)
    shards = batch_shards(mesh, rules)
    rows = -(-min(batch_rows, len(requests)) // shards) * shards
    place = _placer(mesh, rules)
    results: list[tuple] = []
    with _activated(mesh, rules):
        for start in range(0, len(requests), rows):
            arrays = pack_rows(requests[start:start + rows], model_cfg.block_size, length, rows)
            results.append(score_fn(mesh)(params, *map(place, arrays), model_cfg=model_cfg))
    sums, counts, greedy = (np.concatenate(x)[:len(requests)]
                            for x in zip(*jax.device_get(results)))
    return [Score(float(s), int(c), bool(g)) for s, c, g in zip(sums, counts, greedy)]


def _activated(mesh: Mesh | None, rules):
    return contextlib.nullcontext() if mesh is None else activate(mesh, rules)


def _placer(mesh: Mesh | None, rules):
    """Host [rows, length] array -> device array, rows split over the mesh's batch axes."""
    if mesh is None:
        return jnp.asarray
    rows = batch_sharding(mesh, rules)
    return lambda a: jax.make_array_from_callback(a.shape, rows, lambda idx: a[idx])


@functools.lru_cache(maxsize=None)
def score_fn(mesh: Mesh | None):
    """`_score_batch` jitted; with a mesh its outputs are replicated, so that every process
    can read them."""
    out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    return jax.jit(_score_batch, static_argnames=("model_cfg",), out_shardings=out)


def _score_batch(params, inputs_BT, targets_BT, mask_BT, *, model_cfg: ModelConfig):
    """(sum of masked target log-probs [B], masked tokens [B], all masked targets greedy [B])."""
    logits_BTV = GPT(model_cfg).apply({"params": params}, inputs_BT).astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
    hit_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    logprob_B = jnp.sum((target_BT - lse_BT) * mask_BT, axis=-1)
    greedy_B = jnp.all(hit_BT | (mask_BT == 0), axis=-1)
    return logprob_B, jnp.sum(mask_BT, axis=-1), greedy_B
