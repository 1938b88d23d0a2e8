"""A very small model for tests: every code path, a few milliseconds a step on a CPU."""

from gpt_jax.config import base_config


def get_config():
    config = base_config()
    config.model.update(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)
    config.data.tokenizer = "byte"
    config.train.update(global_batch_size=8, num_steps=20, log_every=5, eval_every=10,
                        eval_batches=2)
    config.optim.update(warmup_steps=2)
    config.checkpoint.update(every=10, keep=2)
    return config
