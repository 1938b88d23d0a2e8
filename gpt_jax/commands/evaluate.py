"""`gpt-jax eval --workdir=runs/demo`: validation loss / perplexity of a run's checkpoint;
with `--tasks=hellaswag:val.jsonl,nextline`, downstream accuracy instead (gpt_jax.evals)."""

from __future__ import annotations

import json
import os

from absl import flags

from gpt_jax.commands import common

common.define_distributed_flags()
flags.DEFINE_string("workdir", None, "A run directory or one checkpoint step directory.",
                    required=True)
flags.DEFINE_integer("eval_batches", None, "Validation batches (default: the run's config).")
flags.DEFINE_string("tasks", None, "Downstream tasks, kind[:path] joined by commas: "
                    "hellaswag:FILE, hellaswag_preprocessed:FILE, choices:FILE, nextline[:TEXT], "
                    "hellaswag_tfds, generate:FILE, core:BUNDLE_DIR (see docs/evaluation.md). "
                    "Replaces the loss evaluation.")
flags.DEFINE_integer("task_examples", 0, "Examples per task (0: all).")
flags.DEFINE_integer("batch_rows", 32, "Rows (context + one ending) per scoring batch.")
flags.DEFINE_string("output", None, "JSON file for --tasks results "
                    "(default: <workdir>/eval_tasks.json).")
FLAGS = flags.FLAGS


def run_tasks() -> None:
    import jax  # as in main: --help stays fast and JAX starts after init_distributed

    from gpt_jax import api, evals

    results = api.evaluate_run(FLAGS.workdir, FLAGS.tasks, limit=FLAGS.task_examples,
                               batch_rows=FLAGS.batch_rows)
    if jax.process_index() == 0:
        out = FLAGS.output or os.path.join(FLAGS.workdir, "eval_tasks.json")
        with open(out, "w") as f:
            json.dump({"workdir": FLAGS.workdir, "tasks": results}, f, indent=1)
        print(evals.format_table(results))
        print(f"wrote {out}")


def main(argv: list[str]) -> None:
    if FLAGS.eval_batches is not None and FLAGS.eval_batches < 1:
        raise common.usage_error(f"--eval_batches={FLAGS.eval_batches} must be >= 1")
    common.init_distributed()
    if FLAGS.tasks:
        return run_tasks()
    # Imported here, not at the top: --help stays fast and JAX starts after init_distributed.
    import jax

    from gpt_jax import checkpoint, run, sharding
    from gpt_jax.evaluate import evaluate
    from gpt_jax.step import Trainer

    overrides = {"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1}
    if FLAGS.eval_batches:
        overrides["train.eval_batches"] = FLAGS.eval_batches
    config, tokenizer, mesh = run.open_run(FLAGS.workdir, overrides)
    trainer = Trainer.create(config.model, config.train, config.optim, mesh, config.mesh.rules)
    _, params = checkpoint.load_params(FLAGS.workdir,
                                       shardings=trainer.state_shardings["params"])
    val = run.open_data(config, tokenizer, "validation")
    with sharding.activate(mesh, trainer.rules):
        result = evaluate(trainer, trainer.jit_eval_step(), params, val, config)
    if jax.process_index() == 0:
        print(json.dumps({"workdir": FLAGS.workdir, **result}))
