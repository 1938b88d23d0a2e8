"""Meshes from config, sharded init, and sharded forward/gradients == one device."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import init_sharded
from gpt_jax import sharding
from gpt_jax.config import ConfigError, load_preset, typed
from gpt_jax.model import GPT, ModelConfig
from gpt_jax.sharding import MeshConfig

B, T = 8, 16  # the batch splits over data * fsdp = 8 devices in every mesh below

MESHES = {  # name -> (data, fsdp, tensor)
    "data8": (8, 1, 1),
    "fsdp8": (1, 8, 1),
    "2x2x2": (2, 2, 2),
}

# Per-device shard shapes of the big matrices, worked out by hand for the tiny model
# (vocab 64, width 32, 4 heads of 8, mlp 128): wte (vocab->tensor, embed->fsdp),
# qkv kernel (embed->fsdp, 3, heads->tensor, kv), fc kernel (embed->fsdp, mlp->tensor).
SHARD_SHAPES = {
    "data8": {"wte": (64, 32), "qkv": (32, 3, 4, 8), "fc": (32, 128)},
    "fsdp8": {"wte": (64, 4), "qkv": (4, 3, 4, 8), "fc": (4, 128)},
    "2x2x2": {"wte": (32, 16), "qkv": (16, 3, 2, 8), "fc": (16, 64)},
}
SPECS = {"wte": P("tensor", "fsdp"), "qkv": P("fsdp", None, "tensor", None),
         "fc": P("fsdp", "tensor")}


def tiny_config(scan_layers: bool = False) -> ml_collections.ConfigDict:
    config = load_preset("tiny")
    config.model.scan_layers = scan_layers
    return config


def mesh_for(name: str):
    data, fsdp, tensor = MESHES[name]
    return MeshConfig.from_dict({"data": data, "fsdp": fsdp,
                                                         "tensor": tensor}).make()


def big_matrices(params: dict, scan_layers: bool) -> dict[str, jax.Array]:
    layer = params["h"] if scan_layers else params["h_0"]
    return {"wte": params["wte"]["embedding"], "qkv": layer["attn"]["qkv"]["kernel"],
            "fc": layer["mlp"]["fc"]["kernel"]}


def random_like(params: dict, seed: int = 0, std: float = 0.2) -> dict:
    """Host (numpy) params with the same shapes, every leaf random (no zero biases)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(0.0, std, x.shape).astype(np.float32)
                        + (1.0 if x.ndim == 1 else 0.0), params)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1))


def loss_and_grads_fn(cfg: ModelConfig):
    def loss_fn(params, tokens_BT, targets_BT):
        logits_BTV = GPT(cfg).apply({"params": params}, tokens_BT)
        return cross_entropy(logits_BTV, targets_BT), logits_BTV

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.integers(0, 64, (B, T), np.int32), rng.integers(0, 64, (B, T), np.int32)


