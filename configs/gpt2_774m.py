"""GPT-2 774m: 36 layers, 20 heads, width 1280 (see configs/_gpt2.py for the shared shape)."""

from configs._gpt2 import gpt2_config


def get_config():
    return gpt2_config(n_layer=36, n_head=20, n_embd=1280)
