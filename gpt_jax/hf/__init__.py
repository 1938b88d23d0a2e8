"""Hugging Face GPT-2 interop: convert checkpoints to and from gpt_jax run directories."""

from gpt_jax.hf.convert import from_hf, load_hf, read_hf_weights, to_hf
from gpt_jax.hf.mapping import ConversionError

__all__ = ["ConversionError", "from_hf", "load_hf", "read_hf_weights", "to_hf"]
