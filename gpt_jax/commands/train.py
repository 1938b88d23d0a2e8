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
        raise SystemExit(f"gpt-jax train: unexpected arguments {argv[1:]}; use --flags")
    common.init_distributed()
    # Imported here, not at the top: --help stays fast and JAX starts after init_distributed.
    from gpt_jax import config as config_lib
    from gpt_jax import train

    try:
        last = train.train(FLAGS.config, FLAGS.workdir)
    except (config_lib.ConfigError, ValueError, FileNotFoundError,
            train.NonFiniteLossError) as e:
        raise SystemExit(f"gpt-jax train: {e}") from None
    logging.info("done: %s", json.dumps(last))
