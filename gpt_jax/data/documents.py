"""Every corpus as a fixed list of pieces, each of which streams its documents.

A piece is the unit of work of `gpt-jax prepare` and becomes one shard of the token store:
- `text`: up to data.shard_docs text files of one split (`text_files`, `python_stdlib`); a
  corpus of one file is cut at a line boundary (head: train, tail: validation);
- `jsonl`: the lines of a `.jsonl` file that start in bytes [start, stop), or a whole
  `.jsonl.gz` / `.jsonl.zst` file (compressed streams cannot be entered in the middle);
- `parquet`: row group `start` of a Parquet file;
- `records`: records [start, stop) of one split of a TFDS dataset (`tfds`; see `tfds_source.py`);
- `sft`: the prompt/response pairs of one JSONL file that belong to one split (`sft_jsonl`).
The list depends only on the files and data.shard_mb / data.shard_docs, never on how many
workers or hosts read it. Splits: text files by the hash of their relative path, JSONL/Parquet
documents by the hash of their key (`file@byte offset`, `file#group:row`), SFT pairs by the hash
of their prompt (or data.sft_eval_paths as the held-out files). The text files of a split are
read in the order of an md5 of (split, `rel:part`): the order the TFDS builders this route
replaced gave them, so that a store of the same files holds the same tokens as before.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import platform
import sysconfig
import zlib
from typing import Any, Iterator

import pyarrow.parquet as pq
import zstandard
from absl import logging

from gpt_jax.data.config import SPLITS, DataConfig
from gpt_jax.data.files import FileInfo, digest, filesystem, json_objects, list_files, unit_hash
from gpt_jax.errors import DataError

JSONL_EXTENSIONS = (".jsonl", ".jsonl.gz", ".jsonl.zst")  # in folders; named files may be .json
PARQUET_EXTENSIONS = (".parquet",)
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


@dataclasses.dataclass(frozen=True)
class Piece:
    kind: str  # text | jsonl | parquet | records | sft
    path: str  # the file (URL or local); records: the TFDS split
    rel: str  # the file's name relative to the corpus root (document keys)
    start: int  # first byte / row group / record
    stop: int  # end byte / row group + 1 / end record
    split: str = ""  # the store split of every document; "" = by the hash of each one's key
    size: int = 0  # input bytes (records: documents), for progress
    docs: tuple = ()  # text: (path, rel, part) of its files; sft: the source split it takes


@dataclasses.dataclass(frozen=True)
class Plan:
    """A corpus: its name, a fingerprint of its files and settings, and its pieces."""
    corpus: str
    fingerprint: str
    metadata: dict
    pieces: list[Piece]


@dataclasses.dataclass(frozen=True)
class Pair:
    """One SFT example as read: the model answers `prompt` with `response`."""
    prompt: str
    response: str
    line: int  # of its file, for error messages


def store_splits(d: DataConfig) -> tuple[tuple[str, str], ...]:
    """(store split, source split) pairs: the store's train and validation splits are the
    source's data.train_split and data.eval_split."""
    return (("train", d.train_split), ("validation", d.eval_split))


# -- text files and the standard library ---------------------------------------------------

def _extensions(spec: str) -> tuple[str, ...]:
    return tuple(e if e.startswith(".") else f".{e}" for e in
                 (x.strip().lower() for x in spec.split(",")) if e)


def text_files(d: DataConfig) -> tuple[str, list[FileInfo], dict]:
    """(corpus name, files, metadata) of a text_files or python_stdlib corpus."""
    if d.source == "python_stdlib":
        root = sysconfig.get_paths()["stdlib"]
        skip = STDLIB_SKIP_DIRS | (frozenset() if d.include_tests else STDLIB_TEST_DIRS)
        files = list_files(root, (".py",), what="the standard library", skip_dirs=skip,
                           root=root)
        meta = {"python_version": platform.python_version(),
                "python_implementation": platform.python_implementation(),
                "include_tests": bool(d.include_tests)}
    else:
        files = list_files(d.paths, _extensions(d.extensions))
        meta = {"paths": d.paths}
    if d.max_files > 0:
        files = files[:d.max_files]
    if not files:
        raise DataError("the corpus is empty: no files to read")
    return d.source, files, dict(meta, num_files=len(files),
                                 validation_fraction=d.validation_fraction)


