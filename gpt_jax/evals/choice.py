"""Multiple-choice scoring: the ending with the highest log-likelihood after the context wins.

`acc` picks the ending with the highest summed log-probability of its tokens, `acc_norm` the
one with the highest mean per-token log-probability (the lowest mean loss, as llm.c scores
HellaSwag). Each ending is tokenized with its separator in front (" " by default), the way
GPT-2's BPE sees a word that follows a space.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from gpt_jax.errors import EvalError
from gpt_jax.evals.scoring import Request, Score, loglikelihoods
from gpt_jax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class Example:
    context: str
    endings: tuple[str, ...]
    label: int
    source: str = ""  # "file:line" (for error messages)
    separator: str = " "  # put in front of each ending before tokenizing


def requests_for(example: Example, tokenizer, block_size: int) -> list[Request]:
    """One request per ending; an empty context starts from the tokenizer's BOS token."""
    context = list(tokenizer.encode(example.context)) if example.context else []
    context = context or [int(tokenizer.bos_id)]
    out = []
    for j, ending in enumerate(example.endings):
        ids = list(tokenizer.encode(example.separator + ending))
        where = example.source or "an example"
        if not ids:
            raise EvalError(f"{where}: ending {j} is empty after tokenizing; every ending needs "
                            "at least one token")
        if len(ids) > block_size:
            raise EvalError(f"{where}: ending {j} has {len(ids)} tokens, longer than the "
                            f"model's context (block_size={block_size}); it cannot be scored")
        out.append(Request(context, ids))
    return out


def pick(scores: Sequence[Score]) -> tuple[int, int]:
    """(argmax of the summed log-prob, argmax of the mean log-prob); ties go to the first."""
    sums = np.array([s.logprob for s in scores])
    means = sums / np.array([s.tokens for s in scores])
    return int(np.argmax(sums)), int(np.argmax(means))


def score_examples(model_cfg: ModelConfig, params, tokenizer, examples: Sequence[Example], *,
                   batch_rows: int = 32, mesh: Mesh | None = None, rules=None) -> dict:
    """{"acc", "acc_norm", "n", "predictions": [(acc pick, acc_norm pick)],
    "logprobs": [[sum per ending]], "tokens": [[tokens per ending]]}."""
    if not examples:
        raise EvalError("no examples to score")
    requests, owners = [], []
    for i, example in enumerate(examples):
        for request in requests_for(example, tokenizer, model_cfg.block_size):
            requests.append(request)
            owners.append(i)
    scores = loglikelihoods(model_cfg, params, requests, batch_rows=batch_rows, mesh=mesh,
                            rules=rules)
    per_example: list[list[Score]] = [[] for _ in examples]
    for i, score in zip(owners, scores):
        per_example[i].append(score)
    picks = [pick(s) for s in per_example]
    labels = np.array([e.label for e in examples])
    return {"acc": float(np.mean([p[0] for p in picks] == labels)),
            "acc_norm": float(np.mean([p[1] for p in picks] == labels)),
            "n": len(examples), "predictions": picks,
            "logprobs": [[s.logprob for s in ss] for ss in per_example],
            "tokens": [[s.tokens for s in ss] for ss in per_example]}
