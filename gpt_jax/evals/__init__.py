"""Downstream evaluation: multiple-choice tasks scored by log-likelihood, generative tasks by
what the model writes (see docs/evaluation.md).

    tasks = evals.load_tasks("hellaswag:hellaswag_val.jsonl,nextline", config=config)
    results = evals.run_tasks(model_cfg, params, tokenizer, tasks, mesh=mesh, rules=rules)
    print(evals.format_table(results))     # {"hellaswag": {"acc", "acc_norm", ..., "n"}, ...}

`gpt_jax.evals.harness` holds the lm-evaluation-harness model (`lm_eval --model gpt_jax`).
"""

from __future__ import annotations

from gpt_jax.errors import EvalError
from gpt_jax.evals import core, generative
from gpt_jax.evals.choice import METRICS, Example, score_examples, upgrade
from gpt_jax.evals.scoring import Request, Score, loglikelihoods
from gpt_jax.evals.tasks import KINDS, Task, load_tasks, parse_specs

__all__ = ["EvalError", "Example", "KINDS", "METRICS", "Request", "Score", "Task",
           "during_training", "format_table", "load_tasks", "loglikelihoods", "metric_events",
           "parse_specs", "run_tasks", "score_examples", "upgrade"]

PREFIX = "downstream/"  # metrics.jsonl / TensorBoard keys: downstream/<task>/<metric|n>


def run_tasks(model_cfg, params, tokenizer, tasks: list[Task], *, batch_rows: int = 32,
              mesh=None, rules=None) -> dict[str, dict]:
    """{task name: {each of METRICS, "n"}} for each task."""
    results, engine = {}, None
    for task in tasks:
        if task.kind == "core":  # its tasks' rows and the CORE row
            results.update(core.evaluate(model_cfg, params, tokenizer, task.examples,
                                         batch_rows=batch_rows, mesh=mesh, rules=rules))
            continue
        if task.kind == "generate":
            if engine is None:
                engine = generation_engine(model_cfg, params, tokenizer, mesh, rules)
            r = generative.evaluate(engine, tokenizer, task.examples, task.options)
            results[task.name] = {**{m: r[m] for m in generative.METRICS}, "n": r["n"]}
            continue
        r = score_examples(model_cfg, params, tokenizer, task.examples, batch_rows=batch_rows,
                           mesh=mesh, rules=rules)
        results[task.name] = {**{m: r[m] for m in METRICS}, "n": r["n"]}
    return results


def generation_engine(model_cfg, params, tokenizer, mesh=None, rules=None, slots: int = 16):
    """A serving engine for a task's answers: `slots` rows (a multiple of the batch shards)."""
    from gpt_jax.serve.engine import Engine, EngineConfig
    from gpt_jax.sharding import batch_shards

    shards = 1 if mesh is None else batch_shards(mesh, rules)
    slots = -(-slots // shards) * shards
    return Engine(model_cfg, params, tokenizer, EngineConfig(slots=slots), mesh, rules)


def metric_events(results: dict[str, dict]) -> dict[str, float]:
    return {f"{PREFIX}{name}/{k}": float(v) for name, r in results.items() for k, v in r.items()}


def format_table(results: dict[str, dict]) -> str:
    """One markdown table per kind of task (multiple choice, generative, CORE)."""
    tables = []
    centred = {n: r for n, r in results.items() if "centered" in r or "core" in r}
    if centred:
        rows = ["| CORE task | n | acc | centered |", "|---|---|---|---|"]
        rows += [f"| {n} | {r['n']} | " + (f"{r['acc']:.4f} | {r['centered']:.4f} |"
                                           if "acc" in r else f"– | {r['core']:.4f} |")
                 for n, r in centred.items()]
        tables.append("\n".join(rows))
    results = {n: r for n, r in results.items() if n not in centred}
    for metrics in (METRICS, generative.METRICS):
        named = [(n, upgrade(r)) for n, r in results.items()
                 if (metrics is generative.METRICS) == ("exact_match" in r)]
        if not named:
            continue
        rows = ["| task | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        rows += [f"| {name} | {r['n']} | " + " | ".join(
            (f"{r[m]:.2f}" if m == "bleu" else f"{r[m]:.4f}") if m in r else "–"
            for m in metrics) + " |" for name, r in named]
        tables.append("\n".join(rows))
    return "\n\n".join(tables)


_TRAINING_TASKS: dict[tuple, list[Task]] = {}


def during_training(trainer, params, tokenizer, config) -> dict[str, float]:
    """`config.train.eval_tasks` on at most `config.train.eval_tasks_examples` examples each,
    as metric events; {} when no task is configured. Tasks are read once per run."""
    tasks = training_tasks(tokenizer, config)
    if not tasks:
        return {}
    results = run_tasks(trainer.model_cfg, params, tokenizer, tasks, mesh=trainer.mesh,
                        rules=trainer.rules)
    return metric_events(results)


def training_tasks(tokenizer, config) -> list:
    """The tasks of `config.train.eval_tasks`, read once per run (the training loop reads them
    before its first step, so a missing task file fails there)."""
    spec = config.train.eval_tasks
    if not spec:
        return []
    limit = config.train.eval_tasks_examples
    key = (spec, limit, tokenizer.fingerprint, config.data.eval_split)
    if key not in _TRAINING_TASKS:
        _TRAINING_TASKS[key] = load_tasks(spec, limit=limit, config=config)
    return _TRAINING_TASKS[key]
