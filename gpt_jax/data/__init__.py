"""The data pipeline: corpora (TFDS, no TensorFlow; JSONL; Parquet) -> tokenizer -> token store
-> batches.

    tok = data.build_tokenizer(config, workdir)            # or data.load_tokenizer(workdir)
    train = data.open_dataset(config, tok, split="train")  # a store, or a mixture of stores
    loader = data.BatchLoader(train, global_batch_size, seq_len, seed, mesh, start_step=0)
    for step, batch in loader: ...                          # {"inputs", "targets"}: jax.Arrays

`gpt-jax prepare` (data.prepare.prepare) writes the token store; see docs/data.md.
"""

import importlib

# name -> module: loaded on first use, so that a `prepare` worker (which imports only
# gpt_jax.data.prepare) does not pay for TensorFlow Datasets' import at start-up.
_EXPORTS = {
    "DataError": "files", "DataFileNotFoundError": "files",
    "BatchLoader": "loader", "TokenDataset": "loader", "process_rows": "loader",
    "MixtureDataset": "mixture", "open_dataset": "mixture",
    "Pair": "sft", "SFTDataset": "sft", "read_jsonl": "sft",
    "Corpus": "sources", "open_corpus": "sources",
    "Store": "store", "auto_store": "store", "open_store": "store",
    "ByteTokenizer": "tokenizers", "CharTokenizer": "tokenizers",
    "SentencePieceTokenizer": "tokenizers", "Tokenizer": "tokenizers",
    "build_tokenizer": "tokenizers", "load_tokenizer": "tokenizers",
    "train_sentencepiece": "tokenizers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpt_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gpt_jax.data.{_EXPORTS[name]}"), name)
