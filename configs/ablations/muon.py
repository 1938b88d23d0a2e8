"""One recipe switch against the default config: see RECIPE_SWITCHES["muon"] in __init__.py."""

from configs.ablations import switch_sweep


def get_sweep():
    return switch_sweep("muon")
