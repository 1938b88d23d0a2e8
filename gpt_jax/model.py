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
  G  key/value heads (kv_heads)      Q  query heads per key/value head: H / G
  J  fused q/k/v rows: Q + 2         X  grouped attention's query rows: T * Q
  1, 3  literal sizes: one position; the q/k/v triple.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gpt_jax import attention
from gpt_jax.axes import (
    ACT_BATCH,
    ACT_EMBED,
    ACT_HEADS,
    ACT_KV,
    ACT_LENGTH,
    ACT_MLP,
    ACT_VOCAB,
    EMBED,
    HEADS,
    KV,
    LAYERS,
    MLP_HIDDEN,
    NORM,
    VOCAB,
)
from gpt_jax.schema import Section, field

ATTENTION_IMPLS = attention.IMPLS
# remat_policy -> the `jax.checkpoint_policies` member a block is rematerialised with, or a
# tuple of `checkpoint_name`s (below) for `save_only_these_names`: only those are kept.
REMAT_CHECKPOINT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": "nothing_saveable",  # recompute the whole block in the backward pass
    "save_dots": "checkpoint_dots",
    "save_dots_no_batch": "checkpoint_dots_with_no_batch_dims",
    "save_qkv_proj": ("qkv_proj",),  # the attention's q/k/v projection
    "save_out_proj": ("out_proj",),  # the attention's output projection
    "save_qkv_out_proj": ("qkv_proj", "out_proj"),
}
REMAT_POLICIES = tuple(REMAT_CHECKPOINT_POLICIES)
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """The `model` section: the GPT's shape (`arch`: a fine-tune takes these from its parent)
    and how it computes (the rest: a fine-tune chooses them itself). Frozen and hashable, so
    that Flax modules and compiled functions can hold it."""
    name = "model"
    vocab_size: int = field(4096, arch=True, resume=True)
    block_size: int = field(256, arch=True, resume=True)  # context length
    n_layer: int = field(4, arch=True, resume=True)
    n_head: int = field(4, arch=True, resume=True)
    n_embd: int = field(256, arch=True, resume=True)
    mlp: str = field("gelu", arch=True, resume=True)  # gelu | swiglu | relu2 (squared ReLU)
    mlp_ratio: float = field(4.0, arch=True, resume=True)  # MLP hidden width / n_embd
    norm: str = field("layernorm", arch=True, resume=True)  # layernorm | rmsnorm
    norm_eps: float = field(1e-5, arch=True)
    position: str = field("learned", arch=True, resume=True)  # learned | rope
    rope_theta: float = field(10_000.0, arch=True)
    tie_embeddings: bool = field(True, arch=True, resume=True)  # the LM head is the embedding
    use_bias: bool = field(True, arch=True, resume=True)
    dropout: float = field(0.0)
    dtype: str = field("float32")  # compute dtype
    param_dtype: str = field("float32")
    attention_impl: str = field("auto")  # auto (TPU: splash if it fits, else xla) | xla | ...
    scan_layers: bool = field(False, arch=True, resume=True)  # one nn.scan over stacked layers
    remat_policy: str = field("none")  # see REMAT_CHECKPOINT_POLICIES
    init_std: float = field(0.02)
    # >1: the loss runs the LM head + log-softmax over this many sequence chunks, recomputed in
    # the backward pass, so no [B, T, V] float32 logits exist at once; 0 or 1: one piece.
    loss_chunks: int = field(0)
    # Embedding/head rows padded to a multiple of this (e.g. 128, the TPU tile); the padded
    # logits are -inf: no loss, no sample. 1: no padding.
    vocab_multiple: int = field(1, arch=True, resume=True)
    n_kv_head: int = field(0, arch=True, resume=True)  # key/value heads (GQA); 0: n_head
    qk_norm: bool = field(False, arch=True, resume=True)  # RMSNorm on each query and key head
    zero_init_proj: bool = field(False, arch=True)  # output projections start at zero
    logit_softcap: float = field(0.0, arch=True)  # >0: logits = cap * tanh(logits / cap)
    # Per-layer v = a*v + b*value_embed(tokens): an extra [vocab, kv width] table; a=1, b=0 at init.
    value_embeddings: bool = field(False, arch=True, resume=True)

    def check(self) -> None:
        self.positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio",
                      "norm_eps")
        self.require(self.n_embd % self.n_head == 0, f"model.n_embd={self.n_embd} is not "
                     f"divisible by model.n_head={self.n_head}")
        if self.position == "rope":
            self.require(self.head_dim % 2 == 0, "model.position='rope' needs an even head "
                         f"size, got {self.head_dim}")
        self.require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout!r} must be in "
                     "[0, 1)")
        for name, allowed in (("attention_impl", ATTENTION_IMPLS), ("remat_policy", REMAT_POLICIES),
                              ("position", POSITIONS), ("norm", NORMS), ("mlp", MLPS),
                              ("dtype", DTYPES), ("param_dtype", DTYPES)):
            self.one_of(name, allowed)
        self.require(self.loss_chunks >= 0, f"model.loss_chunks={self.loss_chunks} must be >= 0 "
                     "(0 or 1: off)")
        if self.loss_chunks > 1:
            self.require(self.block_size % self.loss_chunks == 0, f"model.loss_chunks="
                         f"{self.loss_chunks} does not divide model.block_size={self.block_size}")
        self.require(self.n_kv_head >= 0, f"model.n_kv_head={self.n_kv_head} must be >= 0 "
                     "(0: n_head)")
        if self.n_kv_head:
            self.require(self.n_head % self.n_kv_head == 0, f"model.n_head={self.n_head} is not "
                         f"divisible by model.n_kv_head={self.n_kv_head}")
        self.require(self.logit_softcap >= 0, f"model.logit_softcap={self.logit_softcap} must "
                     "be >= 0 (0: off)")
        self.require(self.vocab_multiple >= 1, f"model.vocab_multiple={self.vocab_multiple} "
                     "must be >= 1 (1: no padding)")

    def check_mesh(self, tensor: int) -> None:
        """Heads (and key/value heads) split over the mesh's `tensor` axis."""
        self.require(self.n_head % tensor == 0, f"model.n_head={self.n_head} is not divisible "
                     f"by mesh.tensor={tensor}")
        self.require(self.n_kv_head % tensor == 0, f"model.n_kv_head={self.n_kv_head} is not "
                     f"divisible by mesh.tensor={tensor} (key/value heads are split over it)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_dim(self) -> int:
        return int(round(self.mlp_ratio * self.n_embd))

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head: vocab_size up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


class KVCache(NamedTuple):
    """Keys and values of every layer at every cache slot; slot s holds position s.

    Each layer's keys are [B, G, S, K] (G: key/value heads), heads before slots, so attention
    reads them as they are (a slots-major cache cost a transpose of every layer per decoded
    token). `keys`/`values`
    are a tuple of n_layer such arrays: each layer updates and reads its own buffer in place,
    where slicing one stacked array copied a layer per token. With `scan_layers` they are one
    stacked [L, B, G, S, K] array each, which the layer scan slices.
    """
    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array


KV_CACHE_AXES = (ACT_BATCH, ACT_HEADS, ACT_LENGTH, ACT_KV)  # of one layer's array


def kv_cache_axes(cfg: ModelConfig) -> tuple[str, ...]:
    """Logical axes of each cache array: one layer's, or ("layers", ...) when stacked."""
    return (LAYERS,) + KV_CACHE_AXES if cfg.scan_layers else KV_CACHE_AXES


def init_kv_cache(cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                  dtype: str | None = None) -> KVCache:
    shape_BGSK = (batch_size, cfg.kv_heads, max_len or cfg.block_size, cfg.head_dim)
    if cfg.scan_layers:
        zeros = jnp.zeros((cfg.n_layer,) + shape_BGSK, dtype or cfg.dtype)
        return KVCache(zeros, zeros)
    zeros = tuple(jnp.zeros(shape_BGSK, dtype or cfg.dtype) for _ in range(cfg.n_layer))
    return KVCache(zeros, zeros)


def _param(init, axes):
    return nn.with_logical_partitioning(init, axes)


class Dense(nn.Module):
    """x @ W (+ b) contracting `in_axes` of x; W has logical names `axes` (inputs, outputs).

    W ~ normal(std) (default cfg.init_std); std 0: W starts at zero."""
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
        std = cfg.init_std if self.std is None else self.std
        init = nn.initializers.normal(std) if std else nn.initializers.zeros
        kernel = self.param("kernel", _param(init, self.axes), in_shape + self.features,
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


def _norm(cfg: ModelConfig, name=None, rms: bool = False):
    """cfg.norm over the last axis (float32); `rms`: RMSNorm whatever cfg.norm says."""
    if rms or cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                          scale_init=_param(nn.initializers.ones, (NORM,)), name=name)
    return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=jnp.float32,
                        param_dtype=cfg.param_dtype,
                        scale_init=_param(nn.initializers.ones, (NORM,)),
                        bias_init=_param(nn.initializers.zeros, (NORM,)), name=name)


