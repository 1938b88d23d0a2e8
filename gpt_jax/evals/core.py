"""CORE (DCLM, arXiv 2406.11794): 22 tasks, each accuracy centred on its random baseline, then
averaged. Read from a local copy of the evaluation bundle in the layout nanochat reads, and
scored as nanochat scores it:

    BUNDLE/core.yaml               icl_tasks: label, dataset_uri, num_fewshot [k],
                                   icl_task_type, continuation_delimiter (default " ")
    BUNDLE/eval_meta_data.csv      "Eval Task", "Random baseline" (percent)
    BUNDLE/eval_data/<dataset_uri> one JSON object per line

Task kinds and their lines: `multiple_choice` {"query", "choices", "gold"} (the choice whose
tokens have the lowest mean loss wins), `schema` {"context_options", "continuation", "gold"}
(the context under which the shared continuation has the lowest mean loss wins),
`language_modeling` {"context", "continuation"} (right only if greedy decoding gives every
continuation token). Each prompt is rendered whole (k other examples of the task first, each
followed by a blank line), tokenized with BOS in front, and split where the choices' tokens
part (common prefix, or for schema common suffix). Each task's lines are shuffled with seed
1337 first and the k examples of line i drawn with `random.Random(1234 + i)`, so the same lines
get the same prompts as in nanochat. centred = (acc - b) / (1 - b), CORE = their mean.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random

import numpy as np
import yaml

from gpt_jax.data.files import exists, json_objects, read_bytes
from gpt_jax.errors import EvalError
from gpt_jax.evals.scoring import Request, loglikelihoods

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
KINDS = ("multiple_choice", "schema", "language_modeling")
FIELDS = {"multiple_choice": ("query", "choices", "gold"),
          "schema": ("context_options", "continuation", "gold"),
          "language_modeling": ("context", "continuation")}


@dataclasses.dataclass(frozen=True)
class CoreTask:
    label: str
    kind: str  # one of KINDS
    shots: int
    delimiter: str
    baseline: float  # random-guess accuracy, 0..1
    items: list  # the dataset's JSON objects, shuffled as nanochat shuffles them


def load_bundle(path: str, max_per_task: int = 0) -> list[CoreTask]:
    """The bundle's tasks (the first `max_per_task` shuffled lines of each, 0 = all)."""
    index = os.path.join(path, "core.yaml")
    if not exists(index):
        raise EvalError(f"no CORE bundle at {path} (no core.yaml): unzip DCLM's eval bundle "
                        f"({BUNDLE_URL}) so that {path}/core.yaml, {path}/eval_meta_data.csv "
                        f"and {path}/eval_data/ exist, and give core:{path}")
    spec = yaml.safe_load(read_bytes(index).decode("utf-8")) or {}
    baselines = _baselines(os.path.join(path, "eval_meta_data.csv"))
    tasks = []
    for entry in spec.get("icl_tasks") or []:
        label, kind = entry.get("label"), entry.get("icl_task_type")
        if kind not in KINDS:
            raise EvalError(f"{index}: task {label!r} has icl_task_type {kind!r}; one of "
                            f"{', '.join(KINDS)}")
        if label not in baselines:
            raise EvalError(f"{path}/eval_meta_data.csv has no random baseline for {label!r}")
        shots = entry.get("num_fewshot", [0])  # a list of one in DCLM's files
        shots = int(shots[0] if isinstance(shots, list) else shots)
        items = _items(os.path.join(path, "eval_data", entry["dataset_uri"]), kind)
        random.Random(1337).shuffle(items)
        items = items[:max_per_task] if max_per_task else items
        if shots >= len(items):
            raise EvalError(f"CORE task {label!r}: num_fewshot {shots} needs more than its "
                            f"{len(items)} lines (drawn from the others); raise --task_examples")
        tasks.append(CoreTask(label, kind, shots, entry.get("continuation_delimiter", " "),
                              baselines[label], items))
    if not tasks:
        raise EvalError(f"{index} lists no icl_tasks")
    return tasks


def _baselines(path: str) -> dict[str, float]:
    if not exists(path):
        raise EvalError(f"the CORE bundle has no {path} (the random baseline of each task)")
    rows = csv.DictReader(read_bytes(path).decode("utf-8").splitlines())
    try:
        return {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in rows}
    except (KeyError, ValueError) as e:
        raise EvalError(f"{path}: needs columns 'Eval Task' and 'Random baseline' (a number): "
                        f"{e}") from None


