"""The modern recipe at the size of configs/default.py: same data, tokens per step and steps.

What changes against the default (GPT-2 recipe), each a switch with its own ablation under
configs/ablations/ and its measured effect in docs/ablations.md:

- rotary positions, RMSNorm and no biases (as in most current decoder-only models);
- QK-norm, squared-ReLU MLP, zero-initialised output projections, tanh logit softcap;
- Muon on the hidden matrices (AdamW, as before, on embeddings, norms and the head).

The parameter count stays within 5% of the default's (rotary drops the position table, no
biases drops a few thousand more); `gpt-jax train --config=configs/modern.py` runs it.
"""

from gpt_jax.config import load_preset
from gpt_jax.sweep import apply_overrides

MODERN = {
    "model.position": "rope",
    "model.norm": "rmsnorm",
    "model.use_bias": False,
    "model.qk_norm": True,
    "model.mlp": "relu2",
    "model.zero_init_proj": True,
    "model.logit_softcap": 30.0,
    "optim.optimizer": "muon",
    "optim.muon_lr": 0.01,  # the best of 0.005-0.04 in configs/ablations/muon_lr.py
}


def get_config():
    config = load_preset("default")
    apply_overrides(config, MODERN, "configs/modern.py")
    return config
