"""Tokenizers: SentencePiece (trained here or loaded), byte-level and character-level.

Each one saves itself into `<workdir>/tokenizer/` (`tokenizer.json`, plus `spm.model` for
SentencePiece), so that sampling from a run needs nothing else. `tokenizer.json` is written last,
atomically: its presence means the directory is complete.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from absl import logging

from gpt_jax.data.config import DataConfig
from gpt_jax.data.documents import split_texts
from gpt_jax.data.files import atomic_write, digest, exists, read_bytes, read_json, store_paths
from gpt_jax.data.gpt2_bpe import GPT2BPETokenizer, load_dir
from gpt_jax.data.tokenizer_base import META_FILE, TOKENIZER_DIR, Tokenizer
from gpt_jax.errors import DataError, DataFileNotFoundError

SPM_FILE = "spm.model"
MAX_SPM_LINE = 4096  # bytes; SentencePiece skips longer training "sentences"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then pad, bos, eos (vocab 259)."""
    kind = "byte"
    vocab_size, pad_id, bos_id, eos_id = 259, 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in map(int, ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    @property
    def fingerprint(self) -> str:
        return digest("byte-v1")

    def save(self, directory: str) -> None:
        atomic_write(os.path.join(directory, META_FILE), json.dumps(self._meta()))

    def _meta(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}


class CharTokenizer(Tokenizer):
    """One id per character seen in the corpus: pad 0, bos 1, eos 2, unk 3, then the characters."""
    kind = "char"
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    num_special = 4

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise DataError("the char tokenizer found no characters: the training split is empty")
        self.vocab_size = self.num_special + len(self.chars)
        self._codepoints = np.array([ord(c) for c in self.chars], np.int64)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(seen))

    def _encode_np(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
        pos = np.searchsorted(self._codepoints, cps).clip(0, len(self._codepoints) - 1)
        known = self._codepoints[pos] == cps
        return np.where(known, pos + self.num_special, self.unk_id)

    def encode(self, text: str) -> list[int]:
        return self._encode_np(text).tolist()

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        return [self._encode_np(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        n = self.num_special
        return "".join(self.chars[i - n] if i >= n else ("\ufffd" if i == self.unk_id else "")
                       for i in map(int, ids) if 0 <= i < self.vocab_size)

    @property
    def fingerprint(self) -> str:
        return digest("char-v1", self.chars)

    def save(self, directory: str) -> None:
        meta = {"kind": self.kind, "vocab_size": self.vocab_size,
                "fingerprint": self.fingerprint, "chars": self.chars}
        atomic_write(os.path.join(directory, META_FILE), json.dumps(meta, ensure_ascii=True))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (BPE or unigram); text round-trips exactly (identity normaliser)."""
    kind = "sentencepiece"

    def __init__(self, model_bytes: bytes):
        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise DataError("the SentencePiece model has no eos id (eos_id=-1); train it with one")
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else self.eos_id
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        ids = self.sp.encode(list(texts), num_threads=num_threads)
        return [np.asarray(x, np.int64) for x in ids]

    def decode(self, ids: Iterable[int]) -> str:
        specials = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([i for i in map(int, ids) if i not in specials])

    @property
    def fingerprint(self) -> str:
        return digest("spm-v1", self.model_bytes)

    def save(self, directory: str) -> None:
        atomic_write(os.path.join(directory, SPM_FILE), self.model_bytes)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}
        atomic_write(os.path.join(directory, META_FILE), json.dumps(meta))


def special_tokens(spec: str) -> list[str]:
    """The comma-separated `data.spm_special_tokens` as a list (e.g. '<|im_start|>,<|im_end|>')."""
    return [s.strip() for s in spec.split(",") if s.strip()]


def _training_lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Lines (newline kept) of the first `max_bytes` of text, each under MAX_SPM_LINE bytes."""
    used = 0
    for text in texts:
        for line in text.splitlines(keepends=True):
            while line:
                piece, line = line[:MAX_SPM_LINE // 4], line[MAX_SPM_LINE // 4:]
                yield piece
                used += len(piece.encode("utf-8"))
                if used >= max_bytes:
                    return


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
                        max_bytes: int = 4_000_000, specials: Sequence[str] = (),
                        byte_fallback: bool = True) -> SentencePieceTokenizer:
    """Train on (at most `max_bytes` of) `texts`: unk 0, bos 1, eos 2, pad 3, then `specials`."""
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"data.spm_type={model_type!r} is not one of bpe, unigram")
    minimum = 4 + len(specials) + (256 if byte_fallback else 0) + 1
    if vocab_size < minimum:
        raise DataError(f"model.vocab_size={vocab_size} is below the {minimum} that a "
                        "SentencePiece model with byte fallback and these specials needs")
    model = io.BytesIO()
    start = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, max_bytes), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
            character_coverage=0.9995 if byte_fallback else 1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=list(specials),
            max_sentence_length=MAX_SPM_LINE, num_threads=os.cpu_count() or 1,
            hard_vocab_limit=True, minloglevel=2)
    except RuntimeError as e:
        found = re.search(r"value <= (\d+)", str(e))
        if found:
            raise DataError(f"model.vocab_size={vocab_size} is larger than the training text "
                            f"supports (at most {found.group(1)}); lower it or add text "
                            "(data.paths, data.spm_sample_bytes)") from None
        if "Vocabulary size is smaller than required_chars" in str(e) or "empty" in str(e):
            raise DataError(f"cannot train a {vocab_size}-piece SentencePiece model on this "
                            f"text: {str(e).splitlines()[0]}") from None
        raise
    logging.info("Trained a %d-piece SentencePiece %s model in %.1fs", vocab_size, model_type,
                 time.time() - start)
    return SentencePieceTokenizer(model.getvalue())


