"""GPT-2 1558m: 48 layers, 25 heads, width 1600 (see configs/_gpt2.py for the shared shape)."""

from configs._gpt2 import gpt2_config


def get_config():
    return gpt2_config(n_layer=48, n_head=25, n_embd=1600)
