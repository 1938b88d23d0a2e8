"""Learning-rate schedules against hand formulas; which weights get weight decay."""

import math

import jax
import pytest

from gpt_jax import config as config_lib
from gpt_jax.flops import param_shapes
from gpt_jax.model import ModelConfig
from gpt_jax.optim import decay_mask, lr_schedule


def optim(**kw):
    o = config_lib.base_config().optim
    o.update({"lr": 1.0, "warmup_steps": 10, "decay_steps": 110, "min_lr_ratio": 0.1, **kw})
    return o


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