def to_scan_layout(params: dict, n_layer: int) -> dict:
    """Loop params (`h_0` ... `h_{L-1}`) -> scan params (`h`, leading layers axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    out["h"] = jax.tree.map(lambda *xs: np.stack(xs), *[params[f"h_{i}"] for i in range(n_layer)])
    return out


@functools.lru_cache(maxsize=None)
def single_device_init() -> dict:
    """The values `init_params` must create, initialised on one device (loop layout)."""
    cfg = typed(tiny_config()).model
    init = jax.jit(lambda r: nn.unbox(GPT(cfg).init(r, jnp.zeros((1, 1), jnp.int32))["params"]))
    return jax.device_get(init(jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def single_device_result(scan_layers: bool):
    """(params, loss, logits, grads) on one device: the sharded runs must reproduce these.

    Computed with the loop layout; for scan it is converted (scan == loop is pinned in
    test_model.py), so that a scan bug shows up here as a difference too."""
    config = tiny_config()
    cfg = typed(config).model
    params = random_like(single_device_init())
    tokens_BT, targets_BT = jax.device_put(batch(), jax.devices()[0])
    (loss, logits_BTV), grads = loss_and_grads_fn(cfg)(jax.device_put(params, jax.devices()[0]),
                                                       tokens_BT, targets_BT)
    grads = jax.device_get(grads)
    if scan_layers:
        params, grads = (to_scan_layout(t, cfg.n_layer) for t in (params, grads))
    return params, np.asarray(loss), np.asarray(logits_BTV), grads


def assert_trees_close(actual, expected, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=rtol,
                                   err_msg=jax.tree_util.keystr(path))


def test_make_mesh_shapes():
    for name, shape in MESHES.items():
        mesh = mesh_for(name)
        assert mesh.axis_names == ("data", "fsdp", "tensor")
        assert tuple(mesh.shape.values()) == shape
        assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    mesh = MeshConfig.from_dict({"data": -1, "fsdp": 2, "tensor": 1}).make()
    assert tuple(mesh.shape.values()) == (4, 2, 1)
    sub = MeshConfig.from_dict({"data": 2, "fsdp": -1, "tensor": 1}).make(devices=jax.devices()[:4])
    assert tuple(sub.shape.values()) == (2, 2, 1)
    with pytest.raises(ConfigError, match="3 devices but 8"):
        MeshConfig.from_dict({"data": 3, "fsdp": 1, "tensor": 1}).make()


@pytest.mark.parametrize("mesh_name, scan_layers", [
    ("data8", False), ("fsdp8", False), ("2x2x2", False), ("2x2x2", True)])
@pytest.mark.e2e
def test_sharded_init_forward_and_grads_match_one_device(mesh_name: str, scan_layers: bool):
    config = tiny_config(scan_layers)
    cfg = typed(config).model
    mesh, rules = mesh_for(mesh_name), typed(config).mesh.rules
    params, shardings = init_sharded(GPT(cfg), jax.random.key(0), mesh, rules)

    # The big matrices are born sharded as the rules say.
    for key, matrix in big_matrices(params, scan_layers).items():
        spec = P(None, *SPECS[key]) if scan_layers and key != "wte" else SPECS[key]
        assert matrix.sharding.spec == spec, key
        shard_shape = SHARD_SHAPES[mesh_name][key]
        if scan_layers and key != "wte":
            shard_shape = (cfg.n_layer, *shard_shape)
        assert {s.data.shape for s in matrix.addressable_shards} == {shard_shape}, key
        assert len(matrix.addressable_shards) == 8
    if not scan_layers:  # ... with the values a one-device init gives.
        assert_trees_close(jax.device_get(params), single_device_init(), atol=0, rtol=0)

    host_params, loss, logits_BTV, grads = single_device_result(scan_layers)
    params = sharding.shard_like(host_params, shardings)  # random values, same shardings
    tokens_BT, targets_BT = batch()
    tokens_BT = jax.device_put(tokens_BT, sharding.batch_sharding(mesh))
    targets_BT = jax.device_put(targets_BT, sharding.batch_sharding(mesh))
    with sharding.activate(mesh, rules):
        (loss2, logits2_BTV), grads2 = loss_and_grads_fn(cfg)(params, tokens_BT, targets_BT)
    data, fsdp, _ = MESHES[mesh_name]
    assert logits2_BTV.sharding.shard_shape(logits2_BTV.shape)[0] == B // (data * fsdp)
    np.testing.assert_allclose(logits2_BTV, logits_BTV, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    assert_trees_close(jax.device_get(grads2), grads, atol=1e-5, rtol=1e-5)


def test_param_shardings_match_init_params():
    config = tiny_config()
    cfg = typed(config).model
    mesh, rules = mesh_for("2x2x2"), typed(config).mesh.rules
    shardings = sharding.param_shardings(cfg, mesh, rules)
    assert shardings["wte"]["embedding"].spec == SPECS["wte"]
    assert shardings["h_1"]["mlp"]["fc"]["kernel"].spec == SPECS["fc"]
    assert shardings["h_1"]["mlp"]["proj"]["kernel"].spec == P("tensor", "fsdp")
    assert shardings["ln_f"]["scale"].spec == P(None)
    untied = dataclasses.replace(cfg, tie_embeddings=False)
    head = sharding.param_shardings(untied, mesh, rules)["lm_head"]["kernel"]
    assert head.spec == P("fsdp", "tensor")


@pytest.mark.e2e
def test_indivisible_vocab_is_replicated_and_still_exact():
    """vocab 63 cannot split over tensor=2: that dim stays whole, the embed dim still splits."""
    config = tiny_config()
    config.model.vocab_size = 63
    cfg = typed(config).model
    mesh, rules = mesh_for("2x2x2"), typed(config).mesh.rules
    params, shardings = init_sharded(GPT(cfg), jax.random.key(0), mesh, rules)
    wte = params["wte"]["embedding"]
    assert wte.sharding.spec == P(None, "fsdp")
    assert {s.data.shape for s in wte.addressable_shards} == {(63, 16)}
    tokens_BT = batch()[0] % 63
    expected = GPT(cfg).apply({"params": jax.device_get(params)}, tokens_BT)
    with sharding.activate(mesh, rules):
        logits_BTV = jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t))(
            params, jax.device_put(tokens_BT, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(logits_BTV, expected, atol=1e-5, rtol=1e-5)
