"""Config validation (one clear message per problem), mesh resolution, overrides, JSON, CLI."""

from __future__ import annotations

import importlib.util
import re
from typing import Callable

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from gpt_jax import cli
from gpt_jax.config import from_json, list_presets, load_preset, preset_path, to_json, validate
from gpt_jax.errors import ConfigError
from gpt_jax.model import ATTENTION_IMPLS
from gpt_jax.sharding import MeshConfig


def tiny() -> ml_collections.ConfigDict:
    return load_preset("tiny")


def mesh(data: int, fsdp: int, tensor: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def test_presets_validate():
    names = list_presets()
    assert {"default", "tiny", "gpt2_124m", "gpt2_350m", "gpt2_774m", "gpt2_1558m"} <= set(names)
    for name in names:
        validate(load_preset(name))


def test_unknown_preset_names_the_available_ones():
    with pytest.raises(ConfigError, match="'gpt5'.*gpt2_124m"):
        preset_path("gpt5")


def _set(section: str, **values) -> Callable[[ml_collections.ConfigDict], None]:
    return lambda c: c[section].update(values)


# (change to the tiny config, a regex the ConfigError message must match)
INVALID = {
    "indivisible_heads": (_set("model", n_embd=30, n_head=4),
                          r"model\.n_embd=30 is not divisible by model\.n_head=4"),
    "unknown_attention": (_set("model", attention_impl="flash"),
                          r"model\.attention_impl='flash' is not one of "
                          + re.escape(", ".join(ATTENTION_IMPLS))),
    "zero_layers": (_set("model", n_layer=0), r"model\.n_layer=0 must be > 0"),
    "negative_heads": (_set("model", n_head=-2), r"model\.n_head=-2 must be > 0"),
    "zero_vocab": (_set("model", vocab_size=0), r"model\.vocab_size=0 must be > 0"),
    "zero_block": (_set("model", block_size=0), r"model\.block_size=0 must be > 0"),
    "zero_width": (_set("model", n_embd=0), r"model\.n_embd=0 must be > 0"),
    "zero_batch": (_set("train", global_batch_size=0), r"train\.global_batch_size=0 must be > 0"),
    "odd_rope_head": (_set("model", position="rope", n_embd=36, n_head=4),
                      r"rope.*even head size, got 9"),
    "dropout_one": (_set("model", dropout=1.0), r"model\.dropout=1\.0 must be in \[0, 1\)"),
    "unknown_remat": (_set("model", remat_policy="some"), r"model\.remat_policy='some'"),
    "unknown_norm": (_set("model", norm="batchnorm"), r"model\.norm='batchnorm'"),
    "unknown_dtype": (_set("model", dtype="float8"), r"model\.dtype='float8'"),
    "microbatches": (_set("train", global_batch_size=8, microbatches=3),
                     r"global_batch_size=8 is not divisible by train\.microbatches=3"),
    "indivisible_loss_chunks": (_set("model", loss_chunks=5),
                                r"model\.loss_chunks=5 does not divide model\.block_size=32"),
    "negative_loss_chunks": (_set("model", loss_chunks=-1), r"model\.loss_chunks=-1 must be >= 0"),
    "zero_vocab_multiple": (_set("model", vocab_multiple=0),
                            r"model\.vocab_multiple=0 must be >= 1 \(1: no padding\)"),
    "unknown_mu_dtype": (_set("optim", mu_dtype="int8"), r"optim\.mu_dtype='int8' is not one of"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_validate_rejects_with_message(name: str):
    change, message = INVALID[name]
    config = tiny()
    change(config)
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_mesh_must_match_device_count():
    config = tiny()
    config.mesh.update(data=3, fsdp=1, tensor=1)
    validate(config)  # without a device count the mesh is not checked
    with pytest.raises(ConfigError, match=r"data=3, fsdp=1, tensor=1.*3 devices but 8"):
        validate(config, num_devices=8)
    with pytest.raises(ConfigError, match=r"3 devices but 8"):
        MeshConfig.from_dict(mesh(3, 1, 1)).shape(8)


def test_mesh_minus_one_takes_the_rest():
    assert MeshConfig.from_dict(mesh(-1, 1, 1)).shape(8) == (8, 1, 1)
    assert MeshConfig.from_dict(mesh(-1, 2, 2)).shape(8) == (2, 2, 2)
    assert MeshConfig.from_dict(mesh(2, -1, 1)).shape(8) == (2, 4, 1)
    assert MeshConfig.from_dict(mesh(1, 1, -1)).shape(8) == (1, 1, 8)
    assert MeshConfig.from_dict(mesh(2, 2, 2)).shape(8) == (2, 2, 2)


@pytest.mark.parametrize("sizes, message", [
    ((-1, -1, 1), "at most one axis may be -1"),
    ((-1, 3, 1), "does not divide the 8 devices"),
    ((0, 8, 1), "must be >= 1 or -1"),
    ((2, -2, 2), "must be >= 1 or -1"),
])
def test_bad_mesh_shapes(sizes: tuple[int, int, int], message: str):
    with pytest.raises(ConfigError, match=message):
        MeshConfig.from_dict(mesh(*sizes)).shape(8)


def test_mesh_must_fit_batch_and_heads():
    config = tiny()  # batch 8, 4 heads
    config.mesh.update(data=1, fsdp=1, tensor=8)
    with pytest.raises(ConfigError, match=r"model\.n_head=4 is not divisible by mesh\.tensor=8"):
        validate(config, num_devices=8)
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    config.train.global_batch_size = 12
    with pytest.raises(ConfigError, match=r"=12 is not divisible by the data\*fsdp=8"):
        validate(config, num_devices=8)
    config.train.global_batch_size = 16
    validate(config, num_devices=8)


def _parse_config_flags(*overrides: str) -> ml_collections.ConfigDict:
    """Parse `--config=tiny.py <overrides>` on a fresh FlagValues, as the CLI does."""
    argv = ["prog", f"--config={preset_path('tiny')}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", preset_path("tiny"), flag_values=flag_values,
                                    sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_config_flag_overrides_a_known_key():
    config = _parse_config_flags("--config.model.n_layer=3", "--config.optim.lr=0.01")
    assert config.model.n_layer == 3 and config.optim.lr == 0.01


def test_config_flag_rejects_an_unknown_key():
    with pytest.raises(Exception, match="n_layerz"):
        _parse_config_flags("--config.model.n_layerz=3")


def test_config_flag_rejects_a_wrong_type():
    with pytest.raises(Exception, match="n_layer"):
        _parse_config_flags("--config.model.n_layer=three")


@pytest.mark.parametrize("name", ["tiny", "gpt2_124m"])
def test_json_round_trip(name: str):
    config = load_preset(name)
    config.model.position = "rope"
    config.mesh.update(data=2, fsdp=2, tensor=2)
    restored = from_json(to_json(config))
    assert restored.to_dict() == config.to_dict()
    assert restored.mesh.logical_axis_rules == config.mesh.logical_axis_rules
    assert isinstance(restored.mesh.logical_axis_rules[0][1], tuple)  # ("data", "fsdp")
    validate(restored)
    assert to_json(restored) == to_json(config)


def test_cli_help_lists_existing_commands(capsys):
    with pytest.raises(SystemExit) as info:
        cli.run(["gpt-jax", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: gpt-jax" in out
    listed = re.findall(r"^  (\S+)\s", out, flags=re.MULTILINE)
    assert listed == list(cli.available())
    assert "bench" in listed
    for name, (module, _) in cli.COMMANDS.items():
        exists = importlib.util.find_spec(f"gpt_jax.commands.{module}") is not None
        assert (name in listed) == exists, name


def test_cli_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.run(["gpt-jax", "trian"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "bench" in err
    assert len(err.strip().splitlines()) == 1


def test_gpt2_vocab_validates_on_a_tensor_mesh():
    """50257 does not divide by tensor=2: the vocab dim is replicated (see test_sharding)."""
    config = load_preset("gpt2_124m")
    config.mesh.update(data=-1, fsdp=2, tensor=2)
    validate(config, num_devices=8)  # no ConfigError
    assert MeshConfig.from_dict(config.mesh).shape(8) == (2, 2, 2)
    config.model.vocab_size = 50304
    validate(config, num_devices=8)
