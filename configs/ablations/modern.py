"""The headline comparison: configs/default.py vs configs/modern.py, full length, 3 seeds.

The only change to either config is an eval every 50 steps instead of 200 (evaluation does not
touch the training batches or RNG), so that steps- and time-to-target are resolved finely.
"""

from configs.modern import MODERN
from gpt_jax.sweep import Sweep


def get_sweep() -> Sweep:
    return Sweep(base="default", overrides={"train.eval_every": 50}, seeds=[0, 1, 2],
                 variants=[("default", {}), ("modern", MODERN)], baseline="default",
                 description="The GPT-2 recipe (configs/default.py) vs the modern recipe "
                             "(configs/modern.py) at the same size, tokens per step and steps.")
