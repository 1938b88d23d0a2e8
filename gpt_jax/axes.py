"""Logical axis names, the default rules mapping them onto mesh axes, and the rules check.

Parameters use the plain names, activations the `ACT_*` ones, so that the batch and `EMBED` may
both map to `fsdp` without one constraint naming a mesh axis twice. Plain Python: the config
imports this module without loading JAX.
"""

from __future__ import annotations

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

# Rules of runs saved before these names were dropped; nothing uses them.
RETIRED_AXES = ("batch", "length")


def normalize_rules(rules) -> tuple:
    """Rules as hashable tuples (JSON turns each tuple of mesh axes into a list)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def check_rules(rules) -> None:
    """ValueError unless each logical axis has exactly one rule naming known mesh axes."""
    names = [name for name, _ in rules]
    for name, axes in rules:
        if name not in LOGICAL_AXES:
            raise ValueError(f"logical axis rule {name!r} names no logical axis; allowed: "
                             f"{', '.join(LOGICAL_AXES)}")
        mesh_axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        unknown = [a for a in mesh_axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"logical axis rule {name!r} maps to mesh axis {unknown[0]!r}; "
                             f"allowed: {', '.join(MESH_AXES)} or None")
        if names.count(name) > 1:
            raise ValueError(f"logical axis {name!r} has {names.count(name)} rules; give it one")
    missing = [name for name in LOGICAL_AXES if name not in names]
    if missing:
        raise ValueError(f"logical axis rules lack {', '.join(missing)}; give each a mesh axis "
                         "or None")
