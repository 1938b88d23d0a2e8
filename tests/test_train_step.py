"""The jitted train step: sharded == single device, accumulation == one big batch, it learns."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import sharding
from gpt_jax.step import Trainer, cross_entropy


def tiny_config(**train):
    config = config_lib.load_preset("tiny")
    config.optim.update(lr=3e-3, warmup_steps=0, schedule="constant")
    config.train.update(global_batch_size=8, num_steps=100, **train)
    return config


def mesh_of(data, fsdp, tensor, n=None):
    shape = ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})
    return sharding.make_mesh(shape, jax.devices()[: n or data * fsdp * tensor])


def random_batches(config, n, seed=0):
    rng = np.random.default_rng(seed)
    B, T, V = config.train.global_batch_size, config.model.block_size, config.model.vocab_size
    for _ in range(n):
        tokens = rng.integers(0, V, (B, T + 1), dtype=np.int32)
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def run_steps(config, mesh, batches):
    trainer = Trainer.create(config, mesh)
    with sharding.activate(mesh, trainer.rules):
        state = trainer.init_state(config.train.seed)
        step = trainer.jit_train_step()
        losses = []
        for host in batches:
            batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in host.items()}
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state["params"])


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, **tol)


def test_mesh_2x2x2_matches_single_device():
    config = tiny_config()
    batches = list(random_batches(config, 4))
    single_losses, single_params = run_steps(config, mesh_of(1, 1, 1), batches)
    mesh_losses, mesh_params = run_steps(config, mesh_of(2, 2, 2), batches)
    np.testing.assert_allclose(mesh_losses, single_losses, rtol=1e-5)
    assert_trees_close(mesh_params, single_params, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("microbatches", [2, 4])
def test_accumulation_matches_one_big_batch(microbatches):
    batches = list(random_batches(tiny_config(), 3))
    ref_losses, ref_params = run_steps(tiny_config(), mesh_of(2, 1, 1), batches)
    losses, params = run_steps(tiny_config(microbatches=microbatches), mesh_of(2, 1, 1), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params, rtol=1e-4, atol=2e-5)


def test_overfits_one_batch():
    config = tiny_config()
    batch = next(random_batches(config, 1))
    losses, _ = run_steps(config, mesh_of(1, 1, 1), [batch] * 150)
    assert losses[0] > 3.5  # ~ln(64) at init
    assert losses[-1] < 0.1, losses[-10:]


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 3))
    weights = np.array([[1, 0, 1], [1, 1, 0]], np.float32)
    lse = np.log(np.exp(logits).sum(-1))
    per_token = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    total, count = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(total, (per_token * weights).sum(), rtol=1e-6)
    assert float(count) == weights.sum()


def test_nonfinite_step_leaves_state_untouched():
    config = tiny_config()
    mesh = mesh_of(1, 1, 1)
    trainer = Trainer.create(config, mesh)
    with sharding.activate(mesh, trainer.rules):
        state = trainer.init_state(0)
        before = jax.device_get(state["params"])
        state["params"]["ln_f"]["scale"] = state["params"]["ln_f"]["scale"] * jnp.nan
        poisoned = jax.device_get(state["params"])
        host = next(random_batches(config, 1))
        batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in host.items()}
        state, metrics = trainer.jit_train_step()(state, batch)
    assert not bool(metrics["finite"])
    assert int(state["step"]) == 1
    after = jax.device_get(state["params"])
    np.testing.assert_array_equal(after["h_0"]["mlp"]["fc"]["kernel"],
                                  poisoned["h_0"]["mlp"]["fc"]["kernel"])
    assert not np.array_equal(before["ln_f"]["scale"], after["ln_f"]["scale"])
