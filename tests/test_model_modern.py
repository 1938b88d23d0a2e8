"""The modern-recipe switches (qk_norm, relu2, zero_init_proj, logit_softcap, n_kv_head,
value_embeddings) against a plain-numpy GPT, the KV-cached sampler, one device and GPT-2."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import numpy_gpt
from test_sample import check_against_full_forward

from conftest import init_sharded
from gpt_jax import attention, sharding
from gpt_jax.config import ConfigError, base_config, load_preset, typed, validate
from gpt_jax.flops import count_params, flops_per_token
from gpt_jax.hf.mapping import ConversionError, hf_config_from_model
from gpt_jax.model import GPT, ModelConfig, init_kv_cache, init_params
from gpt_jax.optim import decay_mask
from gpt_jax.step import chunked_cross_entropy, cross_entropy

B, T = 2, 16
CAP = 3.0
ALL_ON = dict(qk_norm=True, mlp="relu2", logit_softcap=CAP, n_kv_head=2, value_embeddings=True)
SWITCHES = {  # name -> overrides of configs/tiny.py (vocab 64, block 32, 2 layers, 4 heads x 8)
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "softcap": dict(logit_softcap=CAP),
    "gqa": dict(n_kv_head=2),
    "mqa_rope": dict(n_kv_head=1, position="rope"),
    "value_embeddings": dict(value_embeddings=True),
    "all_on_rope_untied": dict(ALL_ON, position="rope", norm="rmsnorm", tie_embeddings=False),
}


def tiny_cfg(**overrides) -> ModelConfig:
    return dataclasses.replace(typed(load_preset("tiny")).model, **overrides)


def param_shapes(cfg: ModelConfig) -> dict:
    return jax.tree.map(lambda x: x.shape, jax.eval_shape(
        lambda r: init_params(GPT(cfg), r), jax.random.key(0)))


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.3) -> dict:
    """Every leaf random (the v/ve mixing scalars and norm scales too): no no-op at init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s) + (1.0 if len(s) <= 1
                                                                        else 0.0), jnp.float32),
                        param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def tokens(seed: int = 0, shape=(B, T)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, shape).astype(np.int32)


@functools.lru_cache(maxsize=None)
def forward(cfg: ModelConfig):
    return jax.jit(lambda params, tokens_BT: GPT(cfg).apply({"params": params}, tokens_BT))


# ----------------------------------------------------------------------------------- tests

