"""Fine-tuning metric: exact-match accuracy of greedy answers to held-out prompts."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gpt_jax.model import ModelConfig
from gpt_jax.sample import sample_tokens


def greedy_answers(model_cfg: ModelConfig, params, tokenizer, prompts: Sequence[str],
                   max_new_tokens: int, mesh=None, rules=None) -> list[str]:
    """Greedy completions (stopping at eos, eos dropped) of each prompt."""
    ids = [list(tokenizer.encode(p)) for p in prompts]
    out = sample_tokens(model_cfg, params, ids, max_new_tokens=max_new_tokens, temperature=0.0,
                        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, mesh=mesh,
                        rules=rules)
    answers = []
    for row, n in zip(out.tokens, out.lengths):
        row = row[:n].tolist()
        answers.append(tokenizer.decode(row[:-1] if row and row[-1] == tokenizer.eos_id else row))
    return answers


def exact_match(model_cfg: ModelConfig, params, tokenizer, pairs, limit: int = 0, mesh=None,
                rules=None) -> dict[str, float]:
    """{"eval_exact_match": fraction of the first `limit` pairs (0: all) whose greedy answer
    equals the response, surrounding whitespace ignored}."""
    pairs = list(pairs[:limit] if limit else pairs)
    longest_prompt = max(len(tokenizer.encode(p.prompt)) for p in pairs)
    longest_answer = max(len(tokenizer.encode(p.response)) for p in pairs) + 1
    room = model_cfg.block_size - longest_prompt
    answers = greedy_answers(model_cfg, params, tokenizer, [p.prompt for p in pairs],
                             max(1, min(longest_answer, room)), mesh, rules)
    hits = [a.strip() == p.response.strip() for a, p in zip(answers, pairs)]
    return {"eval_exact_match": float(np.mean(hits))}
