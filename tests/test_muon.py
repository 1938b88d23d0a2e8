"""optim.optimizer=muon: Newton-Schulz against numpy's SVD, one Muon step against a numpy
reference, which leaves get Muon, sharded == one device, AOT compile, exact checkpoint resume."""

import jax
import numpy as np
import pytest
from test_train_step import assert_trees_close, mesh_of, random_batches, run_steps, tiny_config

from gpt_jax import aot, checkpoint, sharding
from gpt_jax import config as config_lib
from gpt_jax.config import typed
from gpt_jax.errors import ConfigMismatchError
from gpt_jax.model import ModelConfig
from gpt_jax.model import abstract_params as param_shapes
from gpt_jax.optim import OptimConfig, muon_labels
from gpt_jax.run import check_resume
from gpt_jax.step import Trainer

NS = (3.4445, -4.7750, 2.0315)


def muon_optim(**kw):
    o = config_lib.base_config().optim
    o.update({"optimizer": "muon", "schedule": "constant", "warmup_steps": 0, "clip_norm": 0.0,
              **kw})
    return o


def np_orthogonalize(g):
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(5):
        a = x @ x.T
        x = NS[0] * x + (NS[1] * a + NS[2] * a @ a) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def np_muon_steps(grads, p, lr, beta, wd, nesterov, fan_in):
    """A Muon leaf's updates over `grads` (optax's EMA momentum with bias correction)."""
    m, out = np.zeros_like(p), []
    for t, g in enumerate(grads, start=1):
        m = beta * m + (1 - beta) * g
        mhat = (beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
                if nesterov else m / (1 - beta ** t))
        mat = mhat.reshape(fan_in, -1)
        o = np_orthogonalize(mat) * np.sqrt(max(1, mat.shape[1] / mat.shape[0]))
        out.append(-lr * (o.reshape(p.shape) + wd * p))
    return out


def one_update(o, params, grads):
    tx = OptimConfig.from_dict(o).build(10).tx
    return jax.jit(tx.update)(grads, tx.init(params), params)[0]


def test_newton_schulz_is_close_to_the_polar_factor():
    g = np.random.default_rng(0).normal(size=(24, 10)).astype(np.float32)
    o = muon_optim(muon_lr=1.0, muon_momentum=0.0, muon_nesterov=False)
    update = one_update(o, {"h_0": {"mlp": {"fc": {"kernel": g}}}},
                        {"h_0": {"mlp": {"fc": {"kernel": g}}}})
    x = -np.asarray(update["h_0"]["mlp"]["fc"]["kernel"])  # fan_out < fan_in: scale 1
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    s = np.linalg.svd(x, compute_uv=False)
    assert np.all((s > 0.5) & (s < 1.5)), s
    core = u.T @ x @ vt.T  # diagonal with the singular values if x shares g's singular vectors
    np.testing.assert_allclose(core - np.diag(np.diag(core)), 0, atol=1e-4)
    np.testing.assert_allclose(np.abs(x - u @ vt).max(), 0, atol=0.35)
    np.testing.assert_allclose(x, np_orthogonalize(g), rtol=1e-3, atol=1e-4)


@pytest.mark.e2e
@pytest.mark.parametrize("nesterov", [True, False])
def test_two_muon_steps_match_numpy(nesterov):
    rng = np.random.default_rng(1)
    shapes = {"h": {"mlp": {"fc": {"kernel": (2, 4, 12)}},  # stacked: one matrix per layer
                    "attn": {"qkv": {"kernel": (2, 4, 3, 2, 2)}, "proj": {"kernel": (2, 2, 2, 4)}}},
              "wte": {"embedding": (16, 4)}}
    params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
             for _ in range(2)]
    o = muon_optim(muon_lr=0.05, muon_momentum=0.9, muon_nesterov=nesterov,
                   muon_weight_decay=0.1)
    tx = OptimConfig.from_dict(o).build(10).tx
    state, got = tx.init(params), []
    for g in grads:
        u, state = jax.jit(tx.update)(g, state, params)
        got.append(u)
    fan_in = {"fc": 4, "qkv": 4, "proj": 4}  # qkv [D | 3HK], proj [HK | D]
    for name, sub in (("fc", "mlp"), ("qkv", "attn"), ("proj", "attn")):
        p = params["h"][sub][name]["kernel"]
        for layer in range(2):
            want = np_muon_steps([g["h"][sub][name]["kernel"][layer] for g in grads], p[layer],
                                 0.05, 0.9, 0.1, nesterov, fan_in[name])
            for step in range(2):
                np.testing.assert_allclose(got[step]["h"][sub][name]["kernel"][layer],
                                           want[step], rtol=2e-3, atol=2e-5)
    # The embedding took AdamW's first step: -lr * sign(g) (+ nothing: embeddings not decayed).
    np.testing.assert_allclose(got[0]["wte"]["embedding"],
                               -o.lr * np.sign(grads[0]["wte"]["embedding"]), rtol=1e-4)


