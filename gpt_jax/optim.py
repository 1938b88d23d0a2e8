"""The optimizer: AdamW with a decay mask, a learning-rate schedule and global-norm clipping."""

from __future__ import annotations

import jax
import optax

EMBEDDINGS = ("wte", "wpe", "value_embed")


def lr_schedule(optim_config, num_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine / linear / constant / WSD down to lr*min_lr_ratio."""
    o = optim_config
    decay_steps = num_steps if o.decay_steps < 0 else o.decay_steps
    warmup = min(o.warmup_steps, decay_steps)
    end_lr = o.lr * o.min_lr_ratio
    rest = max(decay_steps - warmup, 1)
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(o.lr, rest, alpha=o.min_lr_ratio)
    elif o.schedule == "linear":
        after = optax.linear_schedule(o.lr, end_lr, rest)
    elif o.schedule == "constant":
        after = optax.constant_schedule(o.lr)
    elif o.schedule == "wsd":  # warmup, stable, then a linear decay over the last fraction
        decay = max(int(rest * o.wsd_decay_fraction), 1)
        after = optax.join_schedules([optax.constant_schedule(o.lr),
                                      optax.linear_schedule(o.lr, end_lr, decay)], [rest - decay])
    else:
        raise ValueError(f"optim.schedule={o.schedule!r} is not one of cosine, linear, "
                         "constant, wsd")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), after], [warmup])


def decay_mask(params, decay_embeddings: bool = False):
    """True for the weights that get weight decay: matrices; not biases, norms (or embeddings)."""
    def wants_decay(path, leaf) -> bool:
        names = {getattr(k, "key", None) for k in path}
        if names & set(EMBEDDINGS):
            return decay_embeddings
        return leaf.ndim >= 2 and "kernel" in names
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
    o = optim_config
    adamw = optax.adamw(lr_schedule(o, num_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                        mu_dtype=o.get("mu_dtype") or None, weight_decay=o.weight_decay,
                        mask=lambda p: decay_mask(p, o.decay_embeddings))
    if o.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
    return adamw
