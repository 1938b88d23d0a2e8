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
    common.init_distributed()
    # Imported here, not at the top: --help stays fast and JAX starts after init_distributed.
    import jax

    from gpt_jax import api, checkpoint, sharding
    from gpt_jax.evaluate import evaluate, open_split
    from gpt_jax.step import Trainer

    try:
        config = checkpoint.load_config(FLAGS.workdir)
    except FileNotFoundError as e:
        raise SystemExit(f"gpt-jax eval: {e}") from None
    if FLAGS.eval_batches:
        config.train.eval_batches = FLAGS.eval_batches
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    mesh = sharding.make_mesh(config.mesh)
    trainer = Trainer.create(config, mesh)
    _, params = checkpoint.load_params(FLAGS.workdir,
                                       shardings=trainer.state_shardings["params"])
    tokenizer = api.load_tokenizer_for(FLAGS.workdir)
    val = open_split(config, tokenizer, "validation")
    with sharding.activate(mesh, trainer.rules):
        result = evaluate(trainer, trainer.jit_eval_step(), params, val, config)
    if jax.process_index() == 0:
        print(json.dumps({"workdir": FLAGS.workdir, **result}))

