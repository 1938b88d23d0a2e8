"""A published measured run: MaxText's Llama-3.1-8B recipe on a v6e-8
(github.com/AI-Hypercomputer/tpu-recipes, training/trillium/Llama3.1-8B-MaxText/v6e-8).

Stated there: Llama-3.1-8B (32 layers, width 4096, 32 query and 8 key/value heads of 128,
SwiGLU 14,336, vocab 128,256, untied), context 8192, 3 sequences per chip, pure fsdp, bf16
compute with float32 weights, flash attention. Measured: 7,138.89 tokens/s per chip (3.443 s
per step). Its remat policy offloads the layer input and the q/k/v/out projections to host
memory; this project has no offload, so `full` remat stands in (a step recomputes the whole
forward, where MaxText's recomputes the MLP only: about 6% more matmul work here), and the
loss runs in 8 chunks (the [24576, 128256] float32 logits alone would need 12 GiB per chip).
"""

from gpt_jax.config import base_config

MEASURED_TOKENS_PER_S_PER_CHIP = {"v6e-8": 7_138.89}


def get_config():
    config = base_config()
    config.model.update(vocab_size=128_256, block_size=8192, n_layer=32, n_head=32,
                        n_kv_head=8, n_embd=4096, mlp="swiglu", mlp_ratio=3.5,
                        norm="rmsnorm", position="rope", rope_theta=500_000.0,
                        tie_embeddings=False, use_bias=False, dtype="bfloat16",
                        param_dtype="float32", attention_impl="splash", scan_layers=True,
                        remat_policy="full", loss_chunks=8)
    config.train.update(global_batch_size=24, microbatches=1)
    config.mesh.update(data=1, fsdp=8, tensor=1)
    return config
