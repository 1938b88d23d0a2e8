"""The optimizer: AdamW (or Muon on the hidden matrices, AdamW on the rest) with a decay mask,
a learning-rate schedule and global-norm clipping; `OptimConfig.build` makes both, once."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.contrib._muon import scale_by_shape  # not re-exported by optax.contrib (0.2.8)

from gpt_jax.model import DTYPES
from gpt_jax.schema import Section, field

EMBEDDINGS = ("wte", "wpe", "value_embed")
# Matrices that Muon leaves to AdamW: the embedding tables and an untied LM head.
NOT_MUON = EMBEDDINGS + ("lm_head",)
STACKED_BLOCKS = "h"  # the scan_layers blocks: every leaf has a leading [L] layer axis
SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")


class Optimizer(NamedTuple):
    tx: optax.GradientTransformation
    schedule: optax.Schedule  # AdamW's learning rate at each step (what the loop logs)


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
    name = "optim"
    lr: float = field(1e-3)
    schedule: str = field("cosine")  # one of SCHEDULES
    warmup_steps: int = field(100)
    decay_steps: int = field(-1)  # -1: train.num_steps
    min_lr_ratio: float = field(0.1)
    wsd_decay_fraction: float = field(0.2)
    b1: float = field(0.9)
    b2: float = field(0.95)
    eps: float = field(1e-8)
    weight_decay: float = field(0.1)
    decay_embeddings: bool = field(False)
    clip_norm: float = field(1.0)  # 0 disables clipping
    mu_dtype: str = field("", resume=True)  # AdamW's first moment: "" = the param dtype
    optimizer: str = field("adamw", resume=True)  # "muon": Muon on the attention/MLP kernels
    muon_lr: float = field(0.02)  # Muon's peak lr; its schedule has the shape of lr's
    muon_momentum: float = field(0.95)  # Muon's momentum (EMA) coefficient
    muon_nesterov: bool = field(True)  # Nesterov momentum for Muon
    muon_weight_decay: float = field(0.0)  # decoupled weight decay of Muon's matrices (x lr)

    def check(self) -> None:
        self.require(self.lr > 0, f"optim.lr={self.lr!r} must be > 0")
        self.one_of("schedule", SCHEDULES)
        self.require(self.warmup_steps >= 0,
                     f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        self.require(self.clip_norm >= 0,
                     f"optim.clip_norm={self.clip_norm} must be >= 0 (0 disables)")
        self.one_of("optimizer", OPTIMIZERS)
        self.require(self.muon_lr > 0, f"optim.muon_lr={self.muon_lr!r} must be > 0")
        self.require(0 <= self.muon_momentum < 1,
                     f"optim.muon_momentum={self.muon_momentum!r} must be in [0, 1)")
        self.require(self.mu_dtype in ("",) + DTYPES, f"optim.mu_dtype={self.mu_dtype!r} is "
                     f"not one of '' (the param dtype), {', '.join(DTYPES)}")

    def build(self, num_steps: int) -> Optimizer:
        """The optimizer and its learning-rate schedule for a run of `num_steps` steps."""
        schedule = lr_schedule(self, num_steps)
        tx = optax.adamw(schedule, b1=self.b1, b2=self.b2, eps=self.eps,
                         mu_dtype=self.mu_dtype or None, weight_decay=self.weight_decay,
                         mask=lambda p: decay_mask(p, self.decay_embeddings))
        if self.optimizer == "muon":
            tx = optax.multi_transform({"muon": muon(self, num_steps), "adamw": tx},
                                       muon_labels)
        if self.clip_norm > 0:
            tx = optax.chain(optax.clip_by_global_norm(self.clip_norm), tx)
        return Optimizer(tx, schedule)


def lr_schedule(o: OptimConfig, num_steps: int, peak_lr: float | None = None) -> optax.Schedule:
    """Linear warmup to `peak_lr` (default `lr`), then cosine / linear / constant / WSD down to
    peak_lr*min_lr_ratio."""
    lr = o.lr if peak_lr is None else peak_lr
    decay_steps = num_steps if o.decay_steps < 0 else o.decay_steps
    warmup = min(o.warmup_steps, decay_steps)
    end_lr = lr * o.min_lr_ratio
    rest = max(decay_steps - warmup, 1)
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=o.min_lr_ratio)
    elif o.schedule == "linear":
        after = optax.linear_schedule(lr, end_lr, rest)
    elif o.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:  # wsd: warmup, stable, then a linear decay over the last fraction
        decay = max(int(rest * o.wsd_decay_fraction), 1)
        after = optax.join_schedules([optax.constant_schedule(lr),
                                      optax.linear_schedule(lr, end_lr, decay)], [rest - decay])
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _names(path) -> set:
    return {getattr(k, "key", None) for k in path}


def decay_mask(params, decay_embeddings: bool = False):
    """True for the weights that get weight decay: matrices; not biases, norms (or embeddings)."""
    def wants_decay(path, leaf) -> bool:
        names = _names(path)
        if names & set(EMBEDDINGS):
            return decay_embeddings
        return leaf.ndim >= 2 and "kernel" in names
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def muon_labels(params):
    """"muon" for the hidden matrices (attention and MLP kernels), "adamw" for the rest."""
    def label(path, leaf) -> str:
        names = _names(path)
        hidden = leaf.ndim >= 2 and "kernel" in names and not names & set(NOT_MUON)
        return "muon" if hidden else "adamw"
    return jax.tree_util.tree_map_with_path(label, params)


def muon_dimension_numbers(params):
    """Each Muon leaf as a batch of [fan_in, fan_out] matrices, orthogonalised one by one.

    A stacked block's leading layer axis is a batch axis (one matrix per layer). The fused qkv
    kernel [D, 3, H, K] is one [D, 3HK] matrix; every other kernel contracts all but its last
    axis (attention's output [H, K, D] is [HK, D]; the MLP's are plain [in, out]).
    """
    def dims(path, leaf) -> MuonDimensionNumbers:
        names = _names(path)
        first = 1 if STACKED_BLOCKS in names else 0
        if "qkv" in names:
            return MuonDimensionNumbers(first, tuple(range(first + 1, leaf.ndim)))
        return MuonDimensionNumbers(tuple(range(first, leaf.ndim - 1)), leaf.ndim - 1)
    return jax.tree_util.tree_map_with_path(dims, params)


def muon(o: OptimConfig, num_steps: int) -> optax.GradientTransformation:
    """Muon on the matrices `muon_labels` picks: (Nesterov) momentum, 5 quintic Newton-Schulz
    iterations (in the gradients' dtype: float32 for float32 params), scaled by
    sqrt(max(1, fan_out/fan_in)), decoupled weight decay (muon_weight_decay),
    times the schedule peaking at `muon_lr` (optax.contrib's scale_by_muon/scale_by_shape)."""
    return optax.chain(
        scale_by_muon(beta=o.muon_momentum, nesterov=o.muon_nesterov,
                      mu_dtype=o.mu_dtype or None,
                      weight_dimension_numbers=muon_dimension_numbers),
        scale_by_shape(weight_dimension_numbers=muon_dimension_numbers),
        optax.add_decayed_weights(o.muon_weight_decay),
        optax.scale_by_learning_rate(lr_schedule(o, num_steps, peak_lr=o.muon_lr)))
