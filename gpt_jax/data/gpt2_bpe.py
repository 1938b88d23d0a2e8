"""GPT-2's byte-level BPE tokenizer from `vocab.json` + `merges.txt`, encoded by tiktoken.

Text is split into pre-tokens by GPT-2's pattern (contractions, letter runs, digit runs, other
symbol runs, each with at most one leading space, and whitespace runs); each pre-token's UTF-8
bytes are merged in the order `merges.txt` ranks them. tiktoken (Rust) does both; it is built
here from the local files, so nothing is downloaded. Its ranks are merge order (the 256 byte
tokens first), mapped back to the ids of `vocab.json` (for GPT-2's own files the two agree).
`<|endoftext|>` in the text maps to its id. The saved form is the two original files plus
`tokenizer.json`; see `gpt_jax.data.tokenizers`.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np
import tiktoken

from gpt_jax.data.files import atomic_write, digest, exists, read_bytes
from gpt_jax.data.tokenizer_base import META_FILE, Tokenizer
from gpt_jax.errors import DataError, DataFileNotFoundError

KIND = "gpt2_bpe"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
END_OF_TEXT = "<|endoftext|>"
# GPT-2's split pattern (the `regex` module's syntax, which tiktoken also reads).
GPT2_PATTERN = (r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes map to themselves, the other 68 to U+0100...

    so that every byte is a visible character and BPE never sees whitespace or controls.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _parse_merges(text: str, where: str) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{where} line {number}: {line[:60]!r} is not a merge "
                            "'<left> <right>'")
        merges.append((parts[0], parts[1]))
    return merges


class GPT2BPETokenizer(Tokenizer):
    """The project's Tokenizer interface over GPT-2's byte-level BPE (bos = eos = pad)."""
    kind = KIND

    def __init__(self, vocab_json: bytes, merges_txt: bytes, where: str = "GPT-2 tokenizer"):
        self.vocab_json, self.merges_txt = vocab_json, merges_txt
        try:
            vocab = json.loads(vocab_json.decode("utf-8"))
        except ValueError as e:
            raise DataError(f"{where}/{VOCAB_FILE} is not JSON: {e}") from None
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise DataError(f"{where}/{VOCAB_FILE} must map token strings to int ids")
        self.encoder: dict[str, int] = vocab
        self.decoder: dict[int, str] = {i: t for t, i in vocab.items()}
        self.vocab_size = max(vocab.values()) + 1
        self.ranks = {pair: r for r, pair in
                      enumerate(_parse_merges(merges_txt.decode("utf-8"), f"{where}/"
                                              f"{MERGES_FILE}"))}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        missing = [c for c in self.byte_encoder.values() if c not in vocab]
        if missing:
            raise DataError(f"{where}/{VOCAB_FILE} lacks {len(missing)} of the 256 byte tokens "
                            f"(e.g. {missing[0]!r}); a byte-level BPE vocabulary needs them all")
        for (left, right) in self.ranks:
            if left + right not in vocab:
                raise DataError(f"{where}/{MERGES_FILE}: the merge {left!r} {right!r} makes "
                                f"{left + right!r}, which is not in {VOCAB_FILE}")
        if END_OF_TEXT not in vocab:
            raise DataError(f"{where}/{VOCAB_FILE} has no {END_OF_TEXT!r} token (GPT-2's "
                            "bos/eos)")
        self.eos_id = self.bos_id = self.pad_id = vocab[END_OF_TEXT]
        self.specials = {END_OF_TEXT: self.eos_id}
        self._tiktoken: tuple[tiktoken.Encoding, np.ndarray] | None = None

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_files(cls, directory: str) -> "GPT2BPETokenizer":
        """From `vocab.json` + `merges.txt` in `directory` (a HF GPT-2 dir or our tokenizer/)."""
        paths = [os.path.join(directory, f) for f in (VOCAB_FILE, MERGES_FILE)]
        for path in paths:
            if not exists(path):
                raise DataFileNotFoundError(f"{path} does not exist; a GPT-2 BPE tokenizer "
                                            f"needs {VOCAB_FILE} and {MERGES_FILE}")
        return cls(read_bytes(paths[0]), read_bytes(paths[1]), where=str(directory))

    @classmethod
    def from_hf_tokenizer_json(cls, path: str) -> "GPT2BPETokenizer":
        """From a Hugging Face `tokenizer.json` whose model is a byte-level BPE."""
        model = json.loads(read_bytes(path)).get("model") or {}
        if model.get("type") != "BPE" or "vocab" not in model:
            raise DataError(f"{path}: model.type={model.get('type')!r} is not a BPE vocabulary")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return cls(json.dumps(model["vocab"], ensure_ascii=False).encode("utf-8"),
                   ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"), where=path)

    # -- the Tokenizer interface ------------------------------------------------------------

    def _encoding(self) -> tuple[tiktoken.Encoding, np.ndarray]:
        """tiktoken's encoder over merge-order ranks, and the rank -> vocab id table."""
        if self._tiktoken is None:
            ranks: dict[bytes, int] = {}
            ids = []
            for token in sorted(self.byte_decoder, key=lambda c: self.encoder[c]):
                ranks[bytes([self.byte_decoder[token]])] = len(ranks)
                ids.append(self.encoder[token])
            for left, right in self.ranks:  # dict order = merge order
                token = left + right
                key = bytes(self.byte_decoder[c] for c in token)
                if key not in ranks:  # a token two merges make keeps the first one's rank
                    ranks[key] = len(ranks)
                    ids.append(self.encoder[token])
            special_rank = len(ranks)
            encoding = tiktoken.Encoding(f"gpt_jax-{self.fingerprint}", pat_str=GPT2_PATTERN,
                                         mergeable_ranks=ranks,
                                         special_tokens={END_OF_TEXT: special_rank})
            self._tiktoken = (encoding, np.asarray(ids + [self.eos_id], np.int64))
        return self._tiktoken

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        encoding, rank_to_id = self._encoding()
        ranks = encoding.encode_batch(list(texts), num_threads=num_threads, allowed_special="all")
        return [rank_to_id[np.asarray(r, np.int64)] for r in ranks]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens decode to their text, unknown ids are skipped."""
        out, pending = [], bytearray()
        for i in map(int, ids):
            token = self.decoder.get(i)
            if token is None:
                continue
            if token in self.specials:
                out.append(pending.decode("utf-8", errors="replace") + token)
                pending = bytearray()
            else:
                pending.extend(self.byte_decoder[c] for c in token)
        return "".join(out) + pending.decode("utf-8", errors="replace")

    @property
    def fingerprint(self) -> str:
        return digest("gpt2-bpe-v1", self.vocab_json, self.merges_txt)

    def save(self, directory: str) -> None:
        """vocab.json + merges.txt (as read), then tokenizer.json last (its presence = done)."""
        atomic_write(os.path.join(directory, VOCAB_FILE), self.vocab_json)
        atomic_write(os.path.join(directory, MERGES_FILE), self.merges_txt)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size,
                "fingerprint": self.fingerprint, "eos_token": END_OF_TEXT}
        atomic_write(os.path.join(directory, META_FILE), json.dumps(meta))

    def save_hf(self, directory: str) -> None:
        """The files a Hugging Face GPT-2 tokenizer loads from (no tokenizer.json)."""
        atomic_write(os.path.join(directory, VOCAB_FILE), self.vocab_json)
        atomic_write(os.path.join(directory, MERGES_FILE), self.merges_txt)


def load_dir(directory: str) -> GPT2BPETokenizer:
    """The tokenizer of a HF model directory: vocab.json + merges.txt, else tokenizer.json."""
    if exists(os.path.join(directory, VOCAB_FILE)):
        return GPT2BPETokenizer.from_files(directory)
    hf_json = os.path.join(directory, "tokenizer.json")
    if exists(hf_json):
        return GPT2BPETokenizer.from_hf_tokenizer_json(hf_json)
    raise DataFileNotFoundError(f"{directory} has no {VOCAB_FILE} + {MERGES_FILE} (nor a "
                                "Hugging Face tokenizer.json); copy them from the model's source")
