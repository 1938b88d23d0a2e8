"""The shipped config files (`configs/*.py`) by name; plain Python, so that every command's
`--help` finds its default config without loading JAX."""

from __future__ import annotations

import os

import configs  # the presets ship as a package next to gpt_jax, found where it is installed
from gpt_jax.errors import ConfigError


def _configs_dir() -> str:
    return os.path.dirname(configs.__file__)


def preset_path(name: str) -> str:
    """The file of a preset in `configs/`, e.g. 'gpt2_124m' -> .../configs/gpt2_124m.py."""
    path = os.path.join(_configs_dir(), f"{name}.py")
    if not os.path.exists(path):
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return path


def list_presets() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(_configs_dir())
                  if f.endswith(".py") and not f.startswith("_"))
