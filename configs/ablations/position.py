"""Learned absolute position embeddings vs rotary (RoPE) positions."""

from configs.ablations import CPU_SMALL
from gpt_jax.sweep import Sweep


def get_sweep() -> Sweep:
    return Sweep(base="default", overrides=CPU_SMALL, seeds=[0, 1, 2],
                 variants=[("learned", {"model.position": "learned"}),
                           ("rope", {"model.position": "rope"})],
                 description="Learned absolute position table vs rotary embeddings (RoPE); "
                             "rope has no position table (16,384 fewer parameters).")
