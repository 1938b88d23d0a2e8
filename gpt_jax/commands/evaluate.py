"""`gpt-jax eval --workdir=runs/demo`: validation loss / perplexity of a run's checkpoint."""

from __future__ import annotations

import json

from absl import flags

from gpt_jax.commands import common

common.define_distributed_flags()
flags.DEFINE_string("workdir", None, "A run directory or one checkpoint step directory.",
                    required=True)
flags.DEFINE_integer("eval_batches", None, "Validation batches (default: the run's config).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if FLAGS.eval_batches is not None and FLAGS.eval_batches < 1:
        raise common.usage_error(f"--eval_batches={FLAGS.eval_batches} must be >= 1")
    common.init_distributed()
    import jax

    from gpt_jax import api, checkpoint, sharding, train
    from gpt_jax.step import Trainer

    config = checkpoint.load_config(FLAGS.workdir)  # a missing run: one line from the CLI
    if FLAGS.eval_batches:
        config.train.eval_batches = FLAGS.eval_batches
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    mesh = sharding.make_mesh(config.mesh)
    trainer = Trainer.create(config, mesh)
    _, params = checkpoint.load_params(FLAGS.workdir,
                                       shardings=trainer.state_shardings["params"])
    tokenizer = api.load_tokenizer_for(FLAGS.workdir)
    val = train.open_split(config, tokenizer, "validation")
    with sharding.activate(mesh, trainer.rules):
        result = train.evaluate(trainer, trainer.jit_eval_step(), params, val, config)
    if jax.process_index() == 0:
        print(json.dumps({"workdir": FLAGS.workdir, **result}))

