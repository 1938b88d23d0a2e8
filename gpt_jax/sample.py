"""The sampler core: KV-cache prefill plus one compiled decode loop, on token ids.

`sample_tokens(model_cfg, params, prompts, ...)` takes lists of token ids and returns a
`SampleOutput` of numpy arrays. Inside one jitted call:

1. Prompts are right-padded to a bucket length P (row b's prompt fills slots [0, len_b)).
   One forward pass over positions 0..P-1 fills an explicit `KVCache` (a pytree of per-layer
   [batch, heads, slots, head_dim] arrays, sharded by `kv_cache_axes`). Padding slots
   hold junk that no query ever sees: the model masks slot s for a query at position p < s,
   and row b's decode step t writes slot len_b + t before reading it.
2. The first new token comes from the logits at len_b - 1; then a `lax.while_loop` feeds each
   row's last token at its own position, appends the next token, and stops when
   `max_new_tokens` are done or every row has produced `eos_id`.

Shapes come from buckets (rows: power of two; prompt: power of two >= 16; new tokens: power of
two >= 16; all capped by the model's block_size), so repeated calls reuse one compilation.
Each row draws from its own key, `fold_in(fold_in(key(seed), hash(prompt)), sample_index)`, so a
prompt's samples do not depend on the other prompts in the call.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt_jax import sampling_filters
from gpt_jax.axes import LogicalRules
from gpt_jax.errors import SamplingError
from gpt_jax.model import GPT, KVCache, ModelConfig, init_kv_cache, kv_cache_axes
from gpt_jax.schema import Section, field
from gpt_jax.sharding import activate, batch_shards, named

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SampleConfig(Section):
    """The `sample` section: what `gpt-jax sample` and `generate` use when not told."""
    name = "sample"
    max_new_tokens: int = field(200)
    temperature: float = field(0.8)
    top_k: int = field(40)
    top_p: float = field(1.0)
    num_samples: int = field(1)
    seed: int = field(0)
    prompt: str = field("")

    def check(self) -> None:
        self.require(0 < self.top_p <= 1, f"sample.top_p={self.top_p} must be in (0, 1]")


class SampleOutput(NamedTuple):
    """Results, one row per (prompt, sample) in prompt-major order (row = i * num_samples + j).

    tokens:   [R, N] int32 generated ids; entries at and past `lengths` are `pad_id`.
    lengths:  [R] generated tokens per row, counting the EOS token when one was produced.
    logprobs: [R, N] float32 log-prob of each generated token under the model (temperature 1,
              no filters); 0 past `lengths`.
    logits:   [R, N, V] float32 logits each token was chosen from (`return_logits=True` only).
    prompt_lengths: [R] prompt tokens actually used (after any truncation).
    num_steps: decode-loop iterations run (< max_new_tokens when every row hit EOS early).
    """
    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray
    logits: np.ndarray | None
    prompt_lengths: np.ndarray
    num_steps: int


def bucket(n: int, cap: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum), but at most `cap` (itself >= n)."""
    return min(sampling_filters.power_of_two_bucket(n, minimum), cap)


def row_bucket(n: int, multiple: int = 1) -> int:
    """Rows padded to a power of two, then to a multiple of the batch-sharding devices."""
    return -(-sampling_filters.power_of_two_bucket(n) // multiple) * multiple


def prompt_hash(prompt: Sequence[int]) -> int:
    """A stable 31-bit hash of a token sequence (keys each row's random stream)."""
    return zlib.crc32(np.asarray(prompt, np.int32).tobytes()) & 0x7FFFFFFF


def decode_completion(tokenizer, tokens: Sequence[int], eos_id: int | None) -> str:
    """The text of generated `tokens`, without the EOS token that ended them."""
    tokens = list(tokens)
    return tokenizer.decode(tokens[:-1] if tokens and tokens[-1] == eos_id else tokens)


def check_sampling_args(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                        num_samples: int) -> None:
    """Raise ValueError naming the first bad value and what is allowed."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise SamplingError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not temperature >= 0:
        raise SamplingError(f"temperature={temperature!r} must be >= 0 (0 means greedy)")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise SamplingError(f"top_k={top_k!r} must be an integer >= 0 (0 means no top-k)")
    if not 0 < top_p <= 1:
        raise SamplingError(f"top_p={top_p!r} must be in (0, 1] (1 means no top-p)")
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise SamplingError(f"num_samples={num_samples!r} must be an integer >= 1")


def fit_prompts(prompts: Sequence[Sequence[int]], *, vocab_size: int, block_size: int,
                max_new_tokens: int, truncate_prompt: bool) -> list[list[int]]:
    """Check each prompt's ids and length against the context; truncate on the left if asked."""
    if len(prompts) == 0:
        raise SamplingError("prompts is empty; pass at least one prompt")
    room = block_size - max_new_tokens
    if room < 1:
        raise SamplingError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                         f"context of block_size={block_size}; use at most {block_size - 1}")
    fitted = []
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise SamplingError(f"prompt {i} is empty; start it with a BOS token")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise SamplingError(f"prompt {i} has token id {bad[0]} outside the model's vocabulary "
                             f"[0, {vocab_size})")
        if len(prompt) > room and not truncate_prompt:
            what = ("is longer than the context" if len(prompt) > block_size else
                    f"plus max_new_tokens={max_new_tokens} overflows the context")
            raise SamplingError(f"prompt {i} has {len(prompt)} tokens, which {what} "
                             f"(block_size={block_size}); allowed: at most {room} prompt tokens "
                             "with this max_new_tokens, or truncate_prompt=True to keep the "
                             "last ones")
        fitted.append(prompt[-room:])
    return fitted


