"""LayerNorm vs RMSNorm (everything else as configs/ablations CPU_SMALL)."""

from configs.ablations import CPU_SMALL
from gpt_jax.sweep import Sweep


def get_sweep() -> Sweep:
    return Sweep(base="default", overrides=CPU_SMALL, seeds=[0, 1, 2],
                 variants=[("layernorm", {"model.norm": "layernorm"}),
                           ("rmsnorm", {"model.norm": "rmsnorm"})],
                 description="LayerNorm vs RMSNorm before attention and MLP.")
