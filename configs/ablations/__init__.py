"""Ablation files: each `get_sweep()` returns a `gpt_jax.sweep.Sweep` (see docs/ablations.md).

`CPU_SMALL` is the run every shipped ablation starts from: a 0.84M-parameter byte-level GPT on
the built-in corpus, sized so that one member trains in a few minutes on two CPU cores. It sets
every field that configs/default.py sets, so that tuning the default does not change an
ablation. For a stronger result on an accelerator, scale it up with
`gpt-jax sweep --set=key=value` (the matched-parameter ablations, `mlp` and `depth_width`, then
need their shapes re-matched).
"""

CPU_SMALL = {
    "data.source": "python_stdlib",
    "data.tokenizer": "byte",
    "model.vocab_size": 259,  # what the byte tokenizer has (256 bytes + pad, bos, eos)
    "model.block_size": 128,
    "model.n_layer": 4,
    "model.n_head": 4,
    "model.n_embd": 128,
    "train.global_batch_size": 16,
    "train.num_steps": 300,
    "train.log_every": 10,
    "train.eval_every": 50,
    "train.eval_batches": 8,
    "optim.lr": 1e-3,
    "optim.schedule": "cosine",
    "optim.min_lr_ratio": 0.1,
    "optim.warmup_steps": 30,
    "checkpoint.every": 100,
}
