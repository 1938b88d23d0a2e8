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

# The recipe switches (configs/modern.py) are ablated one at a time on configs/default.py itself,
# shortened to 300 steps (about 2 minutes a member on two CPU cores) with an eval every 25
# steps, so that steps-to-target is resolved finely. Every switch file shares the "baseline"
# variant, so its members are the same runs in every file (`recipe.py` runs them all at once).
RECIPE_SHORT = {
    "train.num_steps": 300,
    "train.log_every": 25,
    "train.eval_every": 25,
    "optim.warmup_steps": 30,
    "checkpoint.every": 300,
}

# name -> (the one variable it changes, what the report says about it)
RECIPE_SWITCHES = {
    "qk_norm": ({"model.qk_norm": True}, "RMSNorm on queries and keys per head"),
    "relu2": ({"model.mlp": "relu2"}, "squared-ReLU MLP instead of GELU (same shapes)"),
    "zero_init": ({"model.zero_init_proj": True},
                  "attention and MLP output projections initialised to zero"),
    "softcap": ({"model.logit_softcap": 30.0}, "tanh softcap of the head's logits at 30"),
    "gqa": ({"model.n_kv_head": 2},
            "grouped-query attention, 2 key/value heads for 6 query heads (3.8% fewer params)"),
    "muon": ({"optim.optimizer": "muon", "optim.muon_lr": 0.01},
             "Muon (lr 0.01, the best in muon_lr.py) on the hidden matrices, AdamW on the rest"),
}


def switch_sweep(name: str):
    """The ablation of one recipe switch: the default config with and without it, 3 seeds."""
    from gpt_jax.sweep import Sweep  # here: importing configs.ablations stays light
    overrides, what = RECIPE_SWITCHES[name]
    return Sweep(base="default", overrides=RECIPE_SHORT, seeds=[0, 1, 2],
                 variants=[("baseline", {}), (name, overrides)], baseline="baseline",
                 description=f"configs/default.py (300 steps) with and without: {what}.")