@pytest.mark.parametrize("scan", [False, True])
def test_muon_gets_the_attention_and_mlp_kernels_only(scan):
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16,
                      scan_layers=scan, tie_embeddings=False)
    flat = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(muon_labels(param_shapes(cfg)))[0]}
    muon = sorted(k for k, v in flat.items() if v == "muon")
    blocks = ["['h']"] if scan else ["['h_0']", "['h_1']"]
    assert muon == sorted(f"{b}['{m}']['{d}']['kernel']" for b in blocks
                          for m, d in (("attn", "qkv"), ("attn", "proj"),
                                       ("mlp", "fc"), ("mlp", "proj")))
    adamw = [k for k, v in flat.items() if v == "adamw"]
    assert any("lm_head" in k for k in adamw) and any("wte" in k for k in adamw)
    assert any("wpe" in k for k in adamw) and any("ln_f" in k for k in adamw)
    assert all("bias" in k or "scale" in k or "lm_head" in k or "wte" in k or "wpe" in k
               for k in adamw)


@pytest.mark.e2e
@pytest.mark.parametrize("scan", [False, True])
def test_muon_on_the_mesh_matches_single_device_and_compiles_ahead(scan):
    config = tiny_config()
    config.optim.update(optimizer="muon", muon_lr=0.02)
    config.model.scan_layers = scan
    batches = list(random_batches(config, 2))
    single_losses, single_params = run_steps(config, mesh_of(1, 1, 1), batches)
    mesh_losses, mesh_params = run_steps(config, mesh_of(2, 2, 2), batches)
    np.testing.assert_allclose(mesh_losses, single_losses, rtol=1e-5)
    assert_trees_close(mesh_params, single_params, rtol=1e-4, atol=5e-5)
    if scan:  # the AOT path (gpt-jax aot) lowers and compiles the Muon step on a CPU mesh
        compiled, _, state = aot.compile_train_step(config, mesh_of(1, 4, 2))
        assert compiled is not None and jax.tree.leaves(state["opt_state"])


@pytest.mark.e2e
def test_muon_checkpoint_resume_is_exact(tmp_path):
    config = tiny_config()
    config.optim.update(optimizer="muon")
    mesh = mesh_of(1, 2, 2)
    batches = list(random_batches(config, 4))
    trainer = Trainer.for_config(typed(config), mesh)
    step = trainer.jit_train_step()

    def steps(state, hosts):
        with sharding.activate(mesh, trainer.rules):
            for host in hosts:
                batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in host.items()}
                state, _ = step(state, batch)
        return state

    # Muon's and AdamW's moments are sharded like their params (MaskedNode leaves skipped).
    shapes = trainer.abstract_state()
    by_shape = {}
    for x in jax.tree.leaves(shapes["params"]):
        by_shape.setdefault(x.shape, set()).add(x.sharding.spec)
    moments = [x for x in jax.tree.leaves(shapes["opt_state"]) if x.ndim >= 2]
    labels = [label for label, x in zip(jax.tree.leaves(muon_labels(shapes["params"])),
                                        jax.tree.leaves(shapes["params"])) if x.ndim >= 2]
    assert len(moments) == labels.count("muon") + 2 * labels.count("adamw")  # mu; mu, nu
    assert all(x.sharding.spec in by_shape[x.shape] for x in moments)
    assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in moments)
    straight = jax.device_get(steps(trainer.init_state(0), batches)["params"])
    half = steps(trainer.init_state(0), batches[:2])
    saver = checkpoint.Checkpointer(str(tmp_path), config.checkpoint)
    saver.save(half, {"step": 2}, typed(config).to_dict(), force=True)
    saver.close()
    restored, _ = checkpoint.Checkpointer(str(tmp_path), config.checkpoint).restore_latest(
        trainer.abstract_state())
    resumed = jax.device_get(steps(restored, batches[2:])["params"])
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(x, y)
    other = tiny_config()
    with pytest.raises(ConfigMismatchError, match="optim.optimizer='muon'"):
        check_resume(str(tmp_path), typed(other))


def test_bad_optimizer_is_a_one_line_error():
    config = config_lib.load_preset("tiny")
    config.optim.optimizer = "sgd"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    assert str(e.value) == "optim.optimizer='sgd' is not one of adamw, muon"
