"""The jitted train step: sharded == single device, accumulation == one big batch, it learns."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import sharding
from gpt_jax.config import typed
from gpt_jax.model import ModelConfig
from gpt_jax.sharding import MeshConfig
from gpt_jax.step import Trainer, cross_entropy


def tiny_config(**train):
    config = config_lib.load_preset("tiny")
    config.optim.update(lr=3e-3, warmup_steps=0, schedule="constant")
    config.train.update(global_batch_size=8, num_steps=100, **train)
    return config


def mesh_of(data, fsdp, tensor, n=None):
    shape = ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})
    return MeshConfig.from_dict(shape).make(jax.devices()[: n or data * fsdp * tensor])


def random_batches(config, n, seed=0):
    rng = np.random.default_rng(seed)
    B, T, V = config.train.global_batch_size, config.model.block_size, config.model.vocab_size
    for _ in range(n):
        tokens = rng.integers(0, V, (B, T + 1), dtype=np.int32)
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def run_steps(config, mesh, batches, opt_state=False):
    """(losses, params) after the steps; with `opt_state`, the optimizer state as well."""
    trainer = Trainer.for_config(typed(config), mesh)
    with sharding.activate(mesh, trainer.rules):
        state = trainer.init_state(config.train.seed)
        step = trainer.jit_train_step()
        losses = []
        for host in batches:
            batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in host.items()}
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    params = jax.device_get(state["params"])
    if opt_state:
        return np.array(losses), params, jax.device_get(state["opt_state"])
    return np.array(losses), params


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, **tol)


@pytest.mark.e2e
def test_mesh_2x2x2_matches_single_device():
    config = tiny_config()
    batches = list(random_batches(config, 4))
    single_losses, single_params = run_steps(config, mesh_of(1, 1, 1), batches)
    mesh_losses, mesh_params = run_steps(config, mesh_of(2, 2, 2), batches)
    np.testing.assert_allclose(mesh_losses, single_losses, rtol=1e-5)
    assert_trees_close(mesh_params, single_params, rtol=1e-4, atol=2e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("microbatches", [2, 4])
def test_accumulation_matches_one_big_batch(microbatches):
    batches = list(random_batches(tiny_config(), 3))
    ref_losses, ref_params = run_steps(tiny_config(), mesh_of(2, 1, 1), batches)
    losses, params = run_steps(tiny_config(microbatches=microbatches), mesh_of(2, 1, 1), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params, rtol=1e-4, atol=2e-5)


@pytest.mark.e2e
def test_weighted_accumulation_matches_one_big_batch():
    """Loss weights that differ between microbatches (an SFT mask: one microbatch almost all
    prompt): the mean is over the whole batch's weight, not a mean of microbatch means."""
    rng = np.random.default_rng(7)
    batches = list(random_batches(tiny_config(), 3))
    for batch in batches:
        weights = (rng.random(batch["targets"].shape) < 0.5).astype(np.float32)
        weights[:4] *= 0.05 * (rng.random(weights[:4].shape) < 0.2)  # first microbatch sparse
        batch["weights"] = weights
    ref_losses, ref_params = run_steps(tiny_config(), mesh_of(2, 1, 1), batches)
    losses, params = run_steps(tiny_config(microbatches=2), mesh_of(2, 1, 1), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(params, ref_params, rtol=1e-4, atol=2e-5)


@pytest.mark.e2e
def test_bfloat16_params_train_like_float32_ones_and_keep_their_dtype():
    """bf16 params (with accumulation): grads and AdamW moments stay bf16 (a float32 gradient
    once made the step's skip-or-apply cond refuse to compile), and the losses follow the
    float32 params' run."""
    batches = list(random_batches(tiny_config(), 3))
    ref_losses, _ = run_steps(tiny_config(microbatches=2), mesh_of(2, 1, 1), batches)
    config = tiny_config(microbatches=2)
    config.model.param_dtype = "bfloat16"
    losses, params, opt_state = run_steps(config, mesh_of(2, 1, 1), batches, opt_state=True)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)
    bf16 = jnp.dtype(jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {bf16}
    moments = [x for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0]  # mu, nu (not counts)
    assert moments and {x.dtype for x in moments} == {bf16}
    assert losses[-1] < losses[0]


@pytest.mark.e2e
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


def test_z_loss_is_its_formula_in_the_function_and_in_the_step():
    """z_loss adds z * logsumexp(logits)^2 per weighted token: in `cross_entropy` (numpy) and
    in the trainer's loss (the difference between z and 0, from the model's own logits)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 3
    targets = rng.integers(0, 5, (2, 3))
    weights = np.array([[1, 0, 2], [1, 1, 0]], np.float32)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    per_token = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0] + 0.01 * lse ** 2
    total, _ = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                             z_loss=0.01)
    np.testing.assert_allclose(total, (per_token * weights).sum(), rtol=1e-5)

    for loss_chunks in (0, 2):
        config = tiny_config()
        config.model.loss_chunks = loss_chunks
        trainer = Trainer.for_config(typed(config), mesh_of(1, 1, 1))
        params = trainer.init_state(0)["params"]
        batch = {k: jnp.asarray(v) for k, v in next(random_batches(config, 1)).items()}
        rng_key = jax.random.PRNGKey(0)
        plain, count = trainer.loss_sums(params, batch, rng_key, trainer.model)
        config.train.z_loss = 0.01
        z = Trainer.for_config(typed(config), mesh_of(1, 1, 1))
        with_z, _ = z.loss_sums(params, batch, rng_key, z.model)
        logits = np.asarray(trainer.model.apply({"params": params}, batch["inputs"]),
                            np.float64)[..., :config.model.vocab_size]
        lse = np.log(np.exp(logits).sum(-1))
        np.testing.assert_allclose(float(with_z) - float(plain), 0.01 * (lse ** 2).sum(),
                                   rtol=1e-4)
        assert float(count) == batch["targets"].size


@pytest.mark.e2e
def test_nonfinite_step_leaves_state_untouched():
    config = tiny_config()
    mesh = mesh_of(1, 1, 1)
    trainer = Trainer.for_config(typed(config), mesh)
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


def loss_and_grads(config, mesh, params, host_batch):
    """The train step's (mean loss, grads) for `params` and one batch, jitted on `mesh`."""
    trainer = Trainer.for_config(typed(config), mesh)
    with sharding.activate(mesh, trainer.rules):
        params = sharding.shard_like(params, trainer.state_shardings["params"])
        batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in host_batch.items()}
        loss, grads = jax.jit(trainer._grads)(params, batch, jax.random.PRNGKey(0))
    return float(loss), jax.device_get(grads)


