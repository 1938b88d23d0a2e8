"""gpt_jax: a functional JAX/Flax GPT for pre-training, fine-tuning and sampling.

    import gpt_jax
    model = gpt_jax.load("runs/demo")             # config, params, tokenizer of a run
    print(model.generate(["def main("], max_new_tokens=50)[0])

Names are imported lazily so that `gpt-jax --help` and the launchers start instantly.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load": "gpt_jax.api",
    "LoadedModel": "gpt_jax.api",
    "GPT": "gpt_jax.model",
    "ModelConfig": "gpt_jax.model",
    "KVCache": "gpt_jax.model",
    "init_kv_cache": "gpt_jax.model",
    "base_config": "gpt_jax.config",
    "load_preset": "gpt_jax.config",
    "validate": "gpt_jax.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return getattr(module, name)
    raise AttributeError(f"module 'gpt_jax' has no attribute {name!r}")
