"""A run's configuration: the typed `Config` of its sections, and the edge it is made from.

Config files (`configs/*.py`) and `--config.x.y=v` overrides stay `ml_collections.ConfigDict`s
built on `base_config()` (every field with its default). `Config.from_dict` turns one, once,
into frozen typed sections, each declared and checked next to the code that uses it:

    model       ModelConfig       gpt_jax/model.py
    data        DataConfig        gpt_jax/data/config.py
    train       TrainConfig       gpt_jax/step.py
    optim       OptimConfig       gpt_jax/optim.py
    mesh        MeshConfig        gpt_jax/sharding.py (with the checked LogicalRules)
    checkpoint  CheckpointConfig  gpt_jax/checkpoint.py
    sample      SampleConfig      gpt_jax/sample.py

`gpt_jax.run.resolve_run` does that for a training run; nothing below it changes, re-derives
or `.get`s a field.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any, Mapping

import ml_collections

from gpt_jax.checkpoint import CheckpointConfig
from gpt_jax.data.config import DataConfig
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig
from gpt_jax.optim import OptimConfig
from gpt_jax.presets import list_presets, preset_path  # noqa: F401  (part of this API)
from gpt_jax.sample import SampleConfig
from gpt_jax.sharding import MeshConfig
from gpt_jax.step import TrainConfig

SECTIONS = {s.name: s for s in (ModelConfig, DataConfig, TrainConfig, OptimConfig, MeshConfig,
                                CheckpointConfig, SampleConfig)}


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    sample: SampleConfig = SampleConfig()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, strict: bool = True, **built) -> "Config":
        """The typed config of {section: {field: value}}; a missing field takes its default.

        `strict=False` drops fields and sections this schema does not know (a saved run of
        another version); else they are a ConfigError. `built`: sections made already (e.g.
        data=DataConfig(...)), used as they are.
        """
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown and strict:
            raise ConfigError(f"{unknown[0]!r} is not a config section; one of "
                              f"{', '.join(SECTIONS)}")
        return cls(**{name: built.get(name) or section.from_dict(dict(raw.get(name, {})),
                                                                 strict=strict)
                      for name, section in SECTIONS.items()})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    def replace(self, overrides: Mapping[str, Any]) -> "Config":
        """A copy with {"section.field": value} applied; each changed section is checked."""
        raw = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section not in raw or name not in raw[section]:
                raise ConfigError(f"{key!r} is not a config field")
            raw[section][name] = value
        return Config.from_dict(raw)

    def check_devices(self, num_devices: int) -> tuple[int, int, int]:
        """The mesh shape over `num_devices`, after the checks that depend on it."""
        data, fsdp, tensor = self.mesh.shape(num_devices)
        self.train.check_mesh(_batch_shards(self.mesh.rules.batch_axes, (data, fsdp, tensor)))
        self.model.check_mesh(tensor)
        return data, fsdp, tensor


def _batch_shards(axes, shape: tuple[int, int, int]) -> int:
    sizes = dict(zip(("data", "fsdp", "tensor"), shape))
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    count = 1
    for name in names:
        count *= sizes[name]
    return count


def fields_flagged(flag: str) -> tuple[str, ...]:
    """Every "section.field" whose metadata sets `flag`: "resume" (what a resumed run must
    share with its checkpoints) or "arch" (what a fine-tune takes from its parent)."""
    return tuple(f"{name}.{field}" for name, section in SECTIONS.items()
                 for field in section.flagged(flag))


# -- the edge: ConfigDicts of config files and overrides -----------------------------------

def base_config() -> ml_collections.ConfigDict:
    """Every field with its default: a small GPT on the built-in corpus, trainable on a CPU."""
    return ml_collections.ConfigDict(Config().to_dict())


def typed(config: Config | ml_collections.ConfigDict | Mapping) -> Config:
    """`config` as a Config (a ConfigDict or dict of a config file is checked here)."""
    if isinstance(config, Config):
        return config
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    return Config.from_dict(config)


def validate(config, num_devices: int | None = None) -> Config:
    """The typed config, checked (also against `num_devices` if given); ConfigError naming
    the first field that cannot work."""
    config = typed(config)
    if num_devices is not None:
        config.check_devices(num_devices)
    return config


def load_preset(name: str) -> ml_collections.ConfigDict:
    """`get_config()` of configs/<name>.py (checked), as the ConfigDict that files return."""
    preset_path(name)  # a one-line error for an unknown name
    config = importlib.import_module(f"configs.{name}").get_config()
    validate(config)
    return config


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"model": {"n_layer": 4}} -> {"model.n_layer": 4}: the keys overrides are written in."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_json(config) -> str:
    """A config (typed, a ConfigDict or a dict) as the JSON a run directory keeps."""
    raw = typed(config).to_dict()
    return json.dumps(raw, indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    """The ConfigDict of a saved config.json (a config file's `get_config()` may return it);
    fields this schema does not know are dropped."""
    return ml_collections.ConfigDict(Config.from_dict(json.loads(text), strict=False).to_dict())