def _residual_std(cfg: ModelConfig) -> float:
    """Init std of the projections into the residual stream: GPT-2's scaled init, or 0."""
    return 0.0 if cfg.zero_init_proj else cfg.init_std / (2 * cfg.n_layer) ** 0.5


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

    G = cfg.kv_heads key/value heads; query head g * Q + i reads key/value head g. The fused
    projection is [D, Q + 2, G, K]: rows :Q are queries, then k, then v ([D, 3, H, K] when
    G == H). `ve_BTGK`: the value embeddings of the tokens (cfg.value_embeddings), else None.
    `layer_cache` is this layer's (k_BGSK, v_BGSK); only the new slots are written.
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, ve_BTGK, layer_cache):
        cfg = self.cfg
        (B, T), H, G, K = x_BTD.shape[:2], cfg.n_head, cfg.kv_heads, cfg.head_dim
        Q = H // G
        qkv_BTJGK = _dense((Q + 2, G, K), (EMBED, None, HEADS, KV), cfg, name="qkv")(x_BTD)
        qkv_BTJGK = checkpoint_name(qkv_BTJGK, "qkv_proj")  # what save_qkv_proj keeps
        q_BTHK = jnp.swapaxes(qkv_BTJGK[:, :, :Q], 2, 3).reshape(B, T, H, K)
        k_BTGK, v_BTGK = qkv_BTJGK[:, :, Q], qkv_BTJGK[:, :, Q + 1]
        if cfg.qk_norm:
            q_BTHK = _norm(cfg, "q_norm", rms=True)(q_BTHK).astype(cfg.dtype)
            k_BTGK = _norm(cfg, "k_norm", rms=True)(k_BTGK).astype(cfg.dtype)
        if ve_BTGK is not None:
            a, b = (self.param(name, _param(nn.initializers.constant(value), ()), (),
                               cfg.param_dtype).astype(cfg.dtype)
                    for name, value in (("v_scale", 1.0), ("ve_scale", 0.0)))
            v_BTGK = a * v_BTGK + b * ve_BTGK
        if cfg.position == "rope":
            q_BTHK = apply_rope(q_BTHK, positions_BT, cfg.rope_theta)
            k_BTGK = apply_rope(k_BTGK, positions_BT, cfg.rope_theta)
        axes = (ACT_BATCH, ACT_LENGTH, ACT_HEADS, ACT_KV)
        q_BTHK = nn.with_logical_constraint(q_BTHK, axes)
        if layer_cache is None:
            out_BTHK = attention.attend(q_BTHK, k_BTGK, v_BTGK, impl=cfg.attention_impl)
        else:
            layer_cache = _write_cache(layer_cache, positions_BT, k_BTGK, v_BTGK)
            k_BGSK, v_BGSK = layer_cache
            if T == 1:  # a decode step: only the slots up to each row's position are read
                # (a cache with more rows than the batch: the batch is its first B rows)
                out_BTHK = attention.decode_attention(q_BTHK, k_BGSK, v_BGSK,
                                                      positions_BT[:, 0])
            else:
                # A query at position p sees slots 0..p: what the prompt and earlier steps wrote.
                mask_BTS = jnp.arange(k_BGSK.shape[2])[None, None] <= positions_BT[:, :, None]
                out_BTHK = attention.attend(q_BTHK, k_BGSK.astype(q_BTHK.dtype),
                                            v_BGSK.astype(q_BTHK.dtype), impl=cfg.attention_impl,
                                            mask_BTS=mask_BTS, kv_layout="bhsk")
        out_BTHK = nn.with_logical_constraint(out_BTHK, axes)
        y_BTD = _dense(cfg.n_embd, (HEADS, KV, EMBED), cfg, axis=(-2, -1),
                       std=_residual_std(cfg), name="proj")(out_BTHK)
        return checkpoint_name(y_BTD, "out_proj"), layer_cache