def weighted_batch(config, seed=0):
    batch = next(random_batches(config, 1, seed))
    rng = np.random.default_rng(seed + 1)
    batch["weights"] = (rng.random(batch["targets"].shape) < 0.7).astype(np.float32)
    return batch


def model_config(tie: bool = True, z_loss: float = 1e-2, **model):
    config = tiny_config(z_loss=z_loss)
    config.model.update(tie_embeddings=tie, **model)
    return config


def initial_params(config):
    trainer = Trainer.for_config(typed(config), mesh_of(1, 1, 1))
    return jax.device_get(trainer.init_state(0)["params"])


@pytest.mark.e2e
def test_chunked_loss_equals_full_loss_on_the_mesh():
    full = model_config(tie=False)  # the tied head is covered by the padded-vocabulary test
    chunked = model_config(tie=False, loss_chunks=4)
    params, batch, mesh = initial_params(full), weighted_batch(full), mesh_of(2, 2, 2)
    loss, grads = loss_and_grads(full, mesh, params, batch)
    chunked_loss, chunked_grads = loss_and_grads(chunked, mesh, params, batch)
    np.testing.assert_allclose(chunked_loss, loss, rtol=1e-6)
    assert_trees_close(chunked_grads, grads, rtol=1e-5, atol=1e-7)


@pytest.mark.e2e
def test_chunked_cross_entropy_is_the_full_one_of_the_head_logits():
    from gpt_jax.model import lm_head_logits
    from gpt_jax.step import chunked_cross_entropy

    cfg = ModelConfig(vocab_size=7, block_size=6, n_embd=3, n_head=1, loss_chunks=3,
                      vocab_multiple=4)
    rng = np.random.default_rng(0)
    x_BTD, kernel_DV = rng.normal(size=(2, 6, 3)), rng.normal(size=(3, 8)) * 3
    targets_BT, weights_BT = rng.integers(0, 7, (2, 6)), rng.random((2, 6))

    def full(x_BTD, kernel_DV):
        return cross_entropy(lm_head_logits(cfg, x_BTD, kernel_DV), targets_BT, weights_BT, 0.1)

    def chunked(x_BTD, kernel_DV):
        return chunked_cross_entropy(cfg, x_BTD, kernel_DV, targets_BT, weights_BT, 0.1)

    def value_and_grads(f):
        return jax.value_and_grad(lambda *a: f(*a)[0], (0, 1))(x_BTD, kernel_DV)

    assert_trees_close(value_and_grads(chunked), value_and_grads(full), rtol=1e-5, atol=1e-6)
    assert float(chunked(x_BTD, kernel_DV)[1]) == pytest.approx(weights_BT.sum(), rel=1e-6)
    with pytest.raises(ValueError, match="loss_chunks=4 does not divide the sequence length 6"):
        chunked_cross_entropy(config_lib.ModelConfig(loss_chunks=4), x_BTD, kernel_DV,
                              targets_BT)


def pad_vocab(params, rows: int, scale: float = 50.0):
    """Tied `params` with `rows` extra embedding rows of large values: were the padded logits
    not masked, they would dominate the log-sum-exp."""
    rng = np.random.default_rng(7)
    padded = jax.tree.map(np.asarray, params)
    wte = padded["wte"]["embedding"]
    padded["wte"]["embedding"] = np.concatenate(
        [wte, scale * rng.normal(size=(rows, wte.shape[1])).astype(wte.dtype)])
    return padded


@pytest.fixture(scope="module")
def tied_reference():
    """(params, batch, loss, grads) of the tied, unpadded, unchunked step on the 2x2x2 mesh."""
    plain = model_config(tie=True)
    params, batch = initial_params(plain), weighted_batch(plain)
    return (params, batch) + loss_and_grads(plain, mesh_of(2, 2, 2), params, batch)


@pytest.mark.e2e
@pytest.mark.parametrize("loss_chunks", [0, 4])
def test_padded_vocabulary_gives_the_unpadded_loss(loss_chunks, tied_reference):
    params, batch, loss, grads = tied_reference
    padded = model_config(tie=True, loss_chunks=loss_chunks, vocab_multiple=48)  # 64 -> 96
    mesh = mesh_of(2, 2, 2)
    padded_loss, padded_grads = loss_and_grads(padded, mesh, pad_vocab(params, 32), batch)
    np.testing.assert_allclose(padded_loss, loss, rtol=1e-6)
    wte_grad = padded_grads["wte"]["embedding"]
    np.testing.assert_array_equal(wte_grad[64:], 0.0)  # the padded rows never learn
    padded_grads["wte"]["embedding"] = wte_grad[:64]
    assert_trees_close(padded_grads, grads, rtol=1e-5, atol=1e-7)
