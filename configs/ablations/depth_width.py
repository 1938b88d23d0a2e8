"""Deep and narrow vs shallow and wide at (nearly) matched parameter count.

Counted with gpt_jax.flops.count_params at vocab 259, context 128 (CPU_SMALL):
  deep_narrow   8 layers x width  92 (2 heads of 46): 857,900 parameters
  shallow_wide  2 layers x width 180 (4 heads of 45): 852,300 parameters
(CPU_SMALL's own 4 x 128 has 842,880.)
"""

from configs.ablations import CPU_SMALL
from gpt_jax.sweep import Sweep


def get_sweep() -> Sweep:
    return Sweep(base="default", overrides=CPU_SMALL, seeds=[0, 1, 2],
                 variants=[("deep_narrow", {"model.n_layer": 8, "model.n_embd": 92,
                                            "model.n_head": 2}),
                           ("shallow_wide", {"model.n_layer": 2, "model.n_embd": 180,
                                             "model.n_head": 4})],
                 description="8 layers x width 92 vs 2 layers x width 180, ~855k parameters.")
