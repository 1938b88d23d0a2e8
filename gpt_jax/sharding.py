"""The device mesh, logical-axis rules -> NamedShardings, and directly-sharded initialisation."""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gpt_jax import model as model_lib
from gpt_jax.axes import (ACT_BATCH, DEFAULT_LOGICAL_AXIS_RULES, MESH_AXES, check_rules,
                          normalize_rules)
from gpt_jax.config import resolve_mesh_shape


def make_mesh(mesh_config, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), -1 meaning 'the rest'."""
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(mesh_config, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(shape))


def logical_rules(config) -> tuple:
    """The config's logical axis rules, normalised and checked (ValueError naming a bad rule)."""
    rules = normalize_rules(config.mesh.logical_axis_rules)
    check_rules(rules)
    return rules


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """The context in which the model's logical constraints resolve against `mesh`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_to_shardings(boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (plain leaves: replicated).

    A dimension that its mesh axes do not divide (e.g. GPT-2's vocab of 50257 over tensor=2)
    stays whole rather than failing: uneven shards are not allowed for parameters.
    """
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    shapes = strip_boxes(boxed_tree)
    return jax.tree.map(lambda sh, x: _divisible(sh, x.shape, mesh), shardings, shapes,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def strip_boxes(tree):
    """The values inside `nn.Partitioned` boxes, without applying any sharding constraint."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _divisible(named: NamedSharding, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    spec = []
    for dim, axes in zip(shape, tuple(named.spec) + (None,) * (len(shape) - len(named.spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        if dim % ways:
            logging.log_first_n(logging.WARNING, "a dimension of size %d does not divide over "
                                "mesh axes %s (%d ways); it is replicated", 8, dim, names, ways)
        spec.append(axes if dim % ways == 0 else None)
    return NamedSharding(mesh, P(*spec))


def batch_axes(rules=DEFAULT_LOGICAL_AXIS_RULES):
    """The mesh axes the `act_batch` rule splits a batch over (a name, a tuple or None)."""
    return dict(normalize_rules(rules))[ACT_BATCH]


def batch_sharding(mesh: Mesh, rules=DEFAULT_LOGICAL_AXIS_RULES) -> NamedSharding:
    """Rows of a [batch, length] array split as `act_batch` says, columns whole."""
    return NamedSharding(mesh, P(batch_axes(rules), None))


def batch_shards(mesh: Mesh | None, rules=DEFAULT_LOGICAL_AXIS_RULES) -> int:
    """How many ways the batch axis is split (1 without a mesh)."""
    if mesh is None:
        return 1
    axes = batch_axes(rules)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(model: model_lib.GPT, mesh: Mesh, rules):
    """Shardings of `model`'s params, derived from shapes only (no parameter is created)."""
    boxed = jax.eval_shape(functools.partial(model_lib.init_boxed_params, model),
                           jax.random.key(0))
    return nn.unbox(logical_to_shardings(boxed, mesh, rules))


def init_params(model: model_lib.GPT, rng: jax.Array, mesh: Mesh, rules):
    """(params, shardings) of `model`, each leaf born sharded: `Trainer.init_state`'s
    initialisation of the params alone."""
    shardings = param_shardings(model, mesh, rules)
    with activate(mesh, rules):
        init = functools.partial(model_lib.init_params, model)
        params = jax.jit(init, out_shardings=shardings)(rng)
    return params, shardings


def shard_like(tree, shardings):
    """Place an existing (host or single-device) pytree onto the given shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)
