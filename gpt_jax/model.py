"""The GPT: token (+ learned) embeddings, N pre-norm blocks, final norm, LM head.

Functional use: `params = model.init(rng, tokens_BT)["params"]`, then
`logits_BTV = model.apply({"params": params}, tokens_BT)`. With a `KVCache` (see
`init_kv_cache`) the same call also writes keys/values at `positions_BT` and returns
`(logits_BTV, kv_cache)`; the sampler uses that for prefill and decoding.
Every parameter has logical axis names (`gpt_jax.axes`); `gpt_jax.sharding` maps them onto
the mesh.

Shape suffixes: `x_BTD` is an array of shape [B, T, D]. The letters, here and in every module:
  B  batch rows                      T  positions of the tokens fed in (sequence length)
  D  model width (n_embd)            V  vocabulary (vocab_size)
  H  attention heads (n_head)        K  features per head (head_dim)
  S  KV-cache slots (key positions)  F  MLP hidden features (mlp_dim); in RoPE: head_dim / 2
  L  layers (stacked, scan_layers)   P  prompt positions (the sampler's padded prompt)
  N  new (generated) tokens          R  result rows of the sampler: prompts x samples
  C  top-k candidates                W  one window of the token stream: T + 1 tokens
  1, 3  literal sizes: one position; the q/k/v triple.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gpt_jax import attention
from gpt_jax.axes import (ACT_BATCH, ACT_EMBED, ACT_HEADS, ACT_KV, ACT_LENGTH, ACT_MLP,
                          ACT_VOCAB, EMBED, HEADS, KV, LAYERS, MLP_HIDDEN, NORM, VOCAB)
from gpt_jax.config import REMAT_CHECKPOINT_POLICIES, ModelConfig

class KVCache(NamedTuple):
    """Keys and values of every layer at every cache slot; slot s holds position s.

    Each layer's keys are [B, H, S, K], heads before slots, so attention reads them as they are
    (a slots-major cache cost a transpose of every layer per decoded token). `keys`/`values`
    are a tuple of n_layer such arrays: each layer updates and reads its own buffer in place,
    where slicing one stacked array copied a layer per token. With `scan_layers` they are one
    stacked [L, B, H, S, K] array each, which the layer scan slices.
    """
    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array


KV_CACHE_AXES = (ACT_BATCH, ACT_HEADS, ACT_LENGTH, ACT_KV)  # of one layer's array


def kv_cache_axes(cfg: ModelConfig) -> tuple[str, ...]:
    """Logical axes of each cache array: one layer's, or ("layers", ...) when stacked."""
    return (LAYERS,) + KV_CACHE_AXES if cfg.scan_layers else KV_CACHE_AXES


def init_kv_cache(cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                  dtype: str | None = None) -> KVCache:
    shape_BHSK = (batch_size, cfg.n_head, max_len or cfg.block_size, cfg.head_dim)
    if cfg.scan_layers:
        zeros = jnp.zeros((cfg.n_layer,) + shape_BHSK, dtype or cfg.dtype)
        return KVCache(zeros, zeros)
    zeros = tuple(jnp.zeros(shape_BHSK, dtype or cfg.dtype) for _ in range(cfg.n_layer))
    return KVCache(zeros, zeros)


def _param(init, axes):
    return nn.with_logical_partitioning(init, axes)


class Dense(nn.Module):
    """x @ W (+ b) contracting `in_axes` of x; W has logical names `axes` (inputs, outputs)."""
    features: tuple[int, ...]
    axes: tuple
    cfg: ModelConfig
    in_axes: tuple[int, ...] = (-1,)
    std: float | None = None
    use_bias: bool | None = None

    @nn.compact
    def __call__(self, x):
        cfg, n_in = self.cfg, len(self.in_axes)
        in_shape = tuple(x.shape[a] for a in self.in_axes)
        kernel = self.param("kernel", _param(nn.initializers.normal(self.std or cfg.init_std),
                                             self.axes), in_shape + self.features,
                            cfg.param_dtype)
        contract = (tuple(a % x.ndim for a in self.in_axes), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(cfg.dtype), kernel.astype(cfg.dtype), (contract, ((), ())))
        if cfg.use_bias if self.use_bias is None else self.use_bias:
            bias = self.param("bias", _param(nn.initializers.zeros, self.axes[n_in:]),
                              self.features, cfg.param_dtype)
            y = y + bias.astype(cfg.dtype)
        return y


def _dense(features, axes, cfg: ModelConfig, *, axis=-1, std=None, name=None, bias=None):
    features = (features,) if isinstance(features, int) else tuple(features)
    in_axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return Dense(features, axes, cfg, in_axes, std, bias, name=name)


def _norm(cfg: ModelConfig, name=None):
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                          scale_init=_param(nn.initializers.ones, (NORM,)), name=name)
    return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=jnp.float32,
                        param_dtype=cfg.param_dtype,
                        scale_init=_param(nn.initializers.ones, (NORM,)),
                        bias_init=_param(nn.initializers.zeros, (NORM,)), name=name)


