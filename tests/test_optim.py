"""Learning-rate schedules against hand formulas; which weights get weight decay."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax.config import typed
from gpt_jax.model import GPT, ModelConfig, init_params
from gpt_jax.model import abstract_params as param_shapes
from gpt_jax.optim import OptimConfig, decay_mask, lr_schedule


def optim(**kw) -> OptimConfig:
    return OptimConfig(**{"lr": 1.0, "warmup_steps": 10, "decay_steps": 110, "min_lr_ratio": 0.1,
                          **kw})


def expected(schedule, step):
    """The schedules written out by hand (warmup 10, decay to 0.1 by step 110)."""
    if step < 10:
        return step / 10
    frac = (step - 10) / 100
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1)))
    if schedule == "linear":
        return 1 - 0.9 * min(frac, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":  # stable for 80 steps, then linear to 0.1 over 20
        return 1.0 if step < 90 else 1 - 0.9 * min((step - 90) / 20, 1)
    raise AssertionError(schedule)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_schedules(schedule):
    fn = lr_schedule(optim(schedule=schedule), num_steps=110)
    for step in [0, 1, 5, 10, 11, 50, 89, 90, 100, 109, 110, 150]:
        assert float(fn(step)) == pytest.approx(expected(schedule, step), abs=1e-6), step


def test_decay_steps_default_to_num_steps():
    fn = lr_schedule(optim(schedule="linear", decay_steps=-1), num_steps=60)
    assert float(fn(60)) == pytest.approx(0.1)
    assert float(fn(35)) == pytest.approx(1 - 0.9 * 0.5)


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_spares_biases_norms_embeddings(scan):
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16,
                      scan_layers=scan)
    shapes = param_shapes(cfg)
    flat = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(decay_mask(shapes))[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed and all("kernel" in k for k in decayed)
    assert not any(("bias" in k or "scale" in k or "wte" in k or "wpe" in k) for k in decayed)
    n_kernels = sum("kernel" in k for k in flat)
    assert len(decayed) == n_kernels
    with_emb = jax.tree.leaves(decay_mask(shapes, decay_embeddings=True))
    assert sum(with_emb) == n_kernels + 2  # + wte and wpe


def adam_moments(opt_state, name: str) -> list:
    """The leaves of AdamW's `mu` or `nu` in an optimizer state."""
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
            if any(getattr(k, "name", None) == name for k in path)]


@pytest.mark.e2e
def test_bf16_first_moment_update_is_close_to_float32():
    config = config_lib.load_preset("tiny")
    params = init_params(GPT(typed(config).model), jax.random.key(0))
    grads = jax.tree.map(lambda p: 0.01 * jax.random.normal(jax.random.key(1), p.shape), params)
    updates = {}
    for mu_dtype in ("", "bfloat16"):
        config.optim.mu_dtype = mu_dtype
        tx = typed(config).optim.build(10).tx

        @jax.jit
        def two_steps(params, grads):
            state = tx.init(params)
            for _ in range(2):
                update, state = tx.update(grads, state, params)
            return update, state

        updates[mu_dtype], state = two_steps(params, grads)
        mu = adam_moments(state, "mu")
        assert {x.dtype for x in mu} == {jnp.dtype(mu_dtype or "float32")}
        assert {x.dtype for x in adam_moments(state, "nu")} == {jnp.dtype("float32")}
    for got, want in zip(jax.tree.leaves(updates["bfloat16"]), jax.tree.leaves(updates[""])):
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-7)
    with pytest.raises(config_lib.ConfigError, match="optim.mu_dtype='bf16' is not one of"):
        config.optim.mu_dtype = "bf16"
        config_lib.validate(config)


@pytest.mark.e2e
def test_bf16_first_moment_checkpoint_restores(tmp_path):
    from gpt_jax import checkpoint
    from gpt_jax.step import Trainer

    config = config_lib.load_preset("tiny")
    config.optim.mu_dtype = "bfloat16"
    trainer = Trainer.for_config(typed(config), typed(config).mesh.make(jax.devices()[:1]))
    state = trainer.init_state(0)
    tokens = np.random.default_rng(0).integers(0, 64, (8, 33), dtype=np.int32)
    state, _ = trainer.jit_train_step()(state, {"inputs": tokens[:, :-1],
                                                "targets": tokens[:, 1:]})
    saved = jax.device_get(state["opt_state"])
    saver = checkpoint.Checkpointer(str(tmp_path), config.checkpoint)
    saver.save(state, {"step": 1}, typed(config).to_dict(), force=True)
    saver.close()
    restored, _ = checkpoint.Checkpointer(str(tmp_path), config.checkpoint).restore_latest(
        trainer.abstract_state())
    mu = adam_moments(restored["opt_state"], "mu")
    assert {x.dtype for x in mu} == {jnp.dtype("bfloat16")}
    assert any(np.any(np.asarray(x, np.float32) != 0) for x in mu)
    for got, want in zip(jax.tree.leaves(restored["opt_state"]), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def numpy_adamw(params, grads_seq, o: OptimConfig, lrs, decay):
    """Clip to the global norm, then AdamW with bias correction and decoupled weight decay on
    the `decay` leaves, written out in numpy (float64)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
        if o.clip_norm > 0 and norm > o.clip_norm:
            g = {k: x * (o.clip_norm / norm) for k, x in g.items()}
        for k in p:
            m[k] = o.b1 * m[k] + (1 - o.b1) * g[k]
            v[k] = o.b2 * v[k] + (1 - o.b2) * g[k] ** 2
            update = (m[k] / (1 - o.b1 ** t)) / (np.sqrt(v[k] / (1 - o.b2 ** t)) + o.eps)
            if decay[k]:
                update = update + o.weight_decay * p[k]
            p[k] = p[k] - lr * update
    return p


@pytest.mark.parametrize("clip_norm", [0.0, 0.5])
def test_adamw_and_clipping_follow_their_formulas_over_several_steps(clip_norm):
    """Odd b1/b2/eps/weight decay, a decayed kernel and an undecayed bias, gradients whose norms
    vary (some above the clip, some below): Adam is invariant to one constant scale, not to
    clipping that changes from step to step, so the order and the threshold both show."""
    o = optim(lr=0.05, warmup_steps=2, schedule="linear", b1=0.8, b2=0.9, eps=1e-3,
              weight_decay=0.3, clip_norm=clip_norm, min_lr_ratio=0.1)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
              "bias": rng.normal(size=(4,)).astype(np.float32)}
    scales = [0.1, 3.0, 0.2, 5.0, 1.0]
    grads_seq = [{k: (s * rng.normal(size=x.shape)).astype(np.float32) for k, x in params.items()}
                 for s in scales]
    built = o.build(num_steps=len(scales))
    tree = {k: jnp.asarray(x) for k, x in params.items()}
    state = built.tx.init(tree)
    for grads in grads_seq:
        updates, state = built.tx.update({k: jnp.asarray(x) for k, x in grads.items()}, state,
                                         tree)
        tree = optax_apply(tree, updates)
    lrs = [float(built.schedule(t)) for t in range(len(scales))]
    want = numpy_adamw(params, grads_seq, o, lrs, {"kernel": True, "bias": False})
    for k in params:
        np.testing.assert_allclose(np.asarray(tree[k]), want[k], rtol=2e-5, atol=2e-6)


def optax_apply(tree, updates):
    import optax
    return optax.apply_updates(tree, updates)
