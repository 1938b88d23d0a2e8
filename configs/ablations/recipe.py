"""Every recipe switch of configs/modern.py at once: the baseline and one variant per switch.

Its members are exactly those of the per-switch files (qk_norm.py, relu2.py, ...): the same base,
overrides and seeds, so one run of this sweep serves all their reports, e.g.
`gpt-jax compare runs/recipe/baseline runs/recipe/qk_norm --out=docs/ablations/qk_norm`.
"""

from configs.ablations import RECIPE_SHORT, RECIPE_SWITCHES
from gpt_jax.sweep import Sweep


def get_sweep() -> Sweep:
    return Sweep(base="default", overrides=RECIPE_SHORT, seeds=[0, 1, 2],
                 variants=[("baseline", {})] + [(name, overrides) for name, (overrides, _)
                                                in RECIPE_SWITCHES.items()],
                 baseline="baseline",
                 description="configs/default.py (300 steps) and each recipe switch alone.")
