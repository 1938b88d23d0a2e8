"""The shape every GPT-2 preset shares; each configs/gpt2_*.py only names its size."""

from gpt_jax.config import base_config


def gpt2_config(n_layer: int, n_head: int, n_embd: int):
    """GPT-2: vocab 50257, context 1024, learned positions, pre-LayerNorm, tanh GELU, biases,
    tied embeddings; trained like the paper's setting reproduced by nanoGPT (~10B tokens)."""
    config = base_config()
    config.model.update(vocab_size=50257, block_size=1024, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, mlp="gelu", norm="layernorm", position="learned",
                        tie_embeddings=True, use_bias=True)
    config.optim.update(lr=6e-4, warmup_steps=700, min_lr_ratio=0.1)
    config.train.update(global_batch_size=512, num_steps=19_073, log_every=10, eval_every=500)
    return config
