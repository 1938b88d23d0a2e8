"""`gpt-jax train --config=configs/default.py --workdir=runs/demo [--config.x.y=...]`."""

from __future__ import annotations

import json

from absl import flags, logging

from gpt_jax.commands import common

common.define_config_flag()
common.define_distributed_flags()
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer, config.",
                    required=True)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise common.usage_error(f"unexpected arguments {argv[1:]}; use --flags")
    common.init_distributed()
    from gpt_jax import config as config_lib
    from gpt_jax import train

    config = FLAGS.config
    with config.unlocked():
        config_lib.validate(config)  # a ConfigError is a usage error (exit 2) in the CLI
        try:
            last = train.train(config, FLAGS.workdir)
        except config_lib.ConfigError:
            raise
        except ValueError as e:  # e.g. the tokenizer does not fit model.vocab_size
            raise common.CommandError(str(e)) from e
    logging.info("done: %s", json.dumps(last))
