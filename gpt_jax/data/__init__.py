"""The data route: documents -> prepare -> token store -> loader.

    d = config.data                                         # a DataConfig
    tok = data.build_tokenizer(d, vocab_size, workdir)      # or data.load_tokenizer(workdir)
    path = d.store or data.prepare_cached(d, tok)           # small corpora: into the cache
    train = data.open_dataset(path, tok, "train", block_size)   # reading never writes
    loader = data.BatchLoader(train, global_batch_size, seq_len, seed, mesh, rules)
    for step, batch in loader: ...                          # {"inputs", "targets"}: jax.Arrays

`gpt-jax prepare` (data.prepare.prepare) writes a store from any source; see docs/data.md.
"""

import importlib

# name -> module: loaded on first use, so that a `prepare` worker (which imports only
# gpt_jax.data.prepare) does not pay for TensorFlow Datasets' import at start-up.
_EXPORTS = {
    "DataConfig": "config",
    "list_files": "files",
    "BatchLoader": "loader", "Dataset": "loader", "TokenDataset": "loader",
    "process_rows": "loader",
    "MixtureDataset": "mixture", "open_dataset": "mixture",
    "prepare": "prepare", "prepare_cached": "prepare",
    "SFTDataset": "sft",
    "Store": "store", "open_store": "store",
    "ByteTokenizer": "tokenizers", "CharTokenizer": "tokenizers",
    "SentencePieceTokenizer": "tokenizers", "Tokenizer": "tokenizers",
    "build_tokenizer": "tokenizers", "load_tokenizer": "tokenizers",
    "ready_tokenizer": "tokenizers", "train_sentencepiece": "tokenizers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpt_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gpt_jax.data.{_EXPORTS[name]}"), name)
