"""Said once: the logical axis rules (checked; the batch sharding derived from `act_batch`) and
the model config schema."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec as P

from gpt_jax import axes, data, sharding
from gpt_jax import config as config_lib
from gpt_jax.config import base_config, load_preset, typed, validate
from gpt_jax.errors import ConfigError
from gpt_jax.model import GPT, REMAT_CHECKPOINT_POLICIES, ModelConfig, kv_cache_axes
from gpt_jax.run import resolve_run
from gpt_jax.step import Trainer


def with_rule(name: str, value) -> tuple:
    return tuple((n, value if n == name else a) for n, a in axes.DEFAULT_LOGICAL_AXIS_RULES)


def test_every_axis_the_model_names_has_a_rule():
    cfg = dataclasses.replace(typed(load_preset("tiny")).model,
                              scan_layers=True, tie_embeddings=False, mlp="swiglu")
    boxed = jax.eval_shape(lambda r: GPT(cfg).init(r, jax.numpy.zeros((1, 1), "int32")),
                           jax.random.key(0))["params"]
    specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, P))
    used = {name for spec in specs for name in spec if name} | set(kv_cache_axes(cfg))
    assert used <= set(axes.LOGICAL_AXES)
    assert {name for name, _ in axes.DEFAULT_LOGICAL_AXIS_RULES} == set(axes.LOGICAL_AXES)


@pytest.mark.parametrize("rules, message", [
    (axes.DEFAULT_LOGICAL_AXIS_RULES + (("act_bacth", "data"),),
     "logical axis rule 'act_bacth' names no logical axis; allowed: vocab, embed"),
    (with_rule(axes.EMBED, "fsdpp"), "logical axis rule 'embed' maps to mesh axis 'fsdpp'"),
    (axes.DEFAULT_LOGICAL_AXIS_RULES[1:], "logical axis rules lack act_batch"),
    (axes.DEFAULT_LOGICAL_AXIS_RULES + ((axes.KV, None),), "logical axis 'kv' has 2 rules"),
])
def test_a_bad_rule_is_one_line_naming_it(rules, message):
    config = base_config()
    config.mesh.logical_axis_rules = rules
    with pytest.raises(ConfigError, match="^mesh.logical_axis_rules: " + message) as e:
        validate(config)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=message):
        typed(config).mesh.rules


def test_batch_sharding_follows_the_act_batch_rule(tmp_path, text_corpus):
    config = load_preset("tiny")
    config.data.update(source="text_files", paths=str(text_corpus), cache_dir=str(tmp_path))
    config.mesh.update(data=4, fsdp=2)
    config.mesh.logical_axis_rules = with_rule(axes.ACT_BATCH, "data")
    validate(config)
    mesh, rules = typed(config).mesh.make(), typed(config).mesh.rules
    assert sharding.batch_sharding(mesh, rules).spec == P("data", None)
    assert sharding.batch_shards(mesh, rules) == 4
    assert Trainer.for_config(typed(config), mesh).batch_sharding == sharding.batch_sharding(mesh, rules)
    default = axes.LogicalRules()
    assert sharding.batch_sharding(mesh, default).spec == P(("data", "fsdp"), None)

    tok = data.ByteTokenizer()
    store = data.prepare_cached(typed(config).data, tok)
    dataset = data.open_dataset(store, tok, "train", 32)
    with data.BatchLoader(dataset, 8, 16, 0, mesh, rules, prefetch=0) as loader:
        _, batch = next(loader)
    assert batch["inputs"].sharding == sharding.batch_sharding(mesh, rules)


def test_rules_refuse_an_array_that_names_a_mesh_axis_twice():
    rules = axes.LogicalRules(with_rule(axes.EMBED, "tensor"))  # heads are on tensor too
    assert rules.spec((axes.EMBED, axes.KV)) == ("tensor", None)
    with pytest.raises(ConfigError, match="would split both 'embed' and 'heads' over mesh axis "
                       "'tensor'"):
        rules.spec((axes.EMBED, None, axes.HEADS, axes.KV))
    config = base_config()
    config.mesh.logical_axis_rules = with_rule(axes.EMBED, "tensor")
    mesh = typed(config).mesh.make()
    with pytest.raises(ConfigError, match="mesh axis 'tensor'"):
        sharding.param_shardings(typed(config).model, mesh, typed(config).mesh.rules)


def test_one_model_schema():
    assert dict(base_config().model) == dataclasses.asdict(ModelConfig())
    assert typed(base_config()).model == ModelConfig()
    arch = set(ModelConfig.flagged("arch"))
    assert {"n_layer", "vocab_size", "qk_norm"} <= arch
    assert not arch & {"dropout", "dtype", "param_dtype", "attention_impl", "remat_policy",
                       "init_std", "loss_chunks"}  # how a run computes: a fine-tune chooses
    assert set(ModelConfig.flagged("resume")) <= arch
    assert "optim.mu_dtype" in config_lib.fields_flagged("resume")
    for name, policy in REMAT_CHECKPOINT_POLICIES.items():
        assert (policy is None or isinstance(policy, tuple)
                or callable(getattr(jax.checkpoint_policies, policy))), name


def test_resolving_a_run_returns_a_new_frozen_config(tmp_path):
    config = load_preset("tiny")  # byte tokenizer: its vocabulary replaces model.vocab_size
    config.lock()
    run = resolve_run(config, str(tmp_path / "run"))
    resolved, tokenizer = run.config, run.tokenizer
    assert resolved.model.vocab_size == tokenizer.vocab_size != config.model.vocab_size == 64
    assert config.to_dict() == load_preset("tiny").to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.model.vocab_size = 64
    config.model.n_head = 5
    with pytest.raises(ConfigError, match="model.n_embd=32 is not divisible by model.n_head=5"):
        resolve_run(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()  # validated before anything is written
