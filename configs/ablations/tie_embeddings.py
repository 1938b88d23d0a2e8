"""Input embedding shared with the output (LM head) vs a separate output matrix."""

from configs.ablations import CPU_SMALL
from gpt_jax.sweep import Sweep


def get_sweep() -> Sweep:
    return Sweep(base="default", overrides=CPU_SMALL, seeds=[0, 1, 2],
                 variants=[("tied", {"model.tie_embeddings": True}),
                           ("untied", {"model.tie_embeddings": False})],
                 description="Tied vs untied input/output embeddings (untied: +33,152 "
                             "parameters at vocab 259, width 128).")
