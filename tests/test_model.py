"""The GPT against a plain-numpy forward, its layouts and options, and its KV-cache path."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.config import load_preset, typed
from gpt_jax.model import GPT, ModelConfig, apply_rope, init_kv_cache

B, T = 2, 16
Params = dict


# ----------------------------------------------------------------------------- helpers

def tiny_cfg(**overrides) -> ModelConfig:
    """configs/tiny.py: vocab 64, block 32, 2 layers, 4 heads, width 32."""
    return dataclasses.replace(typed(load_preset("tiny")).model, **overrides)


def random_tokens(seed: int = 0, shape: tuple[int, int] = (B, T), vocab: int = 64) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def param_shapes(cfg: ModelConfig) -> Params:
    tokens_BT = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda r: nn.unbox(GPT(cfg).init(r, tokens_BT)["params"]),
                          jax.random.key(0))


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.2) -> Params:
    """Params of `cfg`'s layout with every leaf (biases and norm scales too) drawn at random,
    so that no term of the forward pass is a no-op at init."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    values = [jnp.asarray(rng.normal(0.0, std, x.shape) + (1.0 if x.ndim == 1 else 0.0), x.dtype)
              for x in leaves]
    return jax.tree.unflatten(treedef, values)


def to_scan_layout(params: Params, n_layer: int) -> Params:
    """Loop params (`h_0` ... `h_{L-1}`) -> scan params (`h`, leading layers axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    out["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"h_{i}"] for i in range(n_layer)])
    return out


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1))


@functools.lru_cache(maxsize=None)
def jitted_forward(cfg: ModelConfig):
    return jax.jit(lambda params, tokens_BT: GPT(cfg).apply({"params": params}, tokens_BT))


@functools.lru_cache(maxsize=None)
def jitted_loss_and_grads(cfg: ModelConfig):
    """(loss, logits_BTV), grads of the next-token loss; one compile per config."""
    def loss_fn(params, tokens_BT, targets_BT):
        logits_BTV = GPT(cfg).apply({"params": params}, tokens_BT)
        return cross_entropy(logits_BTV, targets_BT), logits_BTV

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def assert_trees_close(actual, expected, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for path, a in jax.tree_util.tree_leaves_with_path(actual):
        e = functools.reduce(lambda t, k: t[k.key], path, expected)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=rtol,
                                   err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------- an independent numpy GPT

def np_rmsnorm(x, scale, eps: float):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * scale


def np_norm(x, p, cfg: ModelConfig):
    if cfg.norm == "rmsnorm":
        return np_rmsnorm(x, p["scale"], cfg.norm_eps)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + cfg.norm_eps) * p["scale"]
    return y + p["bias"] if "bias" in p else y


def np_dense(x, p, n_in: int = 1):
    y = np.tensordot(x, p["kernel"], axes=n_in)
    return y + p["bias"] if "bias" in p else y


def np_rope(x_TK, theta: float):
    """Rotate-half RoPE: pairs (i, i + K/2) turn by angle position * theta^(-i / (K/2))."""
    t_len, k_dim = x_TK.shape
    half = k_dim // 2
    angles_TF = np.arange(t_len)[:, None] * theta ** (-np.arange(half) / half)[None]
    x1, x2 = x_TK[:, :half], x_TK[:, half:]
    cos, sin = np.cos(angles_TF), np.sin(angles_TF)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_attention(x_TD, ve_TGK, p, cfg: ModelConfig):
    """Head h = g * Q + i: query row i of key/value group g in the [D, Q + 2, G, K] kernel
    (G = n_kv_head groups of Q = H / G query heads; G = H is plain multi-head attention)."""
    H, G, K = cfg.n_head, cfg.kv_heads, cfg.head_dim
    Q, t_len = H // G, x_TD.shape[0]
    qkv_TJGK = np_dense(x_TD, p["qkv"])
    out_THK = np.zeros((t_len, H, K))
    for h in range(H):
        g, i = divmod(h, Q)
        q_TK, k_TK, v_TK = qkv_TJGK[:, i, g], qkv_TJGK[:, Q, g], qkv_TJGK[:, Q + 1, g]
        if cfg.qk_norm:
            q_TK = np_rmsnorm(q_TK, p["q_norm"]["scale"], cfg.norm_eps)
            k_TK = np_rmsnorm(k_TK, p["k_norm"]["scale"], cfg.norm_eps)
        if cfg.value_embeddings:
            v_TK = p["v_scale"] * v_TK + p["ve_scale"] * ve_TGK[:, g]
        if cfg.position == "rope":
            q_TK, k_TK = np_rope(q_TK, cfg.rope_theta), np_rope(k_TK, cfg.rope_theta)
        scores_TT = q_TK @ k_TK.T / math.sqrt(K)
        scores_TT[np.triu_indices(t_len, 1)] = -np.inf
        probs_TT = np.exp(scores_TT - scores_TT.max(-1, keepdims=True))
        out_THK[:, h] = probs_TT / probs_TT.sum(-1, keepdims=True) @ v_TK
    return np_dense(out_THK, p["proj"], n_in=2)


def np_mlp(x_TD, p, cfg: ModelConfig):
    h_TF = np_dense(x_TD, p["fc"])
    if cfg.mlp == "swiglu":
        gate_TF = np_dense(x_TD, p["gate"])
        h_TF = gate_TF / (1 + np.exp(-gate_TF)) * h_TF
    elif cfg.mlp == "relu2":
        h_TF = np.maximum(h_TF, 0.0) ** 2
    else:
        h_TF = np_gelu_tanh(h_TF)
    return np_dense(h_TF, p["proj"])


def numpy_gpt(params: Params, tokens_BT, cfg: ModelConfig) -> np.ndarray:
    """Logits of a pre-norm GPT, one sequence at a time, in float64 (loop layout params)."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    logits = []
    for tokens_T in np.asarray(tokens_BT):
        x_TD = p["wte"]["embedding"][tokens_T]
        if cfg.position == "learned":
            x_TD = x_TD + p["wpe"]["embedding"][: len(tokens_T)]
        ve_TGK = None
        if cfg.value_embeddings:
            ve_TGK = p["value_embed"]["embedding"][tokens_T].reshape(
                len(tokens_T), cfg.kv_heads, cfg.head_dim)
        for i in range(cfg.n_layer):
            blk = p[f"h_{i}"]
            x_TD = x_TD + np_attention(np_norm(x_TD, blk["ln_1"], cfg), ve_TGK, blk["attn"], cfg)
            x_TD = x_TD + np_mlp(np_norm(x_TD, blk["ln_2"], cfg), blk["mlp"], cfg)
        x_TD = np_norm(x_TD, p["ln_f"], cfg)
        head_DV = p["wte"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
        logits_TV = x_TD @ head_DV
        if cfg.logit_softcap:
            logits_TV = cfg.logit_softcap * np.tanh(logits_TV / cfg.logit_softcap)
        logits.append(logits_TV)
    return np.stack(logits)


# ------------------------------------------------------------------------------- tests

VARIANTS = {
    "gpt2": {},
    "llama_like": dict(position="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False,
                       use_bias=False),
    "rope_layernorm_no_bias": dict(position="rope", use_bias=False),
    "rmsnorm_untied_gelu": dict(norm="rmsnorm", tie_embeddings=False),
}


@pytest.mark.e2e
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_numpy_reference(variant: str):
    cfg = tiny_cfg(**VARIANTS[variant])
    params, tokens_BT = random_params(cfg), random_tokens()
    logits_BTV = jitted_forward(cfg)(params, tokens_BT)
    assert logits_BTV.shape == (B, T, cfg.vocab_size) and logits_BTV.dtype == jnp.float32
    np.testing.assert_allclose(logits_BTV, numpy_gpt(params, tokens_BT, cfg), atol=1e-5,
                               rtol=1e-5)


def _paths(params: Params) -> set[str]:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {"/".join(k.key for k in path) for path, _ in leaves}


def test_options_change_the_parameters():
    base = _paths(param_shapes(tiny_cfg()))
    assert {"wte/embedding", "wpe/embedding", "h_0/mlp/fc/bias", "ln_f/bias"} <= base
    assert not any(p.startswith("lm_head") for p in base)

    rope = _paths(param_shapes(tiny_cfg(position="rope")))
    assert rope == base - {"wpe/embedding"}

    untied = param_shapes(tiny_cfg(tie_embeddings=False))
    assert untied["lm_head"]["kernel"].shape == (32, 64) and "bias" not in untied["lm_head"]

    no_bias = _paths(param_shapes(tiny_cfg(use_bias=False)))
    assert no_bias == {p for p in base if not p.endswith("/bias")}

    swiglu = param_shapes(tiny_cfg(mlp="swiglu"))
    assert swiglu["h_1"]["mlp"]["gate"]["kernel"].shape == (32, 128)

    rms = param_shapes(tiny_cfg(norm="rmsnorm"))
    assert set(rms["h_0"]["ln_1"]) == {"scale"} and set(rms["ln_f"]) == {"scale"}


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_causality(position: str):
    """Changing token t leaves logits before t untouched and changes those at t."""
    cfg = tiny_cfg(position=position)
    params, tokens_BT = random_params(cfg), random_tokens()
    forward = jitted_forward(cfg)
    logits_BTV = np.asarray(forward(params, tokens_BT))
    for t in (0, 5, T - 1):
        changed_BT = tokens_BT.at[:, t].set((tokens_BT[:, t] + 1) % cfg.vocab_size)
        changed_BTV = np.asarray(forward(params, changed_BT))
        np.testing.assert_array_equal(changed_BTV[:, :t], logits_BTV[:, :t])
        assert np.all(np.abs(changed_BTV[:, t] - logits_BTV[:, t]).max(-1) > 1e-3)
        if t + 1 < T:
            assert np.abs(changed_BTV[:, t + 1:] - logits_BTV[:, t + 1:]).max() > 1e-3


@pytest.mark.e2e
def test_xla_and_reference_attention_agree():
    cfg = tiny_cfg(position="rope")
    params, tokens_BT = random_params(cfg), random_tokens()
    targets_BT = random_tokens(seed=1)
    (loss_x, logits_x), grads_x = jitted_loss_and_grads(cfg)(params, tokens_BT, targets_BT)
    ref = dataclasses.replace(cfg, attention_impl="reference")
    (loss_r, logits_r), grads_r = jitted_loss_and_grads(ref)(params, tokens_BT, targets_BT)
    np.testing.assert_allclose(logits_x, logits_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss_x, loss_r, rtol=1e-6)
    assert_trees_close(grads_x, grads_r)


@functools.lru_cache(maxsize=None)
def loop_reference() -> tuple:
    """Loss, logits and grads of the plain loop layout without remat, and its inputs."""
    cfg = tiny_cfg()
    params, tokens_BT, targets_BT = random_params(cfg), random_tokens(), random_tokens(seed=1)
    (loss, logits_BTV), grads = jitted_loss_and_grads(cfg)(params, tokens_BT, targets_BT)
    return params, tokens_BT, targets_BT, loss, logits_BTV, grads


LAYOUTS = [(scan, remat) for scan in (False, True)
           for remat in ("none", "full", "save_dots", "save_dots_no_batch")
           if scan or remat != "none"]  # (loop, none) is the reference itself
LAYOUTS += [(False, "save_qkv_proj"), (True, "save_out_proj"), (False, "save_qkv_out_proj")]


@pytest.mark.e2e
@pytest.mark.parametrize("scan_layers, remat_policy", LAYOUTS)
def test_scan_and_remat_match_the_plain_loop(scan_layers: bool, remat_policy: str):
    params, tokens_BT, targets_BT, loss, logits_BTV, grads = loop_reference()
    cfg = tiny_cfg(scan_layers=scan_layers, remat_policy=remat_policy)
    if scan_layers:
        params, grads = to_scan_layout(params, cfg.n_layer), to_scan_layout(grads, cfg.n_layer)
        assert (jax.tree.map(lambda x: x.shape, param_shapes(cfg))
                == jax.tree.map(lambda x: x.shape, params))
    (loss2, logits2_BTV), grads2 = jitted_loss_and_grads(cfg)(params, tokens_BT, targets_BT)
    np.testing.assert_allclose(logits2_BTV, logits_BTV, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    assert_trees_close(grads2, grads)


@pytest.mark.parametrize("remat_policy, saved", [
    ("save_qkv_proj", {"qkv_proj"}), ("save_out_proj", {"out_proj"}),
    ("save_qkv_out_proj", {"qkv_proj", "out_proj"}), ("full", set())])
def test_named_remat_policies_save_only_their_projections(remat_policy, saved, capsys):
    cfg = tiny_cfg(remat_policy=remat_policy, n_layer=1)
    params = jax.tree.map(jnp.asarray, random_params(cfg))
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: GPT(cfg).apply({"params": p}, random_tokens()).sum(), params)
    residuals = capsys.readouterr().out
    assert {name for name in ("qkv_proj", "out_proj") if f"named '{name}'" in residuals} == saved


@pytest.mark.e2e
def test_scan_init_stacks_distinct_layers():
    cfg = tiny_cfg(scan_layers=True)
    init = jax.jit(lambda rng: nn.unbox(GPT(cfg).init(rng, random_tokens())["params"]))
    kernel_LD3HK = init(jax.random.key(0))["h"]["attn"]["qkv"]["kernel"]
    assert kernel_LD3HK.shape == (2, 32, 3, 4, 8)
    assert not np.allclose(kernel_LD3HK[0], kernel_LD3HK[1])


def test_bf16_compute_with_fp32_params():
    cfg32 = tiny_cfg()
    cfg16 = tiny_cfg(dtype="bfloat16", param_dtype="float32")
    shapes = param_shapes(cfg16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    params, tokens_BT = random_params(cfg32, std=0.1), random_tokens()
    logits16_BTV = jitted_forward(cfg16)(params, tokens_BT)
    assert logits16_BTV.dtype == jnp.bfloat16
    logits32_BTV = jitted_forward(cfg32)(params, tokens_BT)
    scale = float(jnp.abs(logits32_BTV).max())
    np.testing.assert_allclose(np.float32(logits16_BTV), logits32_BTV, atol=0.05 * scale)
    # bf16 really was used: the result is not the fp32 one.
    assert not np.allclose(np.float32(logits16_BTV), logits32_BTV, atol=1e-6)


def test_bf16_params():
    shapes = param_shapes(tiny_cfg(dtype="bfloat16", param_dtype="bfloat16"))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(shapes))


@pytest.mark.e2e
@pytest.mark.parametrize("scan_layers", [False, True])
def test_dropout_only_in_training(scan_layers: bool):
    cfg = tiny_cfg(dropout=0.3, scan_layers=scan_layers)
    params = random_params(tiny_cfg(scan_layers=scan_layers))
    tokens_BT = random_tokens()

    @jax.jit
    def train_forward(params, rng):
        return GPT(cfg, deterministic=False).apply({"params": params}, tokens_BT,
                                                   rngs={"dropout": rng})

    eval_BTV = jitted_forward(cfg)(params, tokens_BT)
    no_dropout_BTV = jitted_forward(dataclasses.replace(cfg, dropout=0.0))(params, tokens_BT)
    np.testing.assert_allclose(eval_BTV, no_dropout_BTV, atol=1e-6)

    train_a = train_forward(params, jax.random.key(1))
    train_a2 = train_forward(params, jax.random.key(1))
    train_b = train_forward(params, jax.random.key(2))
    np.testing.assert_array_equal(train_a, train_a2)
    assert np.abs(train_a - eval_BTV).max() > 1e-2
    assert np.abs(train_a - train_b).max() > 1e-2


def test_rope_depends_only_on_relative_position():
    rng = np.random.default_rng(0)
    q_1K, k_1K = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))

    def score(pos_q: int, pos_k: int) -> float:
        rq = apply_rope(q_1K, jnp.array([[pos_q]]), 10_000.0)
        rk = apply_rope(k_1K, jnp.array([[pos_k]]), 10_000.0)
        return float(jnp.sum(rq * rk))

    assert score(7, 3) == pytest.approx(score(20, 16), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)
    assert score(0, 0) == pytest.approx(float(jnp.sum(q_1K * k_1K)), abs=1e-6)


