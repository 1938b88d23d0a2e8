"""A small GPT that trains on the built-in corpus (the Python standard library) on a CPU."""

from gpt_jax.config import base_config


def get_config():
    return base_config()
