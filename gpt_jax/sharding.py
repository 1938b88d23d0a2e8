"""The `mesh` section, the device mesh it builds, and logical axes -> NamedShardings."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_jax import model as model_lib
from gpt_jax.axes import DEFAULT_LOGICAL_AXIS_RULES, MESH_AXES, LogicalRules
from gpt_jax.errors import ConfigError
from gpt_jax.schema import Section, field


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """The `mesh` section: (data, fsdp, tensor) sizes, one of them -1 ("the devices the others
    leave"), and the logical axis rules, normalised and checked once into `rules`."""
    name = "mesh"
    data: int = field(-1)
    fsdp: int = field(1)
    tensor: int = field(1)
    logical_axis_rules: tuple = field(DEFAULT_LOGICAL_AXIS_RULES)

    def check(self) -> None:
        rules = LogicalRules(self.logical_axis_rules)
        object.__setattr__(self, "logical_axis_rules", rules.pairs)
        object.__setattr__(self, "_rules", rules)
        sizes = self.sizes
        self.require(all(s == -1 or s >= 1 for s in sizes),
                     f"mesh ({self._spec()}): sizes must be >= 1 or -1")
        self.require(sizes.count(-1) <= 1, f"mesh ({self._spec()}): at most one axis may be -1")

    @property
    def rules(self) -> LogicalRules:
        return self._rules

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def _spec(self) -> str:
        return ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, self.sizes))

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) with the one -1 replaced by the devices left over."""
        sizes = list(self.sizes)
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(f"mesh ({self._spec()}) does not divide the {num_devices} "
                                  "devices")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(f"mesh ({self._spec()}) has {math.prod(sizes)} devices but "
                              f"{num_devices} are available")
        return tuple(sizes)

    def make(self, devices: list | None = None) -> Mesh:
        """The (data, fsdp, tensor) mesh over `devices` (default: all)."""
        devices = jax.devices() if devices is None else devices
        shape = self.shape(len(devices))
        if devices == jax.devices():
            return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                    axis_types=(AxisType.Auto,) * len(shape))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules):
    """The context in which the model's logical constraints resolve against `mesh`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield


def named(mesh: Mesh, rules: LogicalRules, logical: tuple[str | None, ...],
          shape: tuple[int, ...] | None = None) -> NamedSharding:
    """The NamedSharding of an array with these logical axes. With its `shape`, a dimension
    its mesh axes do not divide (e.g. GPT-2's vocab of 50257 over tensor=2) stays whole rather
    than failing: uneven shards are not allowed for parameters."""
    spec = rules.spec(logical)
    if shape is not None:
        spec = tuple(_divisible(axes, dim, mesh) for axes, dim in zip(spec, shape))
    return NamedSharding(mesh, P(*spec))


def _divisible(axes, dim: int, mesh: Mesh):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = math.prod(mesh.shape[a] for a in names)
    if dim % ways:
        logging.log_first_n(logging.WARNING, "a dimension of size %d does not divide over "
                            "mesh axes %s (%d ways); it is replicated", 8, dim, names, ways)
        return None
    return axes


def boxed_shardings(boxed_tree, mesh: Mesh, rules: LogicalRules):
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (plain leaves: replicated)."""
    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            value = leaf.value
            return named(mesh, rules, tuple(leaf.names) + (None,) * (value.ndim - len(leaf.names)),
                         value.shape)
        return NamedSharding(mesh, P())
    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(model_cfg: model_lib.ModelConfig, mesh: Mesh, rules: LogicalRules):
    """Shardings of the params of a GPT of `model_cfg`, from shapes only (nothing allocated)."""
    return boxed_shardings(model_lib.abstract_boxed_params(model_cfg), mesh, rules)


DEFAULT_RULES = LogicalRules()


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Rows of a [batch, length] array split as `act_batch` says, columns whole."""
    return NamedSharding(mesh, P(rules.batch_axes, None))


def batch_shards(mesh: Mesh | None, rules: LogicalRules | None) -> int:
    """How many ways the batch axis is split (1 without a mesh)."""
    if mesh is None or rules is None:
        return 1
    axes = rules.batch_axes
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_like(tree, shardings):
    """Place an existing (host or single-device) pytree onto the given shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)
