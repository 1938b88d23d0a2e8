"""The main job: a small GPT on the built-in corpus (this Python's standard library source).

Sized to train on a 2-core CPU in under 10 minutes, compilation included (see BENCHMARKS.md).
"""

from gpt_jax.config import base_config


def get_config():
    config = base_config()
    config.model.update(vocab_size=4096, block_size=128, n_layer=4, n_head=6, n_embd=192)
    config.data.update(source="python_stdlib", tokenizer="sentencepiece")
    # 18 x 16 validation windows of 128 tokens: the split has 296 (Python 3.11's stdlib), so
    # none repeats and nothing is cut (asking for more evaluates 18 batches, with a notice).
    config.train.update(global_batch_size=16, num_steps=1200, log_every=50, eval_every=200,
                        eval_batches=18)
    config.optim.update(lr=2e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1)
    config.checkpoint.update(every=200, keep=3)
    return config
