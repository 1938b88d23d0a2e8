"""GPT-2 124m: 12 layers, 12 heads, width 768 (see configs/_gpt2.py for the shared shape)."""

from configs._gpt2 import gpt2_config


def get_config():
    return gpt2_config(n_layer=12, n_head=12, n_embd=768)
