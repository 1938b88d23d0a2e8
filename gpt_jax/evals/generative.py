"""Generative tasks: the model writes an answer (greedy, up to a stop string), scored against
references by exact match, token F1, ROUGE-1/2/L (`rouge-score`) and BLEU (`sacrebleu`).

A task file is JSONL of `{"prompt": str, "references": [str, ...]}` (or `"answer": str`),
local or gs://. Options follow the path after `?`, e.g.
`generate:qa.jsonl?shots=3&max_tokens=16&stop=%0A` (URL-encoded; `stop` may repeat):

    shots       few-shot examples before each prompt (0), drawn per example with a fixed seed
                from the other examples of the file (never the example itself)
    max_tokens  new tokens per answer (32)
    stop        where an answer ends ("\\n"); the stop string is not part of the answer
    separator   between few-shot examples ("\\n\\n"); delimiter: between a shot's prompt and
                its answer (" ")

Answers are generated through the serving engine (continuous batching over its slots), the
same path as `gpt-jax serve` and lm-eval's `generate_until`. Exact match and F1 compare
normalised text (lower case, no punctuation, no articles a/an/the, single spaces), the way
SQuAD scores; each metric takes the best reference of an example.
"""

from __future__ import annotations

import dataclasses
import re
import string
import urllib.parse
from collections import Counter
from typing import Sequence

import numpy as np

from gpt_jax.data.files import json_objects
from gpt_jax.errors import EvalError

METRICS = ("exact_match", "f1", "rouge1", "rouge2", "rougeL", "bleu")
ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclasses.dataclass(frozen=True)
class GenExample:
    prompt: str
    references: tuple[str, ...]
    source: str = ""  # "file:line"


@dataclasses.dataclass(frozen=True)
class Options:
    shots: int = 0
    max_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    separator: str = "\n\n"
    delimiter: str = " "
    seed: int = 1234


def parse_options(query: str, allowed: Sequence[str] | None = None) -> Options:
    """Options from `shots=3&stop=%0A...`; EvalError naming an unknown or bad option."""
    fields = {f.name: f for f in dataclasses.fields(Options)}
    allowed = tuple(allowed or fields)
    values: dict = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            raise EvalError(f"task option {name!r} is unknown; allowed: {', '.join(allowed)}")
        if name == "stop":
            values["stop"] = values.get("stop", ()) + ((value,) if value else ())
        elif fields[name].type == "int":
            if not value.lstrip("-").isdigit() or int(value) < (1 if name == "max_tokens" else 0):
                raise EvalError(f"task option {name}={value!r} must be an integer >= "
                                f"{1 if name == 'max_tokens' else 0}")
            values[name] = int(value)
        else:
            values[name] = value
    return Options(**values)


def load(path: str) -> list[GenExample]:
    out = []
    for where, obj in json_objects(path, EvalError):
        prompt = obj.get("prompt")
        refs = obj.get("references", [obj["answer"]] if "answer" in obj else None)
        if not isinstance(prompt, str):
            raise EvalError(f"{where}: needs a 'prompt' string")
        if (not isinstance(refs, list) or not refs
                or not all(isinstance(r, str) and r.strip() for r in refs)):
            raise EvalError(f"{where}: needs 'references' (a non-empty list of non-empty "
                            "strings) or an 'answer' string")
        out.append(GenExample(prompt, tuple(refs), where))
    if not out:
        raise EvalError(f"generate:{path} holds no examples")
    return out


def shots_for(n: int, shots: int, seed: int) -> list[list[int]]:
    """For each of `n` examples, `shots` other examples' indices (deterministic)."""
    if shots and shots >= n:
        raise EvalError(f"shots={shots} needs more than {shots} examples in the file (has {n})")
    out = []
    for i in range(n):
        others = np.random.default_rng([seed, i]).permutation(n - 1)[:shots]
        out.append([int(j) + (j >= i) for j in others])  # skip example i itself
    return out


def prompts(examples: Sequence[GenExample], o: Options) -> list[str]:
    """Each example's prompt after its few-shot examples (the others' prompt and answer)."""
    picks = shots_for(len(examples), o.shots, o.seed)
    return [o.separator.join([examples[j].prompt + o.delimiter + examples[j].references[0]
                              for j in picks[i]] + [e.prompt]) for i, e in enumerate(examples)]


def normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    p, r = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r:
        return float(p == r)
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean per-example metrics (best reference each; BLEU over the corpus, 0-100)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rows = []
    for pred, refs in zip(predictions, references):
        scores = [rouge.score(ref, pred) for ref in refs]
        rows.append({"exact_match": max(float(normalize(pred) == normalize(r)) for r in refs),
                     "f1": max(token_f1(pred, r) for r in refs),
                     **{k: max(s[k].fmeasure for s in scores)
                        for k in ("rouge1", "rouge2", "rougeL")}})
    width = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(list(predictions), streams).score
    return {**{k: float(np.mean([row[k] for row in rows])) for k in METRICS[:-1]},
            "bleu": float(bleu)}


def prompt_ids(tokenizer, examples: Sequence[GenExample], o: Options,
               block_size: int) -> list[list[int]]:
    """Each example's prompt (after its shots) as token ids, the last ones that leave room for
    `o.max_tokens` in the context."""
    room = block_size - o.max_tokens
    if room < 1:
        raise EvalError(f"max_tokens={o.max_tokens} leaves no room for a prompt in the "
                        f"context of {block_size}")
    return [(list(tokenizer.encode(text)) or [int(tokenizer.bos_id)])[-room:]
            for text in prompts(examples, o)]


def evaluate(engine, tokenizer, examples: Sequence[GenExample], o: Options) -> dict:
    """{each of METRICS, "n", "predictions", "answer_tokens"}: greedy answers through
    `engine` (and how many tokens each took, up to and including its stop)."""
    from gpt_jax.serve.engine import Request, Sampling

    requests = [Request(ids, o.max_tokens, Sampling(0.0), stop=o.stop)
                for ids in prompt_ids(tokenizer, examples, o, engine.cfg.block_size)]
    handles = engine.generate(requests)
    answers = [h.choices[0].text for h in handles]
    return {**score(answers, [e.references for e in examples]), "n": len(examples),
            "predictions": answers, "answer_tokens": [len(h.choices[0].tokens) for h in handles]}
