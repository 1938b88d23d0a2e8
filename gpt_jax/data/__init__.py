"""The data pipeline: corpora (TFDS, no TensorFlow) -> tokenizer -> token cache -> batches.

    tok = data.build_tokenizer(config, workdir)            # or data.load_tokenizer(workdir)
    train = data.TokenDataset(config, tok, split="train")
    loader = data.BatchLoader(train, global_batch_size, seq_len, seed, mesh, start_step=0)
    for step, batch in loader: ...                          # {"inputs", "targets"}: jax.Arrays

See docs/data.md.
"""

from gpt_jax.data.cache import build_token_cache, load_token_cache
from gpt_jax.data.files import DataError, DataFileNotFoundError
from gpt_jax.data.loader import BatchLoader, TokenDataset, process_rows
from gpt_jax.data.sft import Pair, SFTDataset, read_jsonl
from gpt_jax.data.sources import Corpus, open_corpus
from gpt_jax.data.tokenizers import (ByteTokenizer, CharTokenizer, SentencePieceTokenizer,
                                     Tokenizer, build_tokenizer, load_tokenizer,
                                     train_sentencepiece)

__all__ = ["BatchLoader", "ByteTokenizer", "CharTokenizer", "Corpus", "DataError",
           "DataFileNotFoundError", "Pair", "SFTDataset", "SentencePieceTokenizer",
           "TokenDataset", "Tokenizer",
           "build_token_cache", "build_tokenizer", "load_token_cache", "load_tokenizer",
           "open_corpus", "process_rows", "read_jsonl", "train_sentencepiece"]
