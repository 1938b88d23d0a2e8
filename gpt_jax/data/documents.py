"""A corpus as a fixed list of pieces, each of which streams its documents.

A piece is the unit of work of `gpt-jax prepare` and becomes one shard of the token store:
- `records`: records [start, stop) of one split of a TFDS corpus (`tfds`, `text_files`,
  `python_stdlib`; see `sources.py`), read through its ArrayRecord data source;
- `jsonl`: the lines of a `.jsonl` file that start in bytes [start, stop), or a whole
  `.jsonl.gz` / `.jsonl.zst` file (compressed streams cannot be entered in the middle);
- `parquet`: row group `start` of a Parquet file.
The list depends only on the files and `data.shard_mb` / `data.shard_docs`, never on how many
workers or hosts read it. Documents of `jsonl`/`parquet` pieces go to the validation split when
the hash of their key (`file@byte offset`, `file#group:row`) is below data.validation_fraction.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
from typing import Any, Iterator

import pyarrow.parquet as pq
import zstandard

from gpt_jax.data.files import DataError, DataFileNotFoundError, digest, filesystem, unit_hash

JSONL_EXTENSIONS = (".jsonl", ".jsonl.gz", ".jsonl.zst")  # in folders; named files may be .json
PARQUET_EXTENSIONS = (".parquet",)
FILE_SOURCES = {"jsonl": JSONL_EXTENSIONS, "parquet": PARQUET_EXTENSIONS}


@dataclasses.dataclass(frozen=True)
class Piece:
    kind: str  # records | jsonl | parquet
    path: str  # the file (URL or local), or the TFDS split name for `records`
    rel: str  # the file's name relative to the corpus root (document keys)
    start: int  # first byte / row group / record
    stop: int  # end byte / row group + 1 / end record
    split: str = ""  # the split of every document; "" = by the hash of each document's key
    size: int = 0  # input bytes (records: documents), for progress


@dataclasses.dataclass(frozen=True)
class FileInfo:
    path: str
    rel: str
    size: int
    version: str  # mtime / generation: changes when the file does


def list_files(paths: str, extensions: tuple[str, ...]) -> list[FileInfo]:
    """Every file that the comma-separated files, folders or globs in `paths` name, sorted."""
    entries = [p.strip() for p in paths.split(",") if p.strip()]
    if not entries:
        raise DataError("data.paths is empty; give comma-separated files, folders or globs "
                        "(local or gs://)")
    found: dict[str, tuple[Any, dict]] = {}
    for entry in entries:
        fs, inner = filesystem(entry)
        if any(c in inner for c in "*?["):
            matches = {p: i for p, i in fs.glob(inner, detail=True).items()
                       if i.get("type") == "file"}
            if not matches:
                raise DataFileNotFoundError(f"data.paths glob {entry!r} matches no files")
        elif fs.isdir(inner):
            matches = {p: i for p, i in fs.find(inner, detail=True).items()
                       if p.lower().endswith(extensions)}
            if not matches:
                raise DataError(f"data.paths folder {entry!r} has no files ending in "
                                f"{', '.join(extensions)}")
        elif fs.isfile(inner):
            matches = {inner: fs.info(inner)}
        else:
            raise DataFileNotFoundError(f"data.paths entry {entry!r} does not exist")
        found.update({fs.unstrip_protocol(p) if "://" in entry else p: (fs, i)
                      for p, i in matches.items()})
    names = sorted(found)
    try:
        root = os.path.dirname(names[0]) if len(names) == 1 else os.path.commonpath(names)
    except ValueError:
        raise DataError(f"data.paths={paths!r} mixes local and remote files; keep one kind "
                        "per corpus") from None
    return [FileInfo(name, os.path.relpath(name, root), int(info.get("size") or 0),
                     str(info.get("mtime") or info.get("updated") or info.get("generation")
                         or info.get("created") or ""))
            for name, (_, info) in sorted(found.items())]


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
            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
        else:
            stream = raw
        offset, number = piece.start, 1 if piece.start == 0 else 0
        if piece.start > 0:
            stream.seek(piece.start - 1)
            offset += len(stream.readline()) - 1  # the rest of the line that began before
        while piece.stop < 0 or offset < piece.stop:
            line = stream.readline()
            if not line:
                return
            yield offset, number, line
            offset += len(line)
            number += 1 if number else 0


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
        column = parquet.read_row_group(piece.start, columns=[field]).column(0)
        for row, text in enumerate(column.to_pylist()):
            if text is not None:
                yield f"{piece.rel}#{piece.start}:{row}", text


def _record_texts(piece: Piece, corpus) -> Iterator[str]:
    yield from corpus.texts(piece.path, start=piece.start, stop=piece.stop)


def piece_documents(piece: Piece, d, corpus=None) -> Iterator[tuple[str, str]]:
    """(split, text) of each document of `piece`, in order. `d` is config.data."""
    if piece.kind == "records":
        for text in _record_texts(piece, corpus):
            yield piece.split, text
        return
    read = _parquet_texts if piece.kind == "parquet" else _jsonl_texts
    for key, text in read(piece, d.text_field):
        yield split_of(key, d.validation_fraction), text


def split_texts(d, split: str = "train") -> Iterator[str]:
    """The documents of `split` ("train" or "validation"), in order: what a tokenizer is
    trained on ("train"), what a cloze task is made from ("validation")."""
    if d.source not in FILE_SOURCES:
        from gpt_jax.data.sources import open_corpus  # TFDS: imported for TFDS-backed sources

        yield from open_corpus(d).texts(d.train_split if split == "train" else d.eval_split)
        return
    files = list_files(d.paths, FILE_SOURCES[d.source])
    for piece in file_pieces(d.source, files, int(d.shard_mb * 2 ** 20)):
        yield from (text for s, text in piece_documents(piece, d) if s == split)


def fingerprint(files: list[FileInfo], settings: dict) -> str:
    return digest(json.dumps(settings, sort_keys=True),
                  *(f"{f.rel}\0{f.size}\0{f.version}" for f in files))
