"""Generation from lists of token ids, through the serving engine: `generate` is what
`gpt_jax.load(...).generate`, `gpt-jax sample` and evaluation call.

Each prompt becomes one engine request with `num_samples` choices; sample j of a prompt draws
from `fold_in(fold_in(key(seed), hash(prompt)), j)`, so a prompt's samples do not depend on the
other prompts of the call, and equal the server's `n` choices of that prompt with that seed.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from gpt_jax.errors import SamplingError
from gpt_jax.schema import Section, field
from gpt_jax.serve.engine import Engine, Request, Sampling


@dataclasses.dataclass(frozen=True)
class SampleConfig(Section):
    """The `sample` section: what `gpt-jax sample` and `generate` use when not told."""
    name = "sample"
    max_new_tokens: int = field(200)
    temperature: float = field(0.8)
    top_k: int = field(40)
    top_p: float = field(1.0)
    num_samples: int = field(1)
    seed: int = field(0)
    prompt: str = field("")

    def check(self) -> None:
        self.require(0 < self.top_p <= 1, f"sample.top_p={self.top_p} must be in (0, 1]")


class Generated(NamedTuple):
    """One row per (prompt, sample), prompt-major (row = i * num_samples + j)."""
    prompts: list[list[int]]  # the prompt ids used (after truncation)
    tokens: list[list[int]]  # generated ids, EOS not included
    logprobs: list[list[float]]  # per generated token, under the model (temperature 1)
    finish_reasons: list[str]  # "stop" (EOS) or "length"


def check_sampling_args(*, max_new_tokens: int, num_samples: int) -> None:
    """SamplingError naming the first bad value and what is allowed (the engine checks the
    sampling settings)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise SamplingError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise SamplingError(f"num_samples={num_samples!r} must be an integer >= 1")


def fit_prompts(prompts: Sequence[Sequence[int]], *, vocab_size: int, block_size: int,
                max_new_tokens: int, truncate_prompt: bool) -> list[list[int]]:
    """Check each prompt's ids and length against the context; truncate on the left if asked."""
    if len(prompts) == 0:
        raise SamplingError("prompts is empty; pass at least one prompt")
    room = block_size - max_new_tokens
    if room < 1:
        raise SamplingError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                            f"context of block_size={block_size}; use at most {block_size - 1}")
    fitted = []
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise SamplingError(f"prompt {i} is empty; start it with a BOS token")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise SamplingError(f"prompt {i} has token id {bad[0]} outside the model's "
                                f"vocabulary [0, {vocab_size})")
        if len(prompt) > room and not truncate_prompt:
            what = ("is longer than the context" if len(prompt) > block_size else
                    f"plus max_new_tokens={max_new_tokens} overflows the context")
            raise SamplingError(f"prompt {i} has {len(prompt)} tokens, which {what} "
                                f"(block_size={block_size}); allowed: at most {room} prompt "
                                "tokens with this max_new_tokens, or truncate_prompt=True to "
                                "keep the last ones")
        fitted.append(prompt[-room:])
    return fitted


def generate(engine: Engine, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_samples: int = 1, seed: int = 0, stop_at_eos: bool = True,
             truncate_prompt: bool = False) -> Generated:
    """`num_samples` continuations of each prompt (lists of token ids), run to the end on
    `engine` (continuous batching when the rows outnumber its slots)."""
    check_sampling_args(max_new_tokens=max_new_tokens, num_samples=num_samples)
    prompts = fit_prompts(prompts, vocab_size=engine.cfg.vocab_size,
                          block_size=engine.cfg.block_size, max_new_tokens=max_new_tokens,
                          truncate_prompt=truncate_prompt)
    sampling = Sampling(float(temperature), int(top_k), float(top_p), int(seed))
    handles = engine.generate([Request(p, max_new_tokens, sampling, n=num_samples,
                                       ignore_eos=not stop_at_eos) for p in prompts])
    choices = [(p, c) for p, h in zip(prompts, handles) for c in h.choices]
    return Generated([p for p, _ in choices], [c.tokens for _, c in choices],
                     [c.logprobs for _, c in choices], [c.finish_reason for _, c in choices])
