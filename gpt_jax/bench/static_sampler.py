"""The static-batch sampler that `generate` used before the serving engine, kept as the
baseline of `gpt-jax bench serve` (row b): a batch of prompts starts together, one prefill of
the whole (padded) batch, then a `lax.while_loop` on the device decodes every row until the
longest is done; the next batch waits for it. Nothing else uses it.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import sampling_filters
from gpt_jax.model import GPT, ModelConfig, init_kv_cache
from gpt_jax.serve.engine import bucket


def static_generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                    eos_id: int = -1) -> list[list[int]]:
    """The generated ids of each prompt (up to and including EOS), one static batch."""
    batch = sampling_filters.power_of_two_bucket(len(prompts))
    prompt_len = bucket(max(len(p) for p in prompts), cfg.block_size)
    out_len = bucket(max_new_tokens, cfg.block_size)
    tokens_BP = np.zeros((batch, prompt_len), np.int32)
    lengths_B = np.ones(batch, np.int32)
    for r, p in enumerate(prompts):
        tokens_BP[r, :len(p)], lengths_B[r] = p, len(p)
    out_BN = np.asarray(_generate(params, tokens_BP, lengths_B, np.int32(seed),
                                  np.int32(max_new_tokens), np.float32(temperature),
                                  np.int32(eos_id), cfg=cfg,
                                  cache_len=min(cfg.block_size, prompt_len + out_len),
                                  out_len=out_len))
    result = []
    for r in range(len(prompts)):
        row = out_BN[r, :max_new_tokens].tolist()
        result.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return result


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "out_len"))
def _generate(params, tokens_BP, lengths_B, seed, max_new_tokens, temperature, eos_id, *,
              cfg: ModelConfig, cache_len: int, out_len: int):
    model, B = GPT(cfg), tokens_BP.shape[0]
    keys_B = jax.vmap(lambda b: jax.random.fold_in(jax.random.key(seed), b))(jnp.arange(B))

    def pick(logits_B1V, t):
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys_B, t)
        return sampling_filters.choose(step_keys, logits_B1V[:, 0, :cfg.vocab_size],
                                       temperature, 0, 1.0)[0]

    cache = init_kv_cache(cfg, B, cache_len)
    positions_BP = jnp.broadcast_to(jnp.arange(tokens_BP.shape[1]), tokens_BP.shape)
    logits_B1V, cache = model.apply({"params": params}, tokens_BP, positions_BP, cache,
                                    lengths_B - 1)
    tok_B = pick(logits_B1V, 0)
    out_BN = jnp.zeros((B, out_len), jnp.int32).at[:, 0].set(tok_B)

    def cond(state):
        t, _, _, done_B, _ = state
        return (t < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        t, cache, tok_B, done_B, out_BN = state
        logits_B1V, cache = model.apply({"params": params}, tok_B[:, None],
                                        (lengths_B + t - 1)[:, None], cache)
        tok_B = pick(logits_B1V, t)
        return t + 1, cache, tok_B, done_B | (tok_B == eos_id), out_BN.at[:, t].set(tok_B)

    state = (jnp.int32(1), cache, tok_B, tok_B == eos_id, out_BN)
    return jax.lax.while_loop(cond, body, state)[4]