@pytest.mark.e2e
@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_kv_cache_decode_matches_full_forward(position: str, scan_layers: bool):
    """Prefill k tokens, then feed one token at a time: the logits equal the full forward."""
    cfg = tiny_cfg(position=position, scan_layers=scan_layers)
    loop_params = random_params(tiny_cfg(position=position))
    params = to_scan_layout(loop_params, cfg.n_layer) if scan_layers else loop_params
    tokens_BT, prefill = random_tokens(), 5
    full_BTV = jitted_forward(cfg)(params, tokens_BT)

    @jax.jit
    def step(params, tokens_BT, positions_BT, kv_cache):
        return GPT(cfg).apply({"params": params}, tokens_BT, positions_BT, kv_cache)

    kv_cache = init_kv_cache(cfg, B)
    assert len(kv_cache.keys) == cfg.n_layer
    assert kv_cache.keys[0].shape == (B, cfg.n_head, cfg.block_size, cfg.head_dim)
    positions_BT = jnp.broadcast_to(jnp.arange(prefill), (B, prefill))
    logits_BTV, kv_cache = step(params, tokens_BT[:, :prefill], positions_BT, kv_cache)
    np.testing.assert_allclose(logits_BTV, full_BTV[:, :prefill], atol=1e-5, rtol=1e-5)
    for t in range(prefill, T):
        positions_B1 = jnp.full((B, 1), t)
        logits_B1V, kv_cache = step(params, tokens_BT[:, t:t + 1], positions_B1, kv_cache)
        np.testing.assert_allclose(logits_B1V[:, 0], full_BTV[:, t], atol=1e-5, rtol=1e-5,
                                   err_msg=f"position {t}")
    # Slots past the last position were never written.
    keys_LBHSK = np.stack(kv_cache.keys)
    assert not np.any(keys_LBHSK[:, :, :, T:])
    assert np.all(np.abs(keys_LBHSK[:, :, :, :T]).sum(-1) > 0)


@pytest.mark.e2e
def test_logits_at_gives_one_position_per_row():
    """`logits_at_B` (the prefill's last prompt token per row) == that row of the full logits."""
    cfg = tiny_cfg()
    params = random_params(cfg)
    tokens_BT = random_tokens()
    full_BTV = jitted_forward(cfg)(params, tokens_BT)
    at_B = jnp.arange(tokens_BT.shape[0]) % tokens_BT.shape[1]
    picked_B1V = GPT(cfg).apply({"params": params}, tokens_BT, logits_at_B=at_B)
    assert picked_B1V.shape == (tokens_BT.shape[0], 1, cfg.vocab_size)
    np.testing.assert_allclose(picked_B1V[:, 0], full_BTV[jnp.arange(len(at_B)), at_B],
                               atol=1e-5, rtol=1e-5)
