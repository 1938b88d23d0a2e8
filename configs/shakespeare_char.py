"""nanoGPT's CPU shakespeare-char settings: a 4-layer, 4-head, 128-wide char model, context 64.

Data: TFDS `tiny_shakespeare` (text field "text"); any local text file with
`--config.data.source=text_files --config.data.paths=input.txt`.
"""

from gpt_jax.config import base_config


def get_config():
    config = base_config()
    config.model.update(vocab_size=128, block_size=64, n_layer=4, n_head=4, n_embd=128,
                        dropout=0.0, tie_embeddings=True)
    config.data.update(source="tfds", tfds_name="tiny_shakespeare", text_field="text",
                       train_split="train", eval_split="validation", tokenizer="char")
    config.train.update(global_batch_size=12, num_steps=2000, log_every=25, eval_every=250,
                        eval_batches=20)
    # nanoGPT: lr 1e-3 decaying (cosine) over 2000 iters to 1e-4, no warmup, AdamW b2=0.99.
    config.optim.update(lr=1e-3, schedule="cosine", warmup_steps=0, decay_steps=2000,
                        min_lr_ratio=0.1, b2=0.99, weight_decay=0.1)
    config.checkpoint.update(every=500)
    return config
