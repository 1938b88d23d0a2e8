"""The base of every config section: a frozen dataclass that checks its own fields.

A section (`ModelConfig` in model.py, `DataConfig` in data/config.py, `OptimConfig` in
optim.py, ...) is declared next to the code that uses it. Its fields carry their defaults and
two flags in their metadata: `arch` (the model's architecture, which a fine-tune takes from its
parent) and `resume` (a resumed run must match its checkpoints' value). `check()` holds the
section's own checks and runs when it is made, so an instance is always valid.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar, Mapping

from gpt_jax.errors import ConfigError


def field(default: Any, *, arch: bool = False, resume: bool = False) -> Any:
    """A section field with its default; `arch`/`resume`: see the module docstring."""
    return dataclasses.field(default=default, metadata={"arch": arch, "resume": resume})


class Section:
    """Mixin of the frozen dataclasses that make up a config (see the module docstring)."""
    name: ClassVar[str]  # the section's key: "model", "data", ...

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ConfigError naming the first field that cannot work."""

    # -- construction from plain data (config files, JSON) ------------------------------

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, strict: bool = True):
        """The section from {field: value}; missing fields take their defaults.

        `strict`: an unknown field is a ConfigError (a config file, an override); else it is
        dropped (a saved run of another version of this schema).
        """
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown and strict:
            raise ConfigError(f"{cls.name}.{unknown[0]} is not a config field; {cls.name} has "
                              f"{', '.join(sorted(names))}")
        values = {k: _coerce(f"{cls.name}.{k}", v, hints[k]) for k, v in raw.items()
                  if k in names}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def flagged(cls, flag: str) -> tuple[str, ...]:
        """The names of the fields whose metadata sets `flag` ("arch" or "resume")."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(flag))

    # -- checks ---------------------------------------------------------------------------

    def require(self, ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    def one_of(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        self.require(value in allowed,
                     f"{self.name}.{name}={value!r} is not one of {', '.join(allowed)}")

    def positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            self.require(value > 0, f"{self.name}.{name}={value!r} must be > 0")


def _coerce(where: str, value: Any, kind: Any) -> Any:
    """`value` as the field's type: an int for a float field becomes a float, a list for a
    tuple field a tuple; any other mismatch is a ConfigError naming the field."""
    origin = typing.get_origin(kind) or kind
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if origin in (int, float, str, bool, tuple):
        if isinstance(value, bool) and origin is not bool or not isinstance(value, origin):
            raise ConfigError(f"{where}={value!r} must be a {origin.__name__}")
    return value
