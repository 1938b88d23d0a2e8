"""Said once: the logical axis rules (checked; the batch sharding derived from `act_batch`) and
the model config schema."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec as P

from gpt_jax import axes, data, sharding, train
from gpt_jax import config as config_lib
from gpt_jax.config import ConfigError, base_config, from_json, load_preset, to_json, validate
from gpt_jax.model import GPT, ModelConfig, kv_cache_axes
from gpt_jax.step import Trainer


def with_rule(name: str, value) -> tuple:
    return tuple((n, value if n == name else a) for n, a in axes.DEFAULT_LOGICAL_AXIS_RULES)


def test_every_axis_the_model_names_has_a_rule():
    cfg = dataclasses.replace(ModelConfig.from_config(load_preset("tiny").model),
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
        sharding.logical_rules(config)


def test_batch_sharding_follows_the_act_batch_rule(tmp_path, text_corpus):
    config = load_preset("tiny")
    config.data.update(source="text_files", paths=str(text_corpus), cache_dir=str(tmp_path))
    config.mesh.update(data=4, fsdp=2)
    config.mesh.logical_axis_rules = with_rule(axes.ACT_BATCH, "data")
    validate(config)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_rules(config)
    assert sharding.batch_sharding(mesh, rules).spec == P("data", None)
    assert sharding.batch_shards(mesh, rules) == 4
    assert Trainer.create(config, mesh).batch_sharding == sharding.batch_sharding(mesh, rules)
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)  # the default rules

    dataset = data.TokenDataset(config, data.ByteTokenizer(), split="train")
    with data.BatchLoader(dataset, 8, 16, 0, mesh, prefetch=0, rules=rules) as loader:
        _, batch = next(loader)
    assert batch["inputs"].sharding == sharding.batch_sharding(mesh, rules)


def test_runs_saved_with_the_retired_rules_still_load():
    saved = json.loads(to_json(base_config()))
    saved["mesh"]["logical_axis_rules"] = ([["batch", ["data", "fsdp"]], ["length", None]]
                                           + saved["mesh"]["logical_axis_rules"])
    config = from_json(json.dumps(saved))
    assert config.mesh.logical_axis_rules == axes.DEFAULT_LOGICAL_AXIS_RULES
    validate(config)


def test_one_model_schema():
    assert dict(base_config().model) == dataclasses.asdict(ModelConfig())
    assert ModelConfig.from_config(base_config().model) == ModelConfig()
    assert set(config_lib.PARENT_MODEL_FIELDS) == (set(config_lib.MODEL_FIELDS)
                                                   - set(config_lib.RUNTIME_MODEL_FIELDS))
    for name, policy in config_lib.REMAT_CHECKPOINT_POLICIES.items():
        assert (policy is None or isinstance(policy, tuple)
                or callable(getattr(jax.checkpoint_policies, policy))), name


def test_resolving_a_run_returns_a_new_frozen_config(tmp_path):
    config = load_preset("tiny")  # byte tokenizer: its vocabulary replaces model.vocab_size
    config.lock()
    resolved, tokenizer = train.resolve_run(config, str(tmp_path / "run"))
    assert resolved.model.vocab_size == tokenizer.vocab_size != config.model.vocab_size == 64
    assert config.to_dict() == load_preset("tiny").to_dict()
    with pytest.raises(AttributeError):
        resolved.model.vocab_size = 64
    config.model.n_head = 5
    with pytest.raises(ConfigError, match="model.n_embd=32 is not divisible by model.n_head=5"):
        train.resolve_run(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()  # validated before anything is written