def test_default_param_tree_is_unchanged_and_all_off_is_the_default():
    D, H, K, F, L = 32, 4, 8, 128, 2
    block = {"ln_1": {"scale": (D,), "bias": (D,)}, "ln_2": {"scale": (D,), "bias": (D,)},
             "attn": {"qkv": {"kernel": (D, 3, H, K), "bias": (3, H, K)},
                      "proj": {"kernel": (H, K, D), "bias": (D,)}},
             "mlp": {"fc": {"kernel": (D, F), "bias": (F,)},
                     "proj": {"kernel": (F, D), "bias": (D,)}}}
    expected = {"wte": {"embedding": (64, D)}, "wpe": {"embedding": (32, D)},
                "ln_f": {"scale": (D,), "bias": (D,)}, **{f"h_{i}": block for i in range(L)}}
    default = tiny_cfg()
    assert param_shapes(default) == expected
    off = tiny_cfg(qk_norm=False, zero_init_proj=False, logit_softcap=0.0, n_kv_head=0,
                   value_embeddings=False)
    assert off == default
    # n_kv_head == n_head is the same layout and the same model as n_kv_head=0.
    same = tiny_cfg(n_kv_head=4)
    assert param_shapes(same) == expected
    params, toks = random_params(default), tokens()
    np.testing.assert_array_equal(forward(same)(params, toks), forward(default)(params, toks))
    np.testing.assert_allclose(forward(default)(params, toks), numpy_gpt(params, toks, default),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_forward_matches_numpy_reference(name: str):
    cfg = tiny_cfg(**SWITCHES[name])
    params, toks = random_params(cfg, seed=1), tokens(1)
    np.testing.assert_allclose(forward(cfg)(params, toks), numpy_gpt(params, toks, cfg),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.e2e
def test_switches_shape_the_param_tree():
    D, G, K = 32, 2, 8
    shapes = param_shapes(tiny_cfg(**ALL_ON))
    attn = shapes["h_1"]["attn"]
    assert attn["qkv"] == {"kernel": (D, 4 // G + 2, G, K), "bias": (4, G, K)}
    assert attn["q_norm"] == attn["k_norm"] == {"scale": (K,)}
    assert attn["v_scale"] == attn["ve_scale"] == ()
    assert shapes["value_embed"] == {"embedding": (64, G * K)}
    assert shapes["h_0"]["mlp"] == param_shapes(tiny_cfg())["h_0"]["mlp"]  # relu2: as gelu
    init = init_params(GPT(tiny_cfg(value_embeddings=True)), jax.random.key(0))
    assert (float(init["h_0"]["attn"]["v_scale"]), float(init["h_0"]["attn"]["ve_scale"])) == (1, 0)
    # The scan layout stacks the new per-layer params like the others.
    stacked = param_shapes(tiny_cfg(**ALL_ON, scan_layers=True))["h"]["attn"]
    assert stacked["ve_scale"] == (2,) and stacked["q_norm"]["scale"] == (2, K)


@pytest.mark.e2e
def test_zero_init_proj_starts_at_zero_and_still_learns():
    cfg = tiny_cfg(zero_init_proj=True)
    params = init_params(GPT(cfg), jax.random.key(0))
    toks = tokens()

    def loss(p):
        return cross_entropy(GPT(cfg).apply({"params": p}, toks[:, :-1]), toks[:, 1:])[0]

    grads = jax.grad(loss)(params)
    for i in range(cfg.n_layer):
        for part in ("attn", "mlp"):
            assert not np.any(params[f"h_{i}"][part]["proj"]["kernel"]), (i, part)
            assert np.abs(grads[f"h_{i}"][part]["proj"]["kernel"]).max() > 1e-6, (i, part)
    assert np.abs(params["h_0"]["attn"]["qkv"]["kernel"]).max() > 0  # only the projections
    default = init_params(GPT(tiny_cfg()), jax.random.key(0))
    np.testing.assert_array_equal(params["wte"]["embedding"], default["wte"]["embedding"])


@pytest.mark.e2e
def test_softcap_bounds_logits_keeps_padding_masked_and_feeds_the_chunked_loss():
    raw_cfg = tiny_cfg(vocab_multiple=48)  # padded to 96 rows
    cfg = dataclasses.replace(raw_cfg, logit_softcap=CAP, loss_chunks=4)
    params, toks = random_params(cfg, std=1.0), tokens(2)
    raw, capped = forward(raw_cfg)(params, toks), forward(cfg)(params, toks)
    assert capped.dtype == jnp.float32 and np.abs(raw[..., :64]).max() > CAP
    np.testing.assert_allclose(capped[..., :64], CAP * np.tanh(np.asarray(raw[..., :64]) / CAP),
                               atol=1e-5, rtol=1e-5)
    assert np.all(np.isneginf(capped[..., 64:]))
    # The chunked loss (hidden states -> head -> cap -> mask) equals the loss of the logits.
    x_BTD = GPT(cfg).apply({"params": params}, toks, hidden_only=True)
    chunked, _ = chunked_cross_entropy(cfg, x_BTD, params["wte"]["embedding"].T, toks)
    whole, _ = cross_entropy(capped, toks)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)


@pytest.mark.e2e
def test_grouped_attention_equals_repeated_keys_and_values():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32) for _ in range(2))
    mask_BTS = jnp.asarray(rng.random((2, 6, 6)) < 0.7).at[:, :, 0].set(True)
    for impl in ("reference", "xla"):
        full = attention.attend(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), impl=impl)
        np.testing.assert_allclose(attention.attend(q, k, v, impl=impl), full, atol=1e-6)
        bhsk = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        full = attention.attend(q, bhsk(jnp.repeat(k, 2, 2)), bhsk(jnp.repeat(v, 2, 2)),
                                impl=impl, mask_BTS=mask_BTS, kv_layout="bhsk")
        np.testing.assert_allclose(attention.attend(q, bhsk(k), bhsk(v), impl=impl,
                                                    mask_BTS=mask_BTS, kv_layout="bhsk"),
                                   full, atol=1e-6)


def test_bad_n_kv_head_is_one_clear_line():
    with pytest.raises(ValueError, match=r"^model.n_head=4 is not divisible by "
                                         r"model.n_kv_head=3$"):
        tiny_cfg(n_kv_head=3)
    config = load_preset("tiny")
    config.model.n_kv_head = 3
    with pytest.raises(ConfigError, match="n_head=4 is not divisible by model.n_kv_head=3"):
        validate(config)
    config.model.n_kv_head = 1
    config.mesh.update(data=4, tensor=2)
    with pytest.raises(ConfigError, match=r"^model.n_kv_head=1 is not divisible by "
                                          r"mesh.tensor=2"):
        validate(config, num_devices=8)
    config.model.update(n_kv_head=2, logit_softcap=-1.0)
    with pytest.raises(ConfigError, match="logit_softcap=-1.0 must be >= 0"):
        validate(config, num_devices=8)


