"""One initialisation: the params training starts from, sharded or not, and their shapes."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import init_sharded
from gpt_jax import flops
from gpt_jax.config import load_preset, typed
from gpt_jax.model import GPT, abstract_params, init_params
from gpt_jax.step import Trainer


@pytest.mark.e2e
def test_every_init_path_gives_the_params_training_starts_from():
    config = load_preset("tiny")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.train.seed = 3
    mesh, rules = typed(config).mesh.make(), typed(config).mesh.rules
    cfg = typed(config).model
    trainer = Trainer.for_config(typed(config), mesh)
    trained = jax.device_get(trainer.init_state(3)["params"])
    rng = jax.random.PRNGKey(3)
    sharded, shardings = init_sharded(GPT(cfg), rng, mesh, rules)
    assert jax.tree.map(lambda x: x.sharding, sharded) == shardings
    assert shardings == trainer.state_shardings["params"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(sharded), trained)
    eager = init_params(GPT(cfg), rng)  # not jitted: the same values up to XLA's rounding
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), eager,
                 trained)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), trained)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(cfg)) == shapes
    assert flops.count_params(cfg) == sum(x.size for x in jax.tree.leaves(trained))
