"""Parameter counts and training FLOPs per token (for tokens/s -> MFU)."""

from __future__ import annotations

import math

import jax

from gpt_jax.model import ModelConfig, abstract_params


def count_params(cfg: ModelConfig, padding: bool = True) -> int:
    """Parameters of the params pytree; `padding=False`: without the vocab_multiple rows."""
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))
    if padding:
        return n
    tables = 1 if cfg.tie_embeddings else 2  # the token embedding (and the untied LM head)
    return n - tables * (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd


def count_position_params(cfg: ModelConfig) -> int:
    return cfg.block_size * cfg.n_embd if cfg.position == "learned" else 0


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, *,
                    causal_half: bool = False) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N + 12 L D T (`causal_half`: 6N + 6 L D T,
    attention's unmasked half only, as MaxText counts it).

    N counts the matmul weights a token passes through: every parameter except the position
    table, the value-embedding table and, when untied, the input embedding table (all
    lookups; a tied embedding counts once, as the LM head); with grouped-query attention the
    smaller k/v projection is in N. 12 L D T is attention's QK^T and AV (forward + backward)
    for context T over the n_head query heads (as many with n_kv_head < n_head), without
    discounting the causal half. The vocab_multiple padding is not
    counted: its logits are thrown away, so it is no useful work.
    """
    seq_len = seq_len or cfg.block_size
    n = count_params(cfg, padding=False) - count_position_params(cfg)
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.n_embd  # the input table is looked up, not multiplied
    if cfg.value_embeddings:
        n -= cfg.vocab_size * cfg.kv_heads * cfg.head_dim  # so is the value-embedding table
    return 6 * n + (6 if causal_half else 12) * cfg.n_layer * cfg.n_embd * seq_len
