"""GPT-2 350m: 24 layers, 16 heads, width 1024 (see configs/_gpt2.py for the shared shape)."""

from configs._gpt2 import gpt2_config


def get_config():
    return gpt2_config(n_layer=24, n_head=16, n_embd=1024)
