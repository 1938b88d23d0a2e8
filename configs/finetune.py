"""Supervised fine-tuning of a run (or a converted GPT-2) on prompt/response JSONL pairs.

    gpt-jax train --config=configs/finetune.py --workdir=runs/sft \\
      --config.train.init_from=runs/gpt2 --config.data.paths=train.jsonl \\
      --config.data.sft_eval_paths=heldout.jsonl

The model architecture and tokenizer follow `train.init_from` (see `gpt_jax.train`); the loss
counts response tokens only; each eval reports the response-token loss and the exact-match
accuracy of greedy answers to (up to `data.sft_exact_match`) held-out pairs.
"""

from gpt_jax.config import base_config


def get_config():
    config = base_config()
    # Defaults: the pairs examples/sft_docstring_names.py writes (override with your own).
    config.data.update(source="sft_jsonl", paths="runs/sft_data/train.jsonl",
                       sft_eval_paths="runs/sft_data/heldout.jsonl", sft_exact_match=64)
    config.train.update(global_batch_size=16, num_steps=300, log_every=25, eval_every=100,
                        eval_batches=50)  # SFT evals stop early once every pair is seen
    # A fine-tune starts from trained weights: a 10x lower peak lr, a short warmup, a gentle
    # decay, no weight decay on what pre-training learned to rely on.
    config.optim.update(lr=1e-4, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1,
                        weight_decay=0.0, clip_norm=1.0)
    config.checkpoint.update(every=100, keep=2)
    return config