def split_files(files: list[FileInfo], fraction: float) -> dict[str, list[tuple[FileInfo, str]]]:
    """(file, part) per split, by the hash of each relative path; both splits non-empty.

    One file is cut at a line boundary instead (part "head": train, "tail": validation).
    """
    if len(files) == 1:
        return {"train": [(files[0], "head")], "validation": [(files[0], "tail")]}
    ranked = sorted(files, key=lambda f: unit_hash(f.rel))
    n_val = min(max(sum(unit_hash(f.rel) < fraction for f in files), 1), len(files) - 1)
    held_out = {f.rel for f in ranked[:n_val]}
    return {split: [(f, "all") for f in files if (f.rel in held_out) == (split == "validation")]
            for split in SPLITS}


def _order_key(split: str, key: str) -> int:
    """The md5 of (split, key) that TFDS sorted a split's records by."""
    return int(hashlib.md5(split.encode() + key.replace("\\", "/").encode()).hexdigest(), 16)


def _text_pieces(d: DataConfig, files: list[FileInfo]) -> list[Piece]:
    by_split = split_files(files, d.validation_fraction)
    pieces = []
    for store_split, source_split in store_splits(d):
        docs = sorted(by_split[source_split],
                      key=lambda fp: _order_key(source_split, f"{fp[0].rel}:{fp[1]}"))
        for lo in range(0, len(docs), d.shard_docs):
            chunk = docs[lo:lo + d.shard_docs]
            pieces.append(Piece("text", "", "", lo, lo + len(chunk), store_split,
                                sum(f.size for f, _ in chunk),
                                tuple((f.path, f.rel, part) for f, part in chunk)))
    return pieces


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Text with invalid UTF-8 replaced by U+FFFD, and how many replacements were made."""
    text = raw.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))


def read_text(path: str, part: str, fraction: float) -> tuple[str, int]:
    """One text document (a whole file, or its head or tail) and its UTF-8 replacements."""
    fs, inner = filesystem(path)
    try:
        text, bad = decode_utf8(fs.cat_file(inner))
    except OSError as e:
        raise DataError(f"cannot read {path!r}: {e.strerror or e}") from e
    if part == "all":
        return text, bad
    cut = int(len(text) * (1.0 - fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return (text[:cut] if part == "head" else text[cut:]), bad


def _text_documents(piece: Piece, d: DataConfig) -> Iterator[tuple[str, str]]:
    bad_files = total = 0
    for path, _, part in piece.docs:
        text, bad = read_text(path, part, d.validation_fraction)
        if bad:
            bad_files, total = bad_files + 1, total + bad
            if bad_files <= 5:
                logging.warning("%s: %d invalid UTF-8 byte sequences replaced by U+FFFD",
                                path, bad)
        yield piece.split, text
    if total:
        logging.warning("%s split: replaced %d invalid UTF-8 sequences in %d files",
                        piece.split, total, bad_files)


# -- JSONL and Parquet ---------------------------------------------------------------------

def file_pieces(source: str, files: list[FileInfo], shard_bytes: int) -> list[Piece]:
    """The pieces of `jsonl` / `parquet` files (see the module docstring)."""
    pieces = []
    for f in files:
        if source == "parquet":
            fs, inner = filesystem(f.path)
            try:
                with fs.open(inner, "rb") as handle:
                    meta = pq.ParquetFile(handle).metadata
            except Exception as e:  # pyarrow raises its own error types
                raise DataError(f"{f.path}: not a Parquet file ({str(e).splitlines()[0]})") from None
            pieces += [Piece("parquet", f.path, f.rel, g, g + 1,
                             size=meta.row_group(g).total_byte_size)
                       for g in range(meta.num_row_groups)]
        elif f.path.endswith((".gz", ".zst")):
            pieces.append(Piece("jsonl", f.path, f.rel, 0, -1, size=f.size))
        else:
            pieces += [Piece("jsonl", f.path, f.rel, lo, min(lo + shard_bytes, f.size),
                             size=min(shard_bytes, f.size - lo))
                       for lo in range(0, f.size, shard_bytes)]
    return pieces


def split_of(key: str, validation_fraction: float) -> str:
    return "validation" if unit_hash(key) < validation_fraction else "train"


def _line_number(path: str, offset: int) -> int:
    """1-based line of byte `offset` of an uncompressed file (only for error messages)."""
    fs, inner = filesystem(path)
    with fs.open(inner, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def _open_lines(piece: Piece) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, line number or 0 if unknown, line) of the lines that start in the piece."""
    fs, inner = filesystem(piece.path)
    with fs.open(inner, "rb") as raw:
        if piece.path.endswith(".gz"):
            stream: Any = gzip.GzipFile(fileobj=raw)
        elif piece.path.endswith(".zst"):
            stream = io.BufferedReader(_ZstdReader(raw))
        else:
            stream = raw
        offset, number = piece.start, 1 if piece.start == 0 else 0
        if piece.start > 0:
            stream.seek(piece.start - 1)
            offset += len(stream.readline()) - 1  # the rest of the line that began before
        while piece.stop < 0 or offset < piece.stop:
            try:
                line = stream.readline()
            except Exception as e:  # noqa: BLE001 -- any failed read (remote file systems
                raise _cut_short(piece.path, offset, number, e) from None  # raise their own)
            if not line:
                return
            yield offset, number, line
            offset += len(line)
            number += 1 if number else 0


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file's frames, raising ZstdError where the file ends
    inside a frame (zstandard's stream_reader ends there silently)."""

    def __init__(self, raw):
        self.raw, self.frame, self.pending = raw, zstandard.ZstdDecompressor().decompressobj(), b""
        self.started = False  # whether the current frame has any input yet

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if self.started and not self.frame.eof:
                    raise zstandard.ZstdError("the file ends inside a zstd frame")
                return 0
            while chunk:
                self.started = True
                self.pending += self.frame.decompress(chunk)
                chunk = b""
                if self.frame.eof:  # the next frame starts in what this one left over
                    chunk, self.frame = self.frame.unused_data, \
                        zstandard.ZstdDecompressor().decompressobj()
                    self.started = False
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n


def _cut_short(path: str, offset: int, number: int, error: BaseException) -> DataError:
    """The one-line error of a file whose reading failed part-way: truncated, damaged, or a
    remote read that broke off."""
    compressed = path.endswith((".gz", ".zst"))
    where = ("in its first block" if offset == 0 else
             f"after line {number - 1} (byte {offset:,} of its text)" if number else
             f"at byte {offset:,} of its text")
    what = ("ends early or is damaged" if compressed and isinstance(
        error, (EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile))
        else "could not be read to the end")
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DataError(f"{path} {what} {where} ({detail}); download or copy it again")


def _jsonl_texts(piece: Piece, field: str) -> Iterator[tuple[str, str]]:
    for offset, number, line in _open_lines(piece):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            record = e
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            where = f"{piece.path}:{number or _line_number(piece.path, offset)}"
            raise DataError(f"{where}: {_what_is_wrong(record, field)}")
        yield f"{piece.rel}@{offset}", text


def _what_is_wrong(record: Any, field: str) -> str:
    if isinstance(record, UnicodeDecodeError):
        return "the line is not UTF-8 text"
    if isinstance(record, ValueError):
        return f"not a JSON object ({record.args[0].split(':')[0]})"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object with a {field!r} field"
    if field in record:
        return f"field {field!r} is a {type(record[field]).__name__}, not a string"
    return f"no {field!r} field (has: {', '.join(sorted(record))}); set data.text_field"


def _parquet_texts(piece: Piece, field: str) -> Iterator[tuple[str, str]]:
    fs, inner = filesystem(piece.path)
    with fs.open(inner, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        if field not in parquet.schema_arrow.names:
            raise DataError(f"{piece.path}: no column {field!r} (has: "
                            f"{', '.join(parquet.schema_arrow.names)}); set data.text_field")
        try:
            column = parquet.read_row_group(piece.start, columns=[field]).column(0)
        except Exception as e:  # noqa: BLE001 -- pyarrow raises its own error types
            raise DataError(f"{piece.path}: row group {piece.start} cannot be read "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            "the file is damaged or cut short; download or copy it again"
                            ) from None
        for row, text in enumerate(column.to_pylist()):
            if text is not None:
                yield f"{piece.rel}#{piece.start}:{row}", text


# -- SFT pairs -----------------------------------------------------------------------------

def read_pairs(path: str, prompt_field: str = "prompt",
               response_field: str = "response") -> Iterator[Pair]:
    """The pairs of one JSONL file; a bad line raises DataError naming the file and line."""
    for where, obj in json_objects(path):
        for field in (prompt_field, response_field):
            if not isinstance(obj.get(field), str):
                problem = "has no" if field not in obj else "has a non-string"
                raise DataError(f"{where}: {problem} {field!r} field (needs {prompt_field!r} "
                                f"and {response_field!r} strings)")
        yield Pair(obj[prompt_field], obj[response_field], int(where.rsplit(":", 1)[1]))


def _sft_pieces(d: DataConfig) -> tuple[list[FileInfo], list[Piece]]:
    """A piece per (file, store split): data.paths' pairs split by the hash of the prompt, or
    all of them for training and data.sft_eval_paths held out."""
    files = list_files(d.paths, (".jsonl", ".json"))
    held_out = list_files(d.sft_eval_paths, (".jsonl", ".json"), what="data.sft_eval_paths") \
        if d.sft_eval_paths else []
    pieces = []
    for store_split, source_split in store_splits(d):
        if held_out:
            chosen = files if source_split == "train" else held_out
            pieces += [Piece("sft", f.path, f.rel, 0, -1, store_split, f.size, ("all",))
                       for f in chosen]
        else:
            pieces += [Piece("sft", f.path, f.rel, 0, -1, store_split, f.size, (source_split,))
                       for f in files]
    return files + held_out, pieces


def _sft_documents(piece: Piece, d: DataConfig) -> Iterator[tuple[str, Pair]]:
    take = piece.docs[0]
    for pair in read_pairs(piece.path, d.prompt_field, d.response_field):
        if take == "all" or split_of(pair.prompt, d.validation_fraction) == take:
            yield piece.split, pair


# -- every source --------------------------------------------------------------------------

def fingerprint(files: list[FileInfo], settings: dict) -> str:
    return digest(json.dumps(settings, sort_keys=True),
                  *(f"{f.rel}\0{f.size}\0{f.version}" for f in files))


def plan(d: DataConfig, tfds_corpus=None) -> Plan:
    """The pieces of the corpus `d` names. A `tfds` corpus comes opened (`tfds_source`)."""
    if d.source in ("text_files", "python_stdlib"):
        name, files, meta = text_files(d)
        settings = {"source": d.source, "validation_fraction": d.validation_fraction,
                    "splits": store_splits(d), **meta}
        return Plan(name, fingerprint(files, settings), meta, _text_pieces(d, files))
    if d.source in ("jsonl", "parquet"):
        extensions = JSONL_EXTENSIONS if d.source == "jsonl" else PARQUET_EXTENSIONS
        files = list_files(d.paths, extensions)
        settings = {"source": d.source, "text_field": d.text_field,
                    "validation_fraction": d.validation_fraction}
        return Plan(d.source, fingerprint(files, settings),
                    dict(settings, num_files=len(files), paths=d.paths),
                    file_pieces(d.source, files, int(d.shard_mb * 2 ** 20)))
    if d.source == "sft_jsonl":
        files, pieces = _sft_pieces(d)
        settings = {"source": d.source, "fields": [d.prompt_field, d.response_field],
                    "validation_fraction": d.validation_fraction, "splits": store_splits(d),
                    "held_out": d.sft_eval_paths}
        return Plan("sft", fingerprint(files, settings),
                    dict(settings, num_files=len(files), paths=d.paths), pieces)
    if d.source == "tfds":
        corpus = tfds_corpus
        pieces = []
        for store_split, source_split in store_splits(d):
            n = len(corpus.split(source_split))
            pieces += [Piece("records", source_split, source_split, lo,
                             min(lo + d.shard_docs, n), store_split, min(d.shard_docs, n - lo))
                       for lo in range(0, n, d.shard_docs)]
        return Plan(corpus.name, corpus.fingerprint, corpus.metadata, pieces)
    raise DataError(f"data.source={d.source!r} is not a known source")


def piece_documents(piece: Piece, d: DataConfig, tfds_corpus=None) -> Iterator[tuple[str, Any]]:
    """(store split, document) of each document of `piece`, in order: text (a str), or a
    `Pair` for `sft` pieces."""
    if piece.kind == "text":
        yield from _text_documents(piece, d)
    elif piece.kind == "sft":
        yield from _sft_documents(piece, d)
    elif piece.kind == "records":
        for text in tfds_corpus.texts(piece.path, start=piece.start, stop=piece.stop):
            yield piece.split, text
    else:
        read = _parquet_texts if piece.kind == "parquet" else _jsonl_texts
        for key, text in read(piece, d.text_field):
            yield split_of(key, d.validation_fraction), text


def split_texts(d: DataConfig, split: str = "train", tfds_corpus=None) -> Iterator[str]:
    """The text of the store split `split` ("train" or "validation"), document by document,
    in order: what a tokenizer is trained on ("train"), what a cloze task is made from
    ("validation"). An SFT pair gives its prompt, then its response."""
    for piece in plan(d, tfds_corpus).pieces:
        if piece.split and piece.split != split:
            continue
        for s, doc in piece_documents(piece, d, tfds_corpus):
            if s == split:
                yield from ((doc.prompt, doc.response) if isinstance(doc, Pair) else (doc,))