CACHED_CASES = {
    "gqa_rope": dict(n_kv_head=2, position="rope"),
    "value_embeddings_scan": dict(value_embeddings=True, scan_layers=True),
    "all_on": ALL_ON,
}


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(CACHED_CASES))
def test_cached_sampler_logits_equal_full_forward(name: str):
    cfg = tiny_cfg(**CACHED_CASES[name])
    params = random_params(tiny_cfg(**{**CACHED_CASES[name], "scan_layers": False}), seed=3)
    if cfg.scan_layers:
        params = {**{k: v for k, v in params.items() if not k.startswith("h_")},
                  "h": jax.tree.map(lambda *xs: jnp.stack(xs), params["h_0"], params["h_1"])}
    cache = init_kv_cache(cfg, 3, 20)
    keys = cache.keys if cfg.scan_layers else cache.keys[0]
    assert keys.shape[-4:] == (3, cfg.kv_heads, 20, cfg.head_dim)
    prompts = [[5, 9, 13], [7, 1, 2, 3, 4, 60, 61, 62, 63]]
    rows = check_against_full_forward(cfg, params, prompts, 10, 2e-5)
    if cfg.logit_softcap:
        padded = np.zeros((2, cfg.block_size), np.int32)
        for b, row in enumerate(rows):
            padded[b, :len(row)] = row
        assert np.abs(np.asarray(forward(cfg)(params, padded))).max() <= CAP


def test_hf_export_refuses_what_gpt2_cannot_represent():
    for field, value in (("qk_norm", True), ("logit_softcap", 30.0), ("n_kv_head", 2),
                         ("value_embeddings", True), ("mlp", "relu2")):
        m = base_config().model
        m[field] = value
        with pytest.raises(ConversionError) as e:
            hf_config_from_model(m, None)
        assert str(e.value).startswith(f"model.{field}={value!r} has no GPT-2 (Hugging Face) "
                                       "equivalent") and "\n" not in str(e.value)
    for field, value in (("n_kv_head", 4), ("zero_init_proj", True)):  # representable
        m = base_config().model
        m[field] = value
        assert hf_config_from_model(m, None)["n_head"] == 4


def test_counts_follow_grouped_attention_and_value_embeddings():
    base, cfg = tiny_cfg(), tiny_cfg(n_kv_head=1, value_embeddings=True)
    D, K, L, V = 32, 8, 2, 64
    qkv_saved = L * (2 * 3 * K * D + 2 * 3 * K)  # 3 of 4 key and 3 of 4 value heads, w + b
    added = V * K + 2 * L  # the table (1 kv head) and each layer's v / ve scales
    assert count_params(cfg) == count_params(base) - qkv_saved + added
    # FLOPs: fewer projection weights; the table is a lookup; attention's 12LDT unchanged.
    assert flops_per_token(cfg) == flops_per_token(base) - 6 * (qkv_saved - 2 * L)


@pytest.mark.e2e
def test_decay_mask_treats_value_embeddings_as_embeddings_and_norms_as_norms():
    params = init_params(GPT(tiny_cfg(**ALL_ON)), jax.random.key(0))
    for embeddings in (False, True):
        mask = decay_mask(params, decay_embeddings=embeddings)
        assert mask["value_embed"]["embedding"] is embeddings
        attn = mask["h_0"]["attn"]
        assert not (attn["q_norm"]["scale"] or attn["k_norm"]["scale"] or attn["v_scale"])
        assert attn["qkv"]["kernel"]


@pytest.mark.e2e
def test_sharded_all_switches_equal_one_device():
    config = load_preset("tiny")
    config.model.update(**ALL_ON)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    validate(config, num_devices=8)
    cfg = typed(config).model
    mesh, rules = typed(config).mesh.make(), typed(config).mesh.rules
    _, shardings = init_sharded(GPT(cfg), jax.random.key(0), mesh, rules)
    host = random_params(cfg, seed=5)
    toks = tokens(5, (8, T))

    def loss(p, t):
        logits = GPT(cfg).apply({"params": p}, t[:, :-1])
        return cross_entropy(logits, t[:, 1:])[0], logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (loss1, logits1), grads1 = step(jax.device_put(host, jax.devices()[0]),
                                    jax.device_put(toks, jax.devices()[0]))
    params = sharding.shard_like(host, shardings)
    assert params["h_0"]["attn"]["qkv"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
    with sharding.activate(mesh, rules):
        (loss2, logits2), grads2 = step(params, jax.device_put(toks, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(logits2, logits1, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(grads2)),
                            jax.tree.leaves(jax.device_get(grads1))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
