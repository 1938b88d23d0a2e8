"""Multiple-choice scoring: the ending with the highest log-likelihood after the context wins.

One scoring pass gives four accuracies, each under the name its convention uses:

| metric | picks the ending with the highest | convention of |
|---|---|---|
| `acc` | summed log-probability of its tokens | everyone |
| `acc_norm` | summed log-probability / its length in characters | lm-evaluation-harness |
| `acc_bytes` | summed log-probability / its length in UTF-8 bytes | lm-evaluation-harness |
| `acc_per_token` | mean log-probability per token | llm.c (its "acc_norm") |

Lengths are of the ending as written (without the separator), as lm-eval measures them. Each
ending is tokenized with its separator in front (" " by default), the way GPT-2's BPE sees a
word that follows a space. Runs logged before `acc_per_token` existed called it `acc_norm`
(see `upgrade`).
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


METRICS = ("acc", "acc_norm", "acc_bytes", "acc_per_token")


def pick(scores: Sequence[Score], endings: Sequence[str]) -> dict[str, int]:
    """Each metric's chosen ending (ties go to the first)."""
    sums = np.array([s.logprob for s in scores])
    per = {"acc": 1.0, "acc_norm": np.array([max(len(e), 1) for e in endings], float),
           "acc_bytes": np.array([max(len(e.encode("utf-8")), 1) for e in endings], float),
           "acc_per_token": np.array([s.tokens for s in scores], float)}
    return {m: int(np.argmax(sums / per[m])) for m in METRICS}


def upgrade(result: dict) -> dict:
    """A result (or metric events' task dict) written before `acc_per_token` existed, when
    `acc_norm` meant the per-token mean, under today's names; a current one as it is."""
    if "acc_norm" in result and "acc_per_token" not in result:
        result = dict(result)
        result["acc_per_token"] = result.pop("acc_norm")
    return result


def score_examples(model_cfg: ModelConfig, params, tokenizer, examples: Sequence[Example], *,
                   batch_rows: int = 32, mesh: Mesh | None = None, rules=None) -> dict:
    """{each of METRICS: accuracy, "n", "predictions": [{metric: pick}],
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
    picks = [pick(s, e.endings) for s, e in zip(per_example, examples)]
    labels = np.array([e.label for e in examples])
    return {**{m: float(np.mean(np.array([p[m] for p in picks]) == labels)) for m in METRICS},
            "n": len(examples), "predictions": picks,
            "logprobs": [[s.logprob for s in ss] for ss in per_example],
            "tokens": [[s.tokens for s in ss] for ss in per_example]}
