"""`gpt-jax prepare --config=... --store=gs://bucket/corpus`: tokenize a corpus into a token store.

Runs on any CPU machine (or on every host of a TPU slice before training): all cores by
default, and with several processes (--num_processes/--process_id, or launch/local_multihost.py)
each tokenizes only its share of the shards. Rerunning the same command finishes an
interrupted store; training then reads it with --config.data.store=<the same path>.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags

from gpt_jax.commands import common

common.define_config_flag("default")
common.define_distributed_flags()
flags.DEFINE_string("store", None, "Where to write the store: a local folder or a gs:// URL.",
                    required=True)
flags.DEFINE_integer("num_workers", 0, "Worker processes on this host (0: one per CPU core).",
                     lower_bound=0)
flags.DEFINE_float("wait_s", 86400.0, "Process 0: how long to wait for the other processes' "
                   "shards before giving up.", lower_bound=0.0)
FLAGS = flags.FLAGS


def process_layout() -> tuple[int, int]:
    """(index, count) of this process, from the flags or local_multihost's environment."""
    count = FLAGS.num_processes or int(os.environ.get("GPT_JAX_NUM_PROCESSES") or 1)
    index = FLAGS.process_id
    if index is None:
        index = int(os.environ.get("GPT_JAX_PROCESS_ID", "0"))
    if not 0 <= index < count:
        raise common.usage_error(f"--process_id={index} is not in [0, {count}) for "
                                 f"--num_processes={count}")
    return index, count


def main(argv: list[str]) -> None:
    del argv
    # Imported here, not at the top: --help stays fast.
    from gpt_jax.config import typed
    from gpt_jax.data.prepare import open_tfds, prepare, store_tokenizer

    config = typed(FLAGS.config)  # errors: one line each, from the CLI
    index, count = process_layout()
    start = time.perf_counter()
    corpus = open_tfds(config.data)
    tok = store_tokenizer(config.data, config.model.vocab_size, FLAGS.store, index, corpus)
    stats = prepare(config.data, FLAGS.store, tok, FLAGS.num_workers, index, count,
                    FLAGS.wait_s, tfds_corpus=corpus)
    stats.update(store=FLAGS.store, process_index=index, process_count=count,
                 tokenizer=tok.kind, total_seconds=round(time.perf_counter() - start, 3))
    print(json.dumps(stats, sort_keys=True, default=lambda x: round(float(x), 3)))
