"""Downstream evaluation: multiple-choice tasks scored by log-likelihood (see docs/evaluation.md).

    tasks = evals.load_tasks("hellaswag:hellaswag_val.jsonl,nextline", config=config)
    results = evals.run_tasks(model_cfg, params, tokenizer, tasks, mesh=mesh, rules=rules)
    print(evals.format_table(results))     # {"hellaswag": {"acc", "acc_norm", "n"}, ...}

`gpt_jax.evals.harness` holds the lm-evaluation-harness model (`lm_eval --model gpt_jax`).
"""

from __future__ import annotations

from gpt_jax.errors import EvalError
from gpt_jax.evals.choice import Example, score_examples
from gpt_jax.evals.scoring import Request, Score, loglikelihoods
from gpt_jax.evals.tasks import KINDS, Task, load_tasks, parse_specs

__all__ = ["EvalError", "Example", "KINDS", "Request", "Score", "Task", "during_training",
           "format_table", "load_tasks", "loglikelihoods", "metric_events", "parse_specs",
           "run_tasks", "score_examples"]

PREFIX = "downstream/"  # metrics.jsonl / TensorBoard keys: downstream/<task>/<acc|acc_norm|n>


def run_tasks(model_cfg, params, tokenizer, tasks: list[Task], *, batch_rows: int = 32,
              mesh=None, rules=None) -> dict[str, dict]:
    """{task name: {"acc", "acc_norm", "n"}} for each task."""
    results = {}
    for task in tasks:
        r = score_examples(model_cfg, params, tokenizer, task.examples, batch_rows=batch_rows,
                           mesh=mesh, rules=rules)
        results[task.name] = {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"]}
    return results


def metric_events(results: dict[str, dict]) -> dict[str, float]:
    return {f"{PREFIX}{name}/{k}": float(v) for name, r in results.items() for k, v in r.items()}


def format_table(results: dict[str, dict]) -> str:
    rows = ["| task | n | acc | acc_norm |", "|---|---|---|---|"]
    rows += [f"| {name} | {r['n']} | {r['acc']:.4f} | {r['acc_norm']:.4f} |"
             for name, r in results.items()]
    return "\n".join(rows)


_TRAINING_TASKS: dict[tuple, list[Task]] = {}


def during_training(trainer, params, tokenizer, config) -> dict[str, float]:
    """`config.train.eval_tasks` on at most `config.train.eval_tasks_examples` examples each,
    as metric events; {} when no task is configured. Tasks are read once per run."""
    spec = config.train.eval_tasks
    if not spec:
        return {}
    limit = config.train.eval_tasks_examples
    key = (spec, limit, tokenizer.fingerprint, config.data.eval_split)
    if key not in _TRAINING_TASKS:
        _TRAINING_TASKS[key] = load_tasks(spec, limit=limit, config=config)
    results = run_tasks(trainer.model_cfg, params, tokenizer, _TRAINING_TASKS[key],
                        mesh=trainer.mesh, rules=trainer.rules)
    return metric_events(results)