def load_sentencepiece(path: str) -> SentencePieceTokenizer:
    if not exists(path):
        raise DataFileNotFoundError(f"data.spm_model={path!r} does not exist")
    data = read_bytes(path)
    try:
        return SentencePieceTokenizer(data)
    except RuntimeError as e:
        raise DataError(f"data.spm_model={path!r} is not a SentencePiece model: "
                        f"{str(e).splitlines()[0]}") from None


def tokenizer_dir(workdir: str) -> str:
    return os.path.join(workdir, TOKENIZER_DIR)


def is_saved(workdir: str) -> bool:
    return exists(os.path.join(tokenizer_dir(workdir), META_FILE))


# kind -> how to load the saved tokenizer from its directory and tokenizer.json
LOADERS = {
    "sentencepiece": lambda directory, meta: SentencePieceTokenizer(
        read_bytes(os.path.join(directory, SPM_FILE))),
    "byte": lambda directory, meta: ByteTokenizer(),
    "char": lambda directory, meta: CharTokenizer(meta["chars"]),
    "gpt2_bpe": lambda directory, meta: GPT2BPETokenizer.from_files(directory),
}


def load_tokenizer(workdir: str) -> Tokenizer:
    """The tokenizer saved with the run in `workdir` (nothing else needed)."""
    directory = tokenizer_dir(workdir)
    meta = read_json(os.path.join(directory, META_FILE))
    if meta is None:
        raise DataFileNotFoundError(f"no tokenizer in {directory!r} ({META_FILE} is missing); "
                                    "is this a gpt_jax run directory?")
    kind = meta.get("kind")
    if kind not in LOADERS:
        raise DataError(f"{directory}/{META_FILE}: kind={kind!r} is not one of "
                        f"{', '.join(LOADERS)}")
    tok = LOADERS[kind](directory, meta)
    if meta.get("fingerprint") != tok.fingerprint:
        raise DataError(f"{directory}: tokenizer files do not match {META_FILE} "
                        f"(fingerprint {tok.fingerprint} != {meta.get('fingerprint')})")
    return tok


def ready_tokenizer(d: DataConfig) -> Tokenizer | None:
    """The tokenizer data config `d` names when it needs no training (else None).

    With data.store, the run takes the (first) store's tokenizer.
    """
    if d.store:
        return load_tokenizer(store_paths(d.store)[0][0])
    if d.tokenizer == "byte":
        return ByteTokenizer()
    if d.tokenizer == "gpt2_bpe":  # GPT-2's files (vocab.json + merges.txt), never trained here
        if not d.bpe_dir:
            raise DataError("data.tokenizer='gpt2_bpe' needs data.bpe_dir (a folder with "
                            "vocab.json + merges.txt) or train.init_from=<converted run>")
        return load_dir(os.path.expanduser(d.bpe_dir))
    if d.tokenizer == "sentencepiece" and d.spm_model:
        return load_sentencepiece(os.path.expanduser(d.spm_model))
    return None


def train_tokenizer(d: DataConfig, vocab_size: int, tfds_corpus=None) -> Tokenizer:
    """The tokenizer data config `d` asks for, trained on its training split: the characters
    it holds (char), or a `vocab_size`-piece SentencePiece model."""
    texts = split_texts(d, "train", tfds_corpus)
    if d.tokenizer == "char":
        return CharTokenizer.from_texts(texts)
    if d.tokenizer == "sentencepiece":
        return train_sentencepiece(texts, vocab_size, d.spm_type, d.spm_sample_bytes,
                                   special_tokens(d.spm_special_tokens), d.spm_byte_fallback)
    raise DataError(f"data.tokenizer={d.tokenizer!r} is not one of {', '.join(LOADERS)}")


def build_tokenizer(d: DataConfig, vocab_size: int, workdir: str, process_index: int = 0,
                    timeout_s: float = 7200.0, tfds_corpus=None) -> Tokenizer:
    """The tokenizer saved in <workdir>/tokenizer/, else the one `d` names: ready-made or
    trained (`train_tokenizer`), then saved there.

    Only process 0 builds (trains) it; the others wait for its atomic publish in `workdir`,
    which must therefore be shared by all processes (as checkpoints are).
    """
    if not is_saved(workdir) and process_index == 0:
        tok = ready_tokenizer(d) or train_tokenizer(d, vocab_size, tfds_corpus)
        tok.save(tokenizer_dir(workdir))
        logging.info("Saved the %s tokenizer (vocab %d) to %s", tok.kind, tok.vocab_size,
                     tokenizer_dir(workdir))
    deadline = time.time() + timeout_s
    while not is_saved(workdir):
        if time.time() > deadline:
            raise DataError(f"process {process_index}: no tokenizer appeared in "
                            f"{tokenizer_dir(workdir)} within {timeout_s:.0f}s")
        time.sleep(0.5)
    tok = load_tokenizer(workdir)
    if tok.kind != d.tokenizer and not d.store:
        raise DataError(f"{tokenizer_dir(workdir)} holds a {tok.kind} tokenizer but "
                        f"data.tokenizer={d.tokenizer!r}; use a new workdir")
    return tok
