"""The data pipeline: corpora (TFDS, no TensorFlow; JSONL; Parquet) -> tokenizer -> token store
-> batches.

    tok = data.build_tokenizer(config, workdir)            # or data.load_tokenizer(workdir)
    train = data.open_dataset(config, tok, split="train")  # a store, or a mixture of stores
    loader = data.BatchLoader(train, global_batch_size, seq_len, seed, mesh, start_step=0)
    for step, batch in loader: ...                          # {"inputs", "targets"}: jax.Arrays

`gpt-jax prepare` (data.prepare.prepare) writes the token store; see docs/data.md.
"""

from gpt_jax.data.files import DataError, DataFileNotFoundError
from gpt_jax.data.loader import BatchLoader, TokenDataset, process_rows
from gpt_jax.data.mixture import MixtureDataset, open_dataset
from gpt_jax.data.sft import Pair, SFTDataset, read_jsonl
from gpt_jax.data.sources import Corpus, open_corpus
from gpt_jax.data.store import Store, auto_store, open_store
from gpt_jax.data.tokenizers import (ByteTokenizer, CharTokenizer, SentencePieceTokenizer,
                                     Tokenizer, build_tokenizer, load_tokenizer,
                                     train_sentencepiece)

__all__ = ["BatchLoader", "ByteTokenizer", "CharTokenizer", "Corpus", "DataError",
           "DataFileNotFoundError", "MixtureDataset", "Pair", "SFTDataset",
           "SentencePieceTokenizer", "Store", "TokenDataset", "Tokenizer", "auto_store",
           "build_tokenizer", "load_tokenizer", "open_corpus", "open_dataset", "open_store",
           "process_rows", "read_jsonl", "train_sentencepiece"]
