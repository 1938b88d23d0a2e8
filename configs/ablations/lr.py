"""Peak learning rate: three rates a factor ~3 apart (cosine schedule, 30 warmup steps)."""

from configs.ablations import CPU_SMALL
from gpt_jax.sweep import Sweep, grid


def get_sweep() -> Sweep:
    return Sweep(base="default", overrides=CPU_SMALL, seeds=[0, 1, 2],
                 variants=grid({"optim.lr": [3e-4, 1e-3, 3e-3]}), baseline="lr=0.001",
                 description="Peak learning rate 3e-4 vs 1e-3 vs 3e-3.")
