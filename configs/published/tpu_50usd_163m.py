"""A published measured run: the 163.6M GPT of "LLM pretraining on TPU v6e with a $50 budget"
(https://vorushin.github.io/blog/llm-pretraining-tpu-v6e-50usd, 2026-02), one chip, raw JAX.

Stated there: 8 layers, width 1024, 4 query heads and 1 key/value head of 256, SwiGLU 3072,
vocab 32,768, context 2048, batch 64 as 16 microbatches of 4, RoPE, RMSNorm, QK-norm, a logit
softcap, untied head, bf16 compute, splash attention, AdamW. Measured: 433,606 tokens/s on one
v6e chip, 148,829 on one v5e chip. Not stated, so assumed here: float32 params, no remat, no
biases, the softcap's value.
"""

from gpt_jax.config import base_config

MEASURED_TOKENS_PER_S_PER_CHIP = {"v6e-1": 433_606, "v5e-1": 148_829}


def get_config():
    config = base_config()
    config.model.update(vocab_size=32_768, block_size=2048, n_layer=8, n_head=4, n_kv_head=1,
                        n_embd=1024, mlp="swiglu", mlp_ratio=3.0, norm="rmsnorm",
                        position="rope", qk_norm=True, logit_softcap=30.0,
                        tie_embeddings=False, use_bias=False, dtype="bfloat16",
                        param_dtype="float32", attention_impl="splash", scan_layers=True,
                        remat_policy="none")
    config.train.update(global_batch_size=64, microbatches=16)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config
