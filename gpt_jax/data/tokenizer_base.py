"""What every tokenizer offers, and the names of its saved files (`<dir>/tokenizer.json` last)."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

TOKENIZER_DIR = "tokenizer"
META_FILE = "tokenizer.json"


class Tokenizer:
    """ids are ints in [0, vocab_size); `fingerprint` changes whenever any id could."""
    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        return [np.asarray(self.encode(t), np.int64) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError
