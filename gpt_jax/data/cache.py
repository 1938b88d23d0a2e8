"""The on-disk token cache: one flat uint16/uint32 array per (corpus, split, tokenizer).

Layout: `bos doc_0 eos bos doc_1 eos ...` in the data source's fixed document order. The file
`<name>.tokens` is renamed into place when complete and `<name>.json` (its description) is
written after it, so a build that was interrupted leaves no `.json` and is rebuilt; a `.json`
naming another tokenizer or corpus, or a file of the wrong size, is rebuilt too, never reused.
"""

from __future__ import annotations

import glob
import hashlib
import os
import time
from typing import Callable

import numpy as np
from absl import logging
from tqdm import tqdm

from gpt_jax.data.files import DataError, atomic_write_json, build_once, cache_root, read_json
from gpt_jax.data.sources import Corpus
from gpt_jax.data.tokenizers import Tokenizer

FORMAT = "gpt_jax-tokens-v1"
DOCS_PER_CHUNK = 256


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


def cache_paths(corpus: Corpus, split: str, tok: Tokenizer, cache_dir: str) -> tuple[str, str]:
    """(tokens file, description file) for this corpus, split and tokenizer."""
    key = hashlib.sha256(f"{FORMAT}\0{corpus.fingerprint}\0{split}\0{tok.fingerprint}".encode())
    safe_split = "".join(c if c.isalnum() or c in "-_" else "_" for c in split)
    base = os.path.join(cache_dir or os.path.join(cache_root(), "tokens"),
                        f"{corpus.name}-{safe_split}-{key.hexdigest()[:16]}")
    return base + ".tokens", base + ".json"


def _expected(corpus: Corpus, split: str, tok: Tokenizer) -> dict:
    return {"format": FORMAT, "corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint,
            "split": split, "tokenizer_fingerprint": tok.fingerprint,
            "dtype": token_dtype(tok.vocab_size).name}


def _is_valid(tokens_path: str, meta_path: str, expected: dict) -> bool:
    meta = read_json(meta_path)
    if meta is None:
        return False
    if any(meta.get(k) != v for k, v in expected.items()):
        logging.warning("Token cache %s was built for another corpus/tokenizer; rebuilding",
                        meta_path)
        return False
    try:
        size = os.path.getsize(tokens_path)
    except OSError:
        return False
    if size != meta.get("num_tokens", -1) * np.dtype(meta["dtype"]).itemsize:
        logging.warning("Token cache %s has %d bytes, not the %d tokens its .json says; "
                        "rebuilding", tokens_path, size, meta.get("num_tokens", -1))
        return False
    return True


def _write_tokens(corpus: Corpus, split: str, tok: Tokenizer, path: str,
                  heartbeat: Callable[[], None]) -> dict:
    dtype = token_dtype(tok.vocab_size)
    num_docs = len(corpus.split(split))
    if num_docs == 0:
        raise DataError(f"split {split!r} of {corpus.name} is empty: no documents")
    num_tokens, num_chars, num_bytes, start = 0, 0, 0, time.time()
    bos, eos = np.array([tok.bos_id], dtype), np.array([tok.eos_id], dtype)
    texts = corpus.texts(split, chunk=DOCS_PER_CHUNK)
    with open(path, "wb") as f, tqdm(total=num_docs, unit="doc", disable=None, leave=False,
                                     desc=f"tokenizing {corpus.name}/{split}") as bar:
        for first in range(0, num_docs, DOCS_PER_CHUNK):
            batch = [next(texts) for _ in range(min(DOCS_PER_CHUNK, num_docs - first))]
            num_chars += sum(map(len, batch))
            num_bytes += sum(len(text.encode("utf-8")) for text in batch)
            pieces = []
            for ids in tok.encode_batch(batch):
                pieces += [bos, ids.astype(dtype), eos]
            chunk = np.concatenate(pieces)
            f.write(chunk.tobytes())
            num_tokens += chunk.size
            bar.update(len(batch))
            heartbeat()
        f.flush()
        os.fsync(f.fileno())
    if num_chars == 0:
        raise DataError(f"split {split!r} of {corpus.name} is empty: its {num_docs} documents "
                        "have no text")
    seconds = time.time() - start
    logging.info("Token cache %s/%s: %d docs, %d chars -> %d tokens in %.1fs (%.0f tokens/s)",
                 corpus.name, split, num_docs, num_chars, num_tokens, seconds,
                 num_tokens / max(seconds, 1e-9))
    return {"num_docs": num_docs, "num_chars": num_chars, "num_bytes": num_bytes,
            "num_tokens": num_tokens,
            "build_seconds": round(seconds, 3), "corpus_metadata": corpus.metadata}


def build_token_cache(corpus: Corpus, split: str, tok: Tokenizer, cache_dir: str = "") -> str:
    """Path of the token file for (corpus, split, tok), built now if missing or invalid."""
    tokens_path, meta_path = cache_paths(corpus, split, tok, cache_dir)
    expected = _expected(corpus, split, tok)

    def build(heartbeat: Callable[[], None]) -> None:
        for old in glob.glob(tokens_path + ".partial-*"):  # left by an interrupted build
            logging.warning("Removing the unfinished token cache %s", old)
            os.remove(old)
        if os.path.exists(meta_path):
            os.remove(meta_path)  # invalid; the .tokens file is replaced below
        partial = f"{tokens_path}.partial-{os.getpid()}"
        try:
            stats = _write_tokens(corpus, split, tok, partial, heartbeat)
            os.replace(partial, tokens_path)
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise
        atomic_write_json(meta_path, {**expected, **stats})

    os.makedirs(os.path.dirname(tokens_path), exist_ok=True)
    build_once(lambda: _is_valid(tokens_path, meta_path, expected), build,
               tokens_path + ".lock", f"the token cache {tokens_path}")
    return tokens_path


def load_token_cache(tokens_path: str) -> np.ndarray:
    """The cached tokens as a read-only memmap (1-D)."""
    meta = read_json(tokens_path[:-len(".tokens")] + ".json")
    if meta is None:
        raise DataError(f"{tokens_path} has no description file; rebuild the cache")
    if meta["num_tokens"] == 0:
        return np.zeros((0,), np.dtype(meta["dtype"]))
    return np.memmap(tokens_path, dtype=np.dtype(meta["dtype"]), mode="r",
                     shape=(meta["num_tokens"],))