def _write_cache(layer_cache, positions_BT, k_BTGK, v_BTGK, whole: bool | None = None):
    """This layer's (k_BGSK, v_BGSK) with the new keys/values written at `positions_BT`: a
    scatter, or for one token per row with `whole` (default on TPU, see
    `attention.whole_cache_decode`) a select over the first B rows of the cache."""
    B, T = k_BTGK.shape[:2]
    if T == 1 and (whole if whole is not None else attention.whole_cache_decode()):
        hit_B1S1 = (jnp.arange(layer_cache[0].shape[2]) == positions_BT)[:, None, :, None]

        def put(cache_BGSK, new_B1GK):
            new_BG1K = jnp.swapaxes(new_B1GK, 1, 2).astype(cache_BGSK.dtype)
            return cache_BGSK.at[:B].set(jnp.where(hit_B1S1, new_BG1K, cache_BGSK[:B]))

        return put(layer_cache[0], k_BTGK), put(layer_cache[1], v_BTGK)
    rows_B1 = jnp.arange(B)[:, None]
    # Row b, every head, slot positions_BT[b, t]: the indexed values come out as [B, T, G, K].
    index = (rows_B1, slice(None), positions_BT)
    k_BGSK, v_BGSK = layer_cache
    return (k_BGSK.at[index].set(k_BTGK.astype(k_BGSK.dtype)),
            v_BGSK.at[index].set(v_BTGK.astype(v_BGSK.dtype)))


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        h_BTF = _dense(cfg.mlp_dim, (EMBED, MLP_HIDDEN), cfg, name="fc")(x_BTD)
        if cfg.mlp == "swiglu":
            gate_BTF = _dense(cfg.mlp_dim, (EMBED, MLP_HIDDEN), cfg, name="gate")(x_BTD)
            h_BTF = nn.silu(gate_BTF) * h_BTF
        elif cfg.mlp == "relu2":
            h_BTF = jnp.square(nn.relu(h_BTF))
        else:
            h_BTF = nn.gelu(h_BTF, approximate=True)  # GPT-2's tanh approximation
        h_BTF = nn.with_logical_constraint(h_BTF, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
        return _dense(cfg.n_embd, (MLP_HIDDEN, EMBED), cfg, std=_residual_std(cfg),
                      name="proj")(h_BTF)


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)). Call signature fits `nn.scan`."""
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTD, positions_BT, ve_BTGK, layer_cache):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        h_BTD = _norm(cfg, "ln_1")(x_BTD).astype(cfg.dtype)
        a_BTD, layer_cache = CausalSelfAttention(cfg, name="attn")(
            h_BTD, positions_BT, ve_BTGK, layer_cache)
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
        wte = nn.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype,
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
        ve_BTGK = None
        if cfg.value_embeddings:  # one table; every layer mixes it into its values
            value_embed = nn.Embed(cfg.vocab_size, cfg.kv_heads * cfg.head_dim, dtype=cfg.dtype,
                                   param_dtype=cfg.param_dtype, name="value_embed",
                                   embedding_init=_param(nn.initializers.normal(cfg.init_std),
                                                         (VOCAB, EMBED)))
            ve_BTGK = value_embed(tokens_BT).reshape(B, T, cfg.kv_heads, cfg.head_dim)

        block = _block_class(cfg)
        blocks = self._scan_blocks if cfg.scan_layers else self._loop_blocks
        x_BTD, kv_cache = blocks(block, x_BTD, positions_BT, ve_BTGK, kv_cache)

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
        logits_BTV = finish_logits(cfg, logits_BTV)
        return logits_BTV if kv_cache is None else (logits_BTV, kv_cache)

    def _loop_blocks(self, block, x_BTD, positions_BT, ve_BTGK, kv_cache):
        keys = values = None
        if kv_cache is not None:
            keys, values = list(kv_cache.keys), list(kv_cache.values)
        for i in range(self.cfg.n_layer):
            layer_cache = None if keys is None else (keys[i], values[i])
            x_BTD, layer_cache = block(self.cfg, self.deterministic, name=f"h_{i}")(
                x_BTD, positions_BT, ve_BTGK, layer_cache)
            if keys is not None:
                keys[i], values[i] = layer_cache
        return x_BTD, None if keys is None else KVCache(tuple(keys), tuple(values))

    def _scan_blocks(self, block, x_BTD, positions_BT, ve_BTGK, kv_cache):
        scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                          "dropout": True},
                          in_axes=(nn.broadcast, nn.broadcast, 0), length=self.cfg.n_layer,
                          metadata_params={nn.PARTITION_NAME: LAYERS})
        layer_caches = None if kv_cache is None else tuple(kv_cache)
        x_BTD, layer_caches = scanned(self.cfg, self.deterministic, name="h")(
            x_BTD, positions_BT, ve_BTGK, layer_caches)
        return x_BTD, None if kv_cache is None else KVCache(*layer_caches)


def finish_logits(cfg: ModelConfig, logits_BTV: jax.Array) -> jax.Array:
    """The head's last steps: the soft cap (float32, cfg.logit_softcap > 0), then -inf at the
    padded ids (after the cap, which would make them -cap), then the vocab sharding."""
    if cfg.logit_softcap > 0:
        cap = jnp.float32(cfg.logit_softcap)
        logits_BTV = cap * jnp.tanh(logits_BTV.astype(jnp.float32) / cap)
    logits_BTV = mask_padded_vocab(cfg, logits_BTV)
    return nn.with_logical_constraint(logits_BTV, (ACT_BATCH, ACT_LENGTH, ACT_VOCAB))


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
    return finish_logits(cfg, jnp.dot(x_BTD.astype(cfg.dtype), kernel_DV.astype(cfg.dtype)))


def init_boxed_params(model: GPT, rng: jax.Array) -> dict:
    """`model`'s params, each boxed with its logical axis names, from a one-token batch."""
    return model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(model: GPT, rng: jax.Array) -> dict:
    """`model`'s params as a plain pytree: the initialisation training uses."""
    return nn.unbox(init_boxed_params(model, rng))


@functools.lru_cache(maxsize=32)
def abstract_boxed_params(cfg: ModelConfig) -> dict:
    """The params as ShapeDtypeStructs boxed with their logical axis names: the one shape
    trace of a model config (cached: a config is hashable); nothing is allocated."""
    return jax.eval_shape(functools.partial(init_boxed_params, GPT(cfg)), jax.random.key(0))


def abstract_params(cfg: ModelConfig) -> dict:
    """The params pytree as ShapeDtypeStructs (`abstract_boxed_params` without the boxes)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x,
                        abstract_boxed_params(cfg),
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))