def cache_sharding(model_cfg: ModelConfig, mesh: Mesh | None,
                   rules: LogicalRules | None) -> NamedSharding | None:
    """The NamedSharding of each cache array: `kv_cache_axes` through the logical rules."""
    if mesh is None:
        return None
    return named(mesh, rules, kv_cache_axes(model_cfg))


def sample_tokens(model_cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
                  max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, num_samples: int = 1, seed: int = 0,
                  eos_id: int | None = None, pad_id: int = 0, truncate_prompt: bool = False,
                  return_logits: bool = False, mesh: Mesh | None = None,
                  rules: LogicalRules | None = None) -> SampleOutput:
    """Sample `num_samples` continuations of each prompt (lists of token ids).

    With `mesh` (and the config's logical axis `rules`), `params` should already be sharded
    (e.g. `sharding.shard_like`); the cache is sharded by `kv_cache_axes`.
    """
    check_sampling_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, num_samples=num_samples)
    prompts = fit_prompts(prompts, vocab_size=model_cfg.vocab_size,
                          block_size=model_cfg.block_size, max_new_tokens=max_new_tokens,
                          truncate_prompt=truncate_prompt)
    if mesh is not None and rules is None:
        raise SamplingError("mesh given without rules; pass the config's logical axis rules")
    rows = [p for p in prompts for _ in range(num_samples)]
    num_rows = len(rows)
    batch = row_bucket(num_rows, batch_shards(mesh, rules))
    prompt_len = bucket(max(len(p) for p in rows), model_cfg.block_size)
    out_len = bucket(max_new_tokens, model_cfg.block_size)
    cache_len = min(model_cfg.block_size, prompt_len + out_len)

    prompt_BP = np.full((batch, prompt_len), pad_id, np.int32)
    prompt_len_B = np.ones(batch, np.int32)
    hash_B = np.zeros(batch, np.uint32)
    sample_B = np.zeros(batch, np.uint32)
    for r, prompt in enumerate(rows):
        prompt_BP[r, :len(prompt)] = prompt
        prompt_len_B[r] = len(prompt)
        hash_B[r] = prompt_hash(prompt)
        sample_B[r] = r % num_samples
    live_B = np.arange(batch) < num_rows

    args = (params, prompt_BP, prompt_len_B, hash_B, sample_B, live_B,
            np.int32(seed), np.int32(max_new_tokens), np.float32(temperature), np.int32(top_k),
            np.float32(top_p), np.int32(-1 if eos_id is None else eos_id), np.int32(pad_id))
    static = dict(model_cfg=model_cfg, cache_len=cache_len, out_len=out_len,
                  k_bucket=sampling_filters.k_bucket_for(top_k, model_cfg.vocab_size),
                  use_top_p=bool(top_p < 1.0), return_logits=return_logits,
                  cache_sharding=cache_sharding(model_cfg, mesh, rules), rules=rules)
    if mesh is None:
        outs = _generate(*args, **static)
    else:
        with activate(mesh, rules):
            outs = _generate(*args, **static)
    tokens, logprobs, logits, steps = jax.device_get(outs)

    tokens = tokens[:num_rows, :max_new_tokens]
    is_eos = tokens == (-1 if eos_id is None else eos_id)
    lengths = np.where(is_eos.any(1), is_eos.argmax(1) + 1, int(steps)).astype(np.int32)
    past_end = np.arange(max_new_tokens)[None] >= lengths[:, None]
    return SampleOutput(
        tokens=np.where(past_end, pad_id, tokens).astype(np.int32),
        lengths=lengths,
        logprobs=np.where(past_end, 0.0, logprobs[:num_rows, :max_new_tokens]),
        logits=None if logits is None else logits[:num_rows, :max_new_tokens],
        prompt_lengths=prompt_len_B[:num_rows].copy(),
        num_steps=int(steps))


