"""`gpt-jax train --config=configs/default.py --workdir=runs/demo [--config.x.y=...]`."""

from __future__ import annotations

import json
import sys

from absl import flags, logging

from gpt_jax.cli import expected_exit_code
from gpt_jax.commands import common
from gpt_jax.errors import RunDirError, RunLockedError

common.define_config_flag()
common.define_distributed_flags()
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer, config.",
                    required=True)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise common.usage_error(f"unexpected arguments {argv[1:]}; use --flags")
    common.init_distributed()
    # Imported here, not at the top: --help stays fast and JAX starts after init_distributed.
    from gpt_jax import run_status, train

    try:
        last = train.train(FLAGS.config, FLAGS.workdir, common.explicit_fields(sys.argv))
    except (RunLockedError, RunDirError):
        raise  # the run directory is another process's, or cannot be written
    except Exception as e:
        known = expected_exit_code(e) is not None
        run_status.failed(FLAGS.workdir,
                          f"gpt-jax train: {e}" if known else f"{type(e).__name__}: {e}")
        raise
    logging.info("done: %s", json.dumps(last))
