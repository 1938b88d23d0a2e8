"""Parameter counts (published GPT-2 sizes, hand formulas) and training FLOPs per token."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from gpt_jax import flops
from gpt_jax.config import load_preset, typed
from gpt_jax.model import GPT, ModelConfig

# The published sizes of GPT-2 (tied embeddings, learned positions, biases everywhere).
GPT2_PARAMS = {
    "gpt2_124m": 124_439_808,
    "gpt2_350m": 354_823_168,
    "gpt2_774m": 774_030_080,
    "gpt2_1558m": 1_557_611_200,
}


def preset_model(name: str) -> ModelConfig:
    return typed(load_preset(name)).model


def eval_shape_param_count(cfg: ModelConfig) -> int:
    """Count the params of GPT(cfg) from `jax.eval_shape`: shapes only, nothing allocated."""
    tokens_BT = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda rng: GPT(cfg).init(rng, tokens_BT)["params"],
                           jax.random.key(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    return sum(math.prod(x.shape) for x in leaves)


def hand_param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by part, written out from the architecture (not from the code)."""
    V, T, L, D, F = cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd, cfg.mlp_dim
    n_in = 2 if cfg.mlp == "swiglu" else 1  # fc (+ gate)
    matrices = 3 * D * D + D * D + n_in * D * F + F * D  # qkv, attn proj, fc (+gate), mlp proj
    biases = (3 * D + D + n_in * F + D) if cfg.use_bias else 0
    norm = D + (D if cfg.norm == "layernorm" and cfg.use_bias else 0)
    return {
        "blocks": L * (matrices + biases + 2 * norm),
        "final_norm": norm,
        "wte": V * D,
        "lm_head": 0 if cfg.tie_embeddings else D * V,
        "wpe": T * D if cfg.position == "learned" else 0,
    }


def hand_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """6 x (weights a token is multiplied by) + attention's 12 L D T (forward + backward)."""
    parts = hand_param_counts(cfg)
    # The position table and an untied input table are lookups, not matmuls.
    matmul_params = parts["blocks"] + parts["final_norm"] + parts["wte"] + parts["lm_head"]
    if not cfg.tie_embeddings:
        matmul_params -= parts["wte"]
    return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * seq_len


def test_gpt2_124m_by_hand():
    """12 L D^2 + 13 L D + V D + T D + 2 D for GPT-2 small, spelled out."""
    L, D, V, T = 12, 768, 50257, 1024
    assert 12 * L * D**2 + 13 * L * D + V * D + T * D + 2 * D == GPT2_PARAMS["gpt2_124m"]
    assert sum(hand_param_counts(preset_model("gpt2_124m")).values()) == GPT2_PARAMS["gpt2_124m"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(GPT2_PARAMS))
def test_gpt2_presets_have_published_param_counts(name: str):
    cfg = preset_model(name)
    assert eval_shape_param_count(cfg) == GPT2_PARAMS[name]
    assert flops.count_params(cfg) == GPT2_PARAMS[name]
    assert sum(hand_param_counts(cfg).values()) == GPT2_PARAMS[name]


def small_gpt2(**overrides) -> ModelConfig:
    """GPT-2 124m's shapes with 2 layers (the formulas are per layer; tracing 12 is slower)."""
    return dataclasses.replace(preset_model("gpt2_124m"), n_layer=2, **overrides)


VARIANTS = {
    "gpt2": {},
    "untied": {"tie_embeddings": False},
    "llama_like": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "use_bias": False,
                   "mlp_ratio": 8 / 3, "tie_embeddings": False},
    "no_bias_layernorm": {"use_bias": False},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_param_count_matches_hand_formula(variant: str):
    cfg = small_gpt2(**VARIANTS[variant])
    assert eval_shape_param_count(cfg) == sum(hand_param_counts(cfg).values())
    assert flops.count_params(cfg) == sum(hand_param_counts(cfg).values())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("seq_len", [None, 256])
def test_flops_per_token_matches_hand_formula(variant: str, seq_len: int | None):
    cfg = small_gpt2(**VARIANTS[variant])
    expected = hand_flops_per_token(cfg, seq_len or cfg.block_size)
    assert flops.flops_per_token(cfg, seq_len) == expected


def test_flops_per_token_gpt2_124m_closed_form():
    """6 (12 L D^2 + 13 L D + V D + 2 D) + 12 L D T for GPT-2 small at T = 1024."""
    L, D, V, T = 12, 768, 50257, 1024
    n = 12 * L * D**2 + 13 * L * D + V * D + 2 * D
    assert flops.flops_per_token(preset_model("gpt2_124m")) == 6 * n + 12 * L * D * T
    # MaxText's count: attention's causal half only
    assert flops.flops_per_token(preset_model("gpt2_124m"), causal_half=True) == (
        6 * n + 6 * L * D * T)


@pytest.mark.parametrize("tie", [True, False])
def test_vocab_padding_counted_apart(tie: bool):
    plain = small_gpt2(tie_embeddings=tie)
    padded = dataclasses.replace(plain, vocab_multiple=128)  # 50257 -> 50304 rows
    tables = 1 if tie else 2
    assert padded.padded_vocab_size == 50304
    assert eval_shape_param_count(padded) == flops.count_params(padded) == (
        flops.count_params(plain) + tables * 47 * plain.n_embd)
    assert flops.count_params(padded, padding=False) == flops.count_params(plain)
    assert flops.flops_per_token(padded) == flops.flops_per_token(plain)
