"""Evaluation of a run's params: validation loss, perplexity, bits per byte, SFT exact match.

`evaluate(...)` is what the training loop logs at each `train.eval_every` and what
`gpt-jax eval` prints; fine-tuning runs (SFT data) also answer held-out prompts greedily.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np

from gpt_jax.config import Config
from gpt_jax.data.loader import Dataset
from gpt_jax.data.sft import SFTDataset
from gpt_jax.model import ModelConfig
from gpt_jax.sample import generate
from gpt_jax.serve.engine import Engine
from gpt_jax.step import Trainer


def to_global(host_batch: dict, batch_sharding) -> dict:
    """This process's rows -> global arrays sharded over the mesh's batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in host_batch.items()}


def evaluate(trainer: Trainer, eval_step, params, val_data: Dataset, config: Config) -> dict:
    """Mean token loss and perplexity over the fixed validation batches."""
    t = config.train
    loss_sum, count = 0.0, 0.0
    for host_batch in val_data.eval_batches(t.eval_batches, t.global_batch_size,
                                            config.model.block_size, jax.process_index(),
                                            jax.process_count()):
        batch = to_global(host_batch, trainer.batch_sharding)
        s, c = jax.device_get(eval_step(params, batch))
        loss_sum, count = loss_sum + float(s), count + float(c)
    loss = loss_sum / max(count, 1.0)
    result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    if val_data.bytes_per_token:
        result["eval_bits_per_byte"] = loss / math.log(2) / val_data.bytes_per_token
    if isinstance(val_data, SFTDataset) and config.data.sft_exact_match > 0:
        result.update(exact_match(trainer.model_cfg, params, val_data.tokenizer,
                                  val_data.answer_pairs(config.data.sft_exact_match),
                                  trainer.mesh, trainer.rules))
    return result


_ENGINES: dict[tuple, Engine] = {}  # one per model and mesh: its cache is made once per run


def greedy_answers(model_cfg: ModelConfig, params, tokenizer, prompts: Sequence[list[int]],
                   max_new_tokens: int, mesh=None, rules=None) -> list[str]:
    """Greedy completions (stopping at eos) of each prompt's ids, through the engine."""
    key = (model_cfg, None if mesh is None else id(mesh), rules, tokenizer.fingerprint)
    if key not in _ENGINES:
        _ENGINES.clear()
        _ENGINES[key] = Engine(model_cfg, params, tokenizer, mesh=mesh, rules=rules)
    engine = _ENGINES[key]
    engine.params = params
    out = generate(engine, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    return [tokenizer.decode(tokens) for tokens in out.tokens]


def exact_match(model_cfg: ModelConfig, params, tokenizer, pairs: Sequence[tuple[list[int], str]],
                mesh=None, rules=None) -> dict[str, float]:
    """{"eval_exact_match": fraction of (prompt ids, response) pairs whose greedy answer
    equals the response, surrounding whitespace ignored}."""
    longest_prompt = max(len(p) for p, _ in pairs)
    longest_answer = max(len(tokenizer.encode(r)) for _, r in pairs) + 1
    room = model_cfg.block_size - longest_prompt
    answers = greedy_answers(model_cfg, params, tokenizer, [p for p, _ in pairs],
                             max(1, min(longest_answer, room)), mesh, rules)
    hits = [a.strip() == r.strip() for a, (_, r) in zip(answers, pairs)]
    return {"eval_exact_match": float(np.mean(hits))}