@functools.partial(jax.jit, static_argnames=("model_cfg", "cache_len", "out_len", "k_bucket",
                                             "use_top_p", "return_logits", "cache_sharding",
                                             "rules"))
def _generate(params, prompt_BP, prompt_len_B, hash_B, sample_B, live_B, seed, max_new_tokens,
              temperature, top_k, top_p, eos_id, pad_id, *, model_cfg: ModelConfig,
              cache_len: int, out_len: int, k_bucket: int, use_top_p: bool,
              return_logits: bool, cache_sharding, rules):
    """Prefill + while-loop decode; returns (tokens_BN, logprobs_BN, logits_BNV|None, steps)."""
    model = GPT(model_cfg)
    B = prompt_BP.shape[0]
    base_key = jax.random.key(seed)
    keys_B = jax.vmap(lambda h, j: jax.random.fold_in(jax.random.fold_in(base_key, h), j))(
        hash_B, sample_B)

    def pick(logits_BV, t):
        step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, t)
        return sampling_filters.choose(step_keys_B, logits_BV, temperature, top_k, top_p,
                                       k_bucket=k_bucket, use_top_p=use_top_p)

    def forward(tokens_BT, positions_BT, cache, logits_at_B=None):
        if cache_sharding is not None:
            cache = jax.lax.with_sharding_constraint(cache, KVCache(cache_sharding,
                                                                    cache_sharding))
        return model.apply({"params": params}, tokens_BT, positions_BT, cache, logits_at_B)

    def real_vocab(logits_B1V):  # the vocab_multiple padding (-inf logits) is never a candidate
        return logits_B1V[:, 0, :model_cfg.vocab_size].astype(jnp.float32)

    # Prefill: the whole (padded) prompt in one pass; row b's next token reads position len_b-1.
    cache = init_kv_cache(model_cfg, B, cache_len)
    positions_BP = jnp.broadcast_to(jnp.arange(prompt_BP.shape[1]), prompt_BP.shape)
    logits_B1V, cache = forward(prompt_BP, positions_BP, cache, prompt_len_B - 1)
    logits_BV = real_vocab(logits_B1V)
    tok_B, logp_B = pick(logits_BV, 0)

    tokens_BN = jnp.full((B, out_len), pad_id, jnp.int32).at[:, 0].set(tok_B)
    logprobs_BN = jnp.zeros((B, out_len), jnp.float32).at[:, 0].set(logp_B)
    logits_BNV = None
    if return_logits:
        logits_BNV = jnp.zeros((B, out_len, model_cfg.vocab_size), jnp.float32)
        logits_BNV = logits_BNV.at[:, 0].set(logits_BV)
    done_B = ~live_B | (tok_B == eos_id)

    def cond(state):
        t, done_B = state[0], state[3]
        return (t < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        t, cache, tok_B, done_B, tokens_BN, logprobs_BN, logits_BNV = state
        positions_B1 = (prompt_len_B + t - 1)[:, None]
        logits_B1V, cache = forward(jnp.where(done_B, pad_id, tok_B)[:, None], positions_B1,
                                    cache)
        logits_BV = real_vocab(logits_B1V)
        tok_B, logp_B = pick(logits_BV, t)
        tok_B = jnp.where(done_B, pad_id, tok_B)
        tokens_BN = tokens_BN.at[:, t].set(tok_B)
        logprobs_BN = logprobs_BN.at[:, t].set(jnp.where(done_B, 0.0, logp_B))
        if logits_BNV is not None:
            logits_BNV = logits_BNV.at[:, t].set(logits_BV)
        done_B = done_B | (tok_B == eos_id)
        return t + 1, cache, tok_B, done_B, tokens_BN, logprobs_BN, logits_BNV

    state = (jnp.int32(1), cache, tok_B, done_B, tokens_BN, logprobs_BN, logits_BNV)
    steps, _, _, _, tokens_BN, logprobs_BN, logits_BNV = jax.lax.while_loop(cond, body, state)
    outs = tokens_BN, logprobs_BN, logits_BNV, steps
    if cache_sharding is not None:  # replicated, so that every process can read them
        outs = jax.lax.with_sharding_constraint(
            outs, NamedSharding(cache_sharding.mesh, PartitionSpec()))
    return outs
