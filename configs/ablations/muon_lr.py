"""Muon's peak learning rate (the hidden matrices; AdamW keeps optim.lr): four rates 2x apart."""

from configs.ablations import RECIPE_SHORT
from gpt_jax.sweep import Sweep, grid


def get_sweep() -> Sweep:
    return Sweep(base="default", overrides={**RECIPE_SHORT, "optim.optimizer": "muon"},
                 seeds=[0, 1, 2], variants=grid({"optim.muon_lr": [0.005, 0.01, 0.02, 0.04]}),
                 baseline="muon_lr=0.02",
                 description="Muon peak learning rate 0.005, 0.01, 0.02, 0.04 on "
                             "configs/default.py (300 steps).")
