"""GPT-2 1558m (48 layers, 25 heads, width 1600): vocab 50257, context 1024, tied embeddings."""

from gpt_jax.config import base_config


def get_config():
    config = base_config()
    config.model.update(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600,
                        mlp="gelu", norm="layernorm", position="learned", tie_embeddings=True,
                        use_bias=True)
    config.optim.update(lr=6e-4, warmup_steps=700, min_lr_ratio=0.1)
    config.train.update(global_batch_size=512, num_steps=19_073, log_every=10, eval_every=500)
    return config
