"""Logical axis names, the default rules mapping them onto mesh axes, and the rules object.

Parameters use the plain names, activations the `ACT_*` ones, so that the batch and `EMBED` may
both map to `fsdp` without one constraint naming a mesh axis twice. Plain Python: the config
imports this module without loading JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from gpt_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV = "kv"  # one head's features
MLP_HIDDEN = "mlp"  # the MLP's hidden features
LAYERS = "layers"  # the stacked layer axis under scan_layers
NORM = "norm"

# Activation axes.
ACT_BATCH = "act_batch"
ACT_LENGTH = "act_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV = "act_kv"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

LOGICAL_AXES = (VOCAB, EMBED, HEADS, KV, MLP_HIDDEN, LAYERS, NORM,
                ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV, ACT_MLP, ACT_VOCAB)

# Logical axis -> mesh axes (a name, a tuple of names, or None: replicated).
DEFAULT_LOGICAL_AXIS_RULES = (
    (ACT_BATCH, ("data", "fsdp")),
    (VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (KV, None),
    (MLP_HIDDEN, "tensor"),
    (LAYERS, None),
    (NORM, None),
    (ACT_LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV, None),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
)

MeshAxes = str | tuple[str, ...] | None


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


@dataclasses.dataclass(frozen=True)
class LogicalRules:
    """The logical axis -> mesh axes table of a run, checked once when it is made.

    Each logical axis has exactly one rule naming known mesh axes (else ConfigError naming
    it). `spec` turns an array's logical axes into mesh axes and refuses an array that would
    name one mesh axis twice. Hashable (a static argument of compiled functions) and iterable
    as (name, axes) pairs, which is what `flax.linen.logical_axis_rules` takes.
    """
    pairs: tuple[tuple[str, MeshAxes], ...] = DEFAULT_LOGICAL_AXIS_RULES

    def __post_init__(self):
        pairs = tuple((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                      for name, axes in self.pairs)
        object.__setattr__(self, "pairs", pairs)
        names = [name for name, _ in pairs]
        for name, axes in pairs:
            if name not in LOGICAL_AXES:
                raise ConfigError(f"mesh.logical_axis_rules: logical axis rule {name!r} names no "
                                  f"logical axis; allowed: {', '.join(LOGICAL_AXES)}")
            unknown = [a for a in _as_tuple(axes) if a not in MESH_AXES]
            if unknown:
                raise ConfigError(f"mesh.logical_axis_rules: logical axis rule {name!r} maps to "
                                  f"mesh axis {unknown[0]!r}; allowed: {', '.join(MESH_AXES)} "
                                  "or None")
            if names.count(name) > 1:
                raise ConfigError(f"mesh.logical_axis_rules: logical axis {name!r} has "
                                  f"{names.count(name)} rules; give it one")
        missing = [name for name in LOGICAL_AXES if name not in names]
        if missing:
            raise ConfigError(f"mesh.logical_axis_rules: logical axis rules lack "
                              f"{', '.join(missing)}; give each a mesh axis or None")

    def __iter__(self) -> Iterator[tuple[str, MeshAxes]]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def mesh_axes(self, name: str | None) -> MeshAxes:
        """The mesh axes (a name, a tuple or None) that logical axis `name` maps to."""
        return None if name is None else dict(self.pairs)[name]

    @property
    def batch_axes(self) -> MeshAxes:
        """The mesh axes a batch's rows are split over (the `act_batch` rule)."""
        return self.mesh_axes(ACT_BATCH)

    def spec(self, logical: Sequence[str | None]) -> tuple[MeshAxes, ...]:
        """Mesh axes per dimension of an array with these logical axes; ConfigError if one
        mesh axis would split two of its dimensions."""
        out, used = [], {}
        for name in logical:
            axes = self.mesh_axes(name)
            for axis in _as_tuple(axes):
                if axis in used:
                    raise ConfigError(f"mesh.logical_axis_rules: an array with logical axes "
                                      f"{tuple(logical)} would split both {used[axis]!r} and "
                                      f"{name!r} over mesh axis {axis!r}; map one of them "
                                      "elsewhere")
                used[axis] = name
            out.append(axes)
        return tuple(out)
