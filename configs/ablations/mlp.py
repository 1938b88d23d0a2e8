"""GELU MLP vs SwiGLU MLP at matched parameter count.

SwiGLU has three matrices instead of two, so its hidden width is 8/3 of the model width instead
of 4x: at width 128 that is 341 vs 512 units, 843,048 vs 842,880 parameters in all.
"""

from configs.ablations import CPU_SMALL
from gpt_jax.sweep import Sweep


def get_sweep() -> Sweep:
    return Sweep(base="default", overrides=CPU_SMALL, seeds=[0, 1, 2],
                 variants=[("gelu", {"model.mlp": "gelu", "model.mlp_ratio": 4.0}),
                           ("swiglu", {"model.mlp": "swiglu", "model.mlp_ratio": 8 / 3})],
                 description="GELU (4x hidden) vs SwiGLU (8/3x hidden), matched parameters.")