def apply_rope(x_BTHK: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form) at each token's absolute position."""
    half = x_BTHK.shape[-1] // 2
    freqs_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * freqs_F
    sin_BT1F, cos_BT1F = jnp.sin(angles_BTF)[:, :, None], jnp.cos(angles_BTF)[:, :, None]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], -1)
    return rotated.astype(x_BTHK.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; with a cache, also writes K/V at `positions_BT`.

    `layer_cache` is this layer's (k_BHSK, v_BHSK); only the new slots are written.
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, layer_cache):
        cfg = self.cfg
        qkv_BT3HK = _dense((3, cfg.n_head, cfg.head_dim), (EMBED, None, HEADS, KV), cfg,
                           name="qkv")(x_BTD)
        qkv_BT3HK = checkpoint_name(qkv_BT3HK, "qkv_proj")  # what save_qkv_proj keeps
        q_BTHK, k_BTHK, v_BTHK = (qkv_BT3HK[:, :, i] for i in range(3))
        if cfg.position == "rope":
            q_BTHK = apply_rope(q_BTHK, positions_BT, cfg.rope_theta)
            k_BTHK = apply_rope(k_BTHK, positions_BT, cfg.rope_theta)
        axes = (ACT_BATCH, ACT_LENGTH, ACT_HEADS, ACT_KV)
        q_BTHK = nn.with_logical_constraint(q_BTHK, axes)
        if layer_cache is None:
            out_BTHK = attention.attend(q_BTHK, k_BTHK, v_BTHK, impl=cfg.attention_impl)
        else:
            layer_cache = _write_cache(layer_cache, positions_BT, k_BTHK, v_BTHK)
            k_BHSK, v_BHSK = layer_cache
            # A query at position p sees slots 0..p: what the prompt and earlier steps wrote.
            mask_BTS = jnp.arange(k_BHSK.shape[2])[None, None] <= positions_BT[:, :, None]
            out_BTHK = attention.attend(q_BTHK, k_BHSK.astype(q_BTHK.dtype),
                                        v_BHSK.astype(q_BTHK.dtype), impl=cfg.attention_impl,
                                        mask_BTS=mask_BTS, kv_layout="bhsk")
        out_BTHK = nn.with_logical_constraint(out_BTHK, axes)
        std = cfg.init_std / (2 * cfg.n_layer) ** 0.5  # GPT-2's scaled residual init
        y_BTD = _dense(cfg.n_embd, (HEADS, KV, EMBED), cfg, axis=(-2, -1), std=std,
                       name="proj")(out_BTHK)
        return checkpoint_name(y_BTD, "out_proj"), layer_cache