def _items(path: str, kind: str) -> list[dict]:
    items = []
    for where, obj in json_objects(path, EvalError):
        missing = [f for f in FIELDS[kind] if f not in obj]
        if missing:
            raise EvalError(f"{where}: a {kind} line needs {', '.join(FIELDS[kind])}; "
                            f"missing {', '.join(missing)}")
        items.append(obj)
    if not items:
        raise EvalError(f"{path} holds no examples")
    return items


def prompts(task: CoreTask, i: int) -> list[str]:
    """The whole prompts of line `i`: one per choice (multiple choice), per context option
    (schema), or [without, with] the continuation (language modelling)."""
    item, d = task.items[i], task.delimiter
    shots = []
    if task.shots:
        others = [j for j in range(len(task.items)) if j != i]
        shots = [task.items[j] for j in random.Random(1234 + i).sample(others, task.shots)]
    if task.kind == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{d}{c}" for c in item["choices"]]
    if task.kind == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n"
                       for s in shots)
        return [f"{head}{c}{d}{item['continuation']}" for c in item["context_options"]]
    head = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    without = f"{head}{item['context'].strip()}{d}"
    return [without.strip(), without + item["continuation"]]


def requests(task: CoreTask, i: int, tokenizer) -> list[Request]:
    """Line `i`'s prompts as (context, continuation) token requests, split as nanochat splits
    them: after the choices' common token prefix (multiple choice), before the options' common
    suffix (schema), after the prompt without the continuation (language modelling)."""
    tokens = [[int(tokenizer.bos_id)] + list(tokenizer.encode(p)) for p in prompts(task, i)]
    if task.kind == "language_modeling":
        without, with_ = tokens
        if len(with_) <= len(without) or with_[:len(without)] != without:
            raise EvalError(f"CORE {task.label} line {i}: the prompt without its continuation "
                            "does not tokenize to a prefix of the prompt with it")
        return [Request(with_[:len(without)], with_[len(without):])]
    shortest = min(map(len, tokens))
    if task.kind == "multiple_choice":
        start = next((k for k in range(shortest) if len({t[k] for t in tokens}) > 1), shortest)
        start = min(start, shortest - 1)  # a choice that is another's prefix keeps one token
        return [Request(t[:start], t[start:]) for t in tokens]
    suffix = next((k for k in range(1, shortest + 1) if len({t[-k] for t in tokens}) > 1),
                  shortest + 1) - 1
    suffix = min(suffix, shortest - 1)
    return [Request(t[:len(t) - suffix], t[len(t) - suffix:]) for t in tokens]


def task_right(model_cfg, params, tokenizer, task: CoreTask, *, batch_rows: int = 32,
               mesh=None, rules=None) -> list[bool]:
    """Whether the model gets each line of `task` right (see the module doc)."""
    per_line = [requests(task, i, tokenizer) for i in range(len(task.items))]
    scores = iter(loglikelihoods(model_cfg, params, [r for rs in per_line for r in rs],
                                 batch_rows=batch_rows, mesh=mesh, rules=rules))
    right = []
    for item, rs in zip(task.items, per_line):
        got = [next(scores) for _ in rs]
        if task.kind == "language_modeling":
            right.append(got[0].greedy)
        else:  # the lowest mean loss: the highest mean log-probability per token
            right.append(int(np.argmax([s.logprob / s.tokens for s in got])) == item["gold"])
    return right


def evaluate(model_cfg, params, tokenizer, tasks: list[CoreTask], **kw) -> dict[str, dict]:
    """{task label: {"acc", "centered", "n"}} and "CORE": {"core", "n" (tasks)}; `kw` as for
    `task_right`."""
    results = {}
    for task in tasks:
        acc = float(np.mean(task_right(model_cfg, params, tokenizer, task, **kw)))
        results[task.label] = {"acc": acc, "centered": (acc - task.baseline) /
                               (1 - task.baseline), "n": len(task.items)}
    results["CORE"] = {"core": float(np.mean([r["centered"] for r in results.values()])),
                       "n": len(tasks)}
    return results
