"""A published measured run: a JAX port of the modded-nanogpt speedrun on a v6e-8
(github.com/nikolageorgiev2000/modded-nanogpt-jax, run log records/sub10m.txt at 0316a10).

From the log's embedded code: 12 layers, width 1024, 4 heads of 256, vocab 50,304, squared-ReLU
MLP 4x, RoPE, QK RMS-norm, logit softcap 15, untied head, bf16 params and compute, Muon on the
block matrices, `jax.nn.dot_product_attention(..., is_causal=True)` (XLA's attention, not
splash), pure data parallelism over 8 chips, 524,288 tokens per step in microbatches of 16
sequences. Measured (the log's timestamps, the context-2048 phase): 4.23 s per 10 steps,
154,800 tokens/s per chip. Left out here: its U-Net skip weights and value residual (small
vector work).
"""

from gpt_jax.config import base_config

MEASURED_TOKENS_PER_S_PER_CHIP = {"v6e-8": 154_800}


def get_config():
    config = base_config()
    config.model.update(vocab_size=50_304, block_size=2048, n_layer=12, n_head=4, n_embd=1024,
                        mlp="relu2", mlp_ratio=4.0, norm="rmsnorm", position="rope",
                        qk_norm=True, logit_softcap=15.0, tie_embeddings=False, use_bias=False,
                        dtype="bfloat16", param_dtype="bfloat16", attention_impl="xla",
                        scan_layers=True, remat_policy="none")
    config.optim.update(optimizer="muon")
    config.train.update(global_batch_size=256, microbatches=16)
    config.mesh.update(data=8, fsdp=1, tensor=1)
    return config
