"""`gpt-jax bench data`: default-corpus cache build time and loader throughput (tokens/s).

Builds everything from scratch in a temporary cache (the corpus's file listing, tokenizer
training, the token store), then times `host_batch` (numpy rows of one process) and the
`BatchLoader` (global jax.Arrays on this host's devices, prefetch thread included).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import jax
from absl import flags

from gpt_jax import data
from gpt_jax.commands.common import define_config_flag
from gpt_jax.config import Config, typed
from gpt_jax.data import documents

if "config" not in flags.FLAGS:
    define_config_flag("default")
flags.DEFINE_integer("bench_batches", 300, "Batches to time for each loader measurement.")
flags.DEFINE_integer("bench_batch_size", 0, "Global batch size (0: the config's).")
flags.DEFINE_integer("bench_seq_len", 0, "Sequence length (0: the config's block size).")
flags.DEFINE_string("bench_cache", "", "Cache folder to build in ('': a fresh temporary one).")

FLAGS = flags.FLAGS


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(config: Config, cache: str, batches: int, batch_size: int, seq_len: int) -> dict:
    """The numbers of this benchmark as a dict (see module docstring)."""
    os.environ["GPT_JAX_CACHE"] = cache
    config = config.replace({"data.data_dir": "", "data.cache_dir": ""})
    d = config.data
    start = time.perf_counter()
    plan, t_prepare = _timed(lambda: documents.plan(d))
    tok, t_tok = _timed(lambda: data.build_tokenizer(d, config.model.vocab_size,
                                                    os.path.join(cache, "run")))
    store, t_train = _timed(lambda: data.prepare_cached(d, tok))
    train = data.open_dataset(store, tok, "train", config.model.block_size)
    val, t_val = _timed(lambda: data.open_dataset(store, tok, "validation",
                                                  config.model.block_size))
    t_total = time.perf_counter() - start

    tokens = batches * batch_size * seq_len
    seed = config.train.seed
    _, t_host = _timed(lambda: [train.host_batch(s, batch_size, seq_len, seed)
                                for s in range(batches)])
    loader = data.BatchLoader(train, batch_size, seq_len, seed, config.mesh.make(),
                              config.mesh.rules, prefetch=max(1, d.prefetch))
    next(loader)  # thread started, first batch made

    def consume():
        for _, (_, batch) in zip(range(batches), loader):
            batch["inputs"].block_until_ready()

    _, t_loader = _timed(consume)
    loader.close()
    return {
        "corpus": plan.corpus, "python": platform.python_version(),
        "corpus_files": plan.metadata.get("num_files"), "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size, "train_tokens": train.num_tokens,
        "validation_tokens": val.num_tokens, "prepare_s": round(t_prepare, 2),
        "tokenizer_s": round(t_tok, 2), "train_cache_s": round(t_train, 2),
        "validation_cache_s": round(t_val, 2), "cache_build_total_s": round(t_total, 2),
        "batch_size": batch_size, "seq_len": seq_len, "devices": jax.device_count(),
        "host_batch_tokens_per_s": round(tokens / t_host),
        "loader_tokens_per_s": round(tokens / t_loader), "cpu_count": os.cpu_count(),
    }


def run(argv: list[str]) -> None:
    del argv
    config = typed(FLAGS.config)
    batch_size = FLAGS.bench_batch_size or config.train.global_batch_size
    seq_len = FLAGS.bench_seq_len or config.model.block_size
    with tempfile.TemporaryDirectory(prefix="gpt_jax_bench_data_") as tmp:
        r = measure(config, FLAGS.bench_cache or tmp, FLAGS.bench_batches, batch_size, seq_len)
    print(f"corpus: {r['corpus']} (Python {r['python']}, {r['corpus_files']} files), "
          f"{r['tokenizer']} tokenizer, vocab {r['vocab_size']}")
    print(f"cache build from scratch: {r['cache_build_total_s']:.1f}s (file listing "
          f"{r['prepare_s']:.1f}s, tokenizer {r['tokenizer_s']:.1f}s, token store "
          f"{r['train_cache_s']:.1f}s, opening validation {r['validation_cache_s']:.1f}s); "
          f"{r['train_tokens']:,} train / {r['validation_tokens']:,} validation tokens")
    print(f"host_batch ({batch_size}x{seq_len}): {r['host_batch_tokens_per_s']:,.0f} tokens/s")
    print(f"BatchLoader -> global jax.Array on {r['devices']} device(s): "
          f"{r['loader_tokens_per_s']:,.0f} tokens/s")
    print(json.dumps({"bench": "data", **r}, sort_keys=True))