def _write_cache(layer_cache, positions_BT, k_BTHK, v_BTHK):
    """This layer's (k_BHSK, v_BHSK) with the new keys/values written at `positions_BT`."""
    rows_B1 = jnp.arange(k_BTHK.shape[0])[:, None]
    # Row b, every head, slot positions_BT[b, t]: the indexed values come out as [B, T, H, K].
    index = (rows_B1, slice(None), positions_BT)
    k_BHSK, v_BHSK = layer_cache
    return (k_BHSK.at[index].set(k_BTHK.astype(k_BHSK.dtype)),
            v_BHSK.at[index].set(v_BTHK.astype(v_BHSK.dtype)))


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        h_BTF = _dense(cfg.mlp_dim, (EMBED, MLP_HIDDEN), cfg, name="fc")(x_BTD)
        if cfg.mlp == "swiglu":
            gate_BTF = _dense(cfg.mlp_dim, (EMBED, MLP_HIDDEN), cfg, name="gate")(x_BTD)
            h_BTF = nn.silu(gate_BTF) * h_BTF
        else:
            h_BTF = nn.gelu(h_BTF, approximate=True)  # GPT-2's tanh approximation
        h_BTF = nn.with_logical_constraint(h_BTF, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
        std = cfg.init_std / (2 * cfg.n_layer) ** 0.5
        return _dense(cfg.n_embd, (MLP_HIDDEN, EMBED), cfg, std=std, name="proj")(h_BTF)


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)). Call signature fits `nn.scan`."""
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTD, positions_BT, layer_cache):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        h_BTD = _norm(cfg, "ln_1")(x_BTD).astype(cfg.dtype)
        a_BTD, layer_cache = CausalSelfAttention(cfg, name="attn")(
            h_BTD, positions_BT, layer_cache)
        x_BTD = x_BTD + drop(a_BTD)
        h_BTD = _norm(cfg, "ln_2")(x_BTD).astype(cfg.dtype)
        x_BTD = x_BTD + drop(MLP(cfg, name="mlp")(h_BTD))
        x_BTD = nn.with_logical_constraint(x_BTD, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        return x_BTD, layer_cache


def _block_class(cfg: ModelConfig):
    if cfg.remat_policy == "none":
        return Block
    saved = REMAT_CHECKPOINT_POLICIES[cfg.remat_policy]
    if isinstance(saved, tuple):
        policy = jax.checkpoint_policies.save_only_these_names(*saved)
    else:
        policy = getattr(jax.checkpoint_policies, saved)
    return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


class GPT(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, kv_cache: KVCache | None = None,
                 logits_at_B=None, hidden_only: bool = False):
        """Logits at every position, or, with `logits_at_B`, only at row b's position
        logits_at_B[b] (shape [B, 1, V]: a prefill needs just the last prompt token's).

        V is `padded_vocab_size`; the padded ids' logits are -inf. `hidden_only`: the final
        normalised hidden states x_BTD instead, for `lm_head_logits` (the chunked loss).
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        wte = nn.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       embedding_init=_param(nn.initializers.normal(cfg.init_std),
                                             (VOCAB, EMBED)), name="wte")
        x_BTD = wte(tokens_BT)
        if cfg.position == "learned":
            wpe = nn.Embed(cfg.block_size, cfg.n_embd, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, name="wpe",
                           embedding_init=_param(nn.initializers.normal(0.01), (None, EMBED)))
            x_BTD = x_BTD + wpe(positions_BT)
        x_BTD = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(x_BTD)
        x_BTD = nn.with_logical_constraint(x_BTD, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))

        block = _block_class(cfg)
        if cfg.scan_layers:
            x_BTD, kv_cache = self._scan_blocks(block, x_BTD, positions_BT, kv_cache)
        else:
            x_BTD, kv_cache = self._loop_blocks(block, x_BTD, positions_BT, kv_cache)

        if logits_at_B is not None:
            x_BTD = x_BTD[jnp.arange(B), logits_at_B][:, None]
        x_BTD = _norm(cfg, "ln_f")(x_BTD).astype(cfg.dtype)
        if hidden_only:
            return x_BTD
        if cfg.tie_embeddings:
            logits_BTV = wte.attend(x_BTD)
        else:
            logits_BTV = _dense(cfg.padded_vocab_size, (EMBED, VOCAB), cfg, bias=False,
                                name="lm_head")(x_BTD)
        logits_BTV = mask_padded_vocab(cfg, logits_BTV)
        logits_BTV = nn.with_logical_constraint(logits_BTV, (ACT_BATCH, ACT_LENGTH,
                                                             ACT_VOCAB))
        return logits_BTV if kv_cache is None else (logits_BTV, kv_cache)

    def _loop_blocks(self, block, x_BTD, positions_BT, kv_cache):
        keys = values = None
        if kv_cache is not None:
            keys, values = list(kv_cache.keys), list(kv_cache.values)
        for i in range(self.cfg.n_layer):
            layer_cache = None if keys is None else (keys[i], values[i])
            x_BTD, layer_cache = block(self.cfg, self.deterministic, name=f"h_{i}")(
                x_BTD, positions_BT, layer_cache)
            if keys is not None:
                keys[i], values[i] = layer_cache
        return x_BTD, None if keys is None else KVCache(tuple(keys), tuple(values))

    def _scan_blocks(self, block, x_BTD, positions_BT, kv_cache):
        scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                          "dropout": True},
                          in_axes=(nn.broadcast, 0), length=self.cfg.n_layer,
                          metadata_params={nn.PARTITION_NAME: LAYERS})
        layer_caches = None if kv_cache is None else tuple(kv_cache)
        x_BTD, layer_caches = scanned(self.cfg, self.deterministic, name="h")(
            x_BTD, positions_BT, layer_caches)
        return x_BTD, None if kv_cache is None else KVCache(*layer_caches)


def mask_padded_vocab(cfg: ModelConfig, logits_BTV: jax.Array) -> jax.Array:
    """-inf at the ids past vocab_size (the vocab_multiple padding): never a loss or a sample."""
    if cfg.padded_vocab_size == cfg.vocab_size:
        return logits_BTV
    real_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
    return jnp.where(real_V, logits_BTV, -jnp.inf)


def head_kernel_DV(cfg: ModelConfig, params: dict) -> jax.Array:
    """The LM head as a [D, V] matrix: the transposed token embedding, or lm_head's kernel."""
    if cfg.tie_embeddings:
        return params["wte"]["embedding"].T
    return params["lm_head"]["kernel"]


def lm_head_logits(cfg: ModelConfig, x_BTD: jax.Array, kernel_DV: jax.Array) -> jax.Array:
    """The logits `GPT` returns, from its `hidden_only` states and `head_kernel_DV`."""
    logits_BTV = jnp.dot(x_BTD.astype(cfg.dtype), kernel_DV.astype(cfg.dtype))
    logits_BTV = mask_padded_vocab(cfg, logits_BTV)
    return nn.with_logical_constraint(logits_BTV, (ACT_BATCH, ACT_LENGTH, ACT_VOCAB))


def init_boxed_params(model: GPT, rng: jax.Array) -> dict:
    """`model`'s params, each boxed with its logical axis names, from a one-token batch."""
    return model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(model: GPT, rng: jax.Array) -> dict:
    """`model`'s params as a plain pytree: the initialisation training uses."""
    return nn.unbox(init_boxed_params(model, rng))


def abstract_params(cfg: ModelConfig) -> dict:
    """The params pytree as ShapeDtypeStructs: nothing is allocated."""
    return jax.eval_shape(lambda r: init_params(GPT(cfg), r), jax.random.key(0))
