"""Text corpora as TFDS data sources (ArrayRecord, no TensorFlow): files, the stdlib, TFDS names.

`open_corpus(config)` returns a `Corpus` whose splits are random-access sequences of documents.
`text_files` and `python_stdlib` are real TFDS builders; their config name is a fingerprint of the
file list (paths, sizes, mtimes, Python version), so any change prepares a fresh copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import glob
import hashlib
import json
import logging as py_logging
import os
import platform
import re
import sysconfig
import time
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds
from absl import logging

from gpt_jax.data.files import (DataError, DataFileNotFoundError, build_once, cache_root,
                                unit_hash)

OWN_SPLITS = ("train", "validation")
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}


@dataclasses.dataclass(frozen=True)
class Doc:
    """One document of a split: a file, or the head/tail of the only file of a corpus."""
    path: str  # absolute
    rel: str  # recorded relative path (decides the split)
    part: str = "all"  # all | head | tail


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Text with invalid UTF-8 replaced by U+FFFD, and how many replacements were made."""
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))
    return text, bad


def _extensions(spec: str) -> tuple[str, ...]:
    return tuple(e if e.startswith(".") else f".{e}" for e in
                 (x.strip().lower() for x in spec.split(",")) if e)


def _walk(root: str, extensions: tuple[str, ...], skip_dirs: set[str]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in filenames
                  if f.lower().endswith(extensions) and not f.startswith(".")]
    return found


def resolve_text_files(paths: str, extensions: str) -> list[tuple[str, str]]:
    """(absolute path, relative name) of every file that `paths` names, sorted.

    `paths` is comma-separated; each entry is a file, a directory (walked for `extensions`) or a
    glob (`**` allowed). Relative names are taken from the common parent, so moving the corpus
    keeps the split.
    """
    entries = [p.strip() for p in paths.split(",") if p.strip()]
    if not entries:
        raise DataError("data.paths is empty; give comma-separated files, directories or globs")
    exts = _extensions(extensions)
    found: set[str] = set()
    for entry in entries:
        entry = os.path.expanduser(entry)
        if glob.has_magic(entry):
            matches = [m for m in glob.glob(entry, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise DataFileNotFoundError(f"data.paths glob {entry!r} matches no files")
            found.update(os.path.abspath(m) for m in matches)
        elif os.path.isdir(entry):
            files = _walk(entry, exts, set())
            if not files:
                raise DataError(f"data.paths directory {entry!r} has no files ending in "
                                f"{', '.join(exts)} (data.extensions)")
            found.update(os.path.abspath(f) for f in files)
        elif os.path.isfile(entry):
            found.add(os.path.abspath(entry))
        else:
            raise DataFileNotFoundError(f"data.paths entry {entry!r} does not exist")
    files = sorted(found)
    root = os.path.dirname(files[0]) if len(files) == 1 else os.path.commonpath(files)
    return [(f, os.path.relpath(f, root)) for f in files]


def stdlib_files(include_tests: bool) -> list[tuple[str, str]]:
    """The running interpreter's standard library `.py` files (absolute, relative), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    skip = STDLIB_SKIP_DIRS | (set() if include_tests else STDLIB_TEST_DIRS)
    files = sorted(_walk(root, (".py",), skip))
    return [(f, os.path.relpath(f, root)) for f in files]


def split_docs(files: list[tuple[str, str]], validation_fraction: float) -> dict[str, list[Doc]]:
    """Deterministic train/validation split by the hash of each relative path.

    A single file is cut at a line boundary instead (head: train, tail: validation). With
    several files both splits are kept non-empty.
    """
    if not files:
        raise DataError("the corpus is empty: no files to read")
    if len(files) == 1:
        (path, rel), = files
        return {"train": [Doc(path, rel, "head")], "validation": [Doc(path, rel, "tail")]}
    ranked = sorted(files, key=lambda f: unit_hash(f[1]))
    n_val = sum(unit_hash(rel) < validation_fraction for _, rel in files)
    n_val = min(max(n_val, 1), len(files) - 1)
    val = {rel for _, rel in ranked[:n_val]}
    docs = {s: [] for s in OWN_SPLITS}
    for path, rel in files:
        docs["validation" if rel in val else "train"].append(Doc(path, rel))
    return docs


def _read_doc(doc: Doc, validation_fraction: float) -> tuple[str, int]:
    try:
        with open(doc.path, "rb") as f:
            text, bad = decode_utf8(f.read())
    except OSError as e:
        raise DataFileNotFoundError(f"cannot read {doc.path!r}: {e.strerror}") from e
    if doc.part == "all":
        return text, bad
    cut = int(len(text) * (1.0 - validation_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return (text[:cut] if doc.part == "head" else text[cut:]), bad


def _fingerprint(files: list[tuple[str, str]], extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for path, rel in files:
        st = os.stat(path)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local text files as a TFDS dataset: features {text, path}; splits train/validation."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    code_path = None  # no checksums or metadata files beside the code (and no importlib_resources)

    def __init__(self, *, docs: dict[str, list[Doc]], validation_fraction: float,
                 metadata: dict, fingerprint: str, **kwargs: Any):
        self._docs, self._fraction, self._meta = docs, validation_fraction, metadata
        config = tfds.core.BuilderConfig(name=f"f{fingerprint}", description=json.dumps(metadata))
        super().__init__(config=config, file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                                 "path": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict(self._meta))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in OWN_SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        total_bad, bad_files = 0, 0
        for doc in self._docs[split]:
            text, bad = _read_doc(doc, self._fraction)
            if bad:
                total_bad, bad_files = total_bad + bad, bad_files + 1
                if bad_files <= 5:
                    logging.warning("%s: %d invalid UTF-8 byte sequences replaced by U+FFFD",
                                    doc.path, bad)
            yield f"{doc.rel}:{doc.part}", {"text": text, "path": doc.rel}
        if total_bad:
            logging.warning("%s split: replaced %d invalid UTF-8 sequences in %d files",
                            split, total_bad, bad_files)


class PythonStdlib(TextFiles, skip_registration=True):
    """The `.py` files of the running Python's standard library; metadata has its version."""


@dataclasses.dataclass
class Corpus:
    """A prepared corpus: `split(name)` is a random-access sequence of records."""
    name: str
    fingerprint: str
    text_field: str
    metadata: dict
    builder: Any
    splits: tuple[str, ...] = ()  # known split names (empty: not known in advance)

    def split(self, name: str) -> Sequence:
        base = re.match(r"[\w-]+", name)
        if self.splits and (base is None or base.group(0) not in self.splits):
            raise DataError(f"split {name!r} is not in {self.name}; available: "
                            f"{', '.join(self.splits)}")
        return self.builder.as_data_source(split=name)

    def texts(self, split: str, chunk: int = 256, start: int = 0,
              stop: int | None = None) -> Iterator[str]:
        """Documents [start, stop) of `split` as text, in the data source's (fixed) order."""
        source = self.split(split)
        stop = len(source) if stop is None else min(stop, len(source))
        for first in range(start, stop, chunk):
            ids = list(range(first, min(first + chunk, stop)))
            try:
                records = source.__getitems__(ids)
            except (AttributeError, TypeError):  # no batched reads (e.g. under mock_data)
                records = [source[i] for i in ids]
            for record in records:
                value = record[self.text_field]
                yield decode_utf8(value)[0] if isinstance(value, bytes) else str(value)


class _DropTfdsNoise(py_logging.Filter):
    NOISE = ("Using custom data configuration", "Variant folder")

    def filter(self, record: py_logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


@contextlib.contextmanager
def _quiet_tfds(builder=None):
    """Hide TFDS's warnings about our (intentionally) unregistered builder configs.

    With a builder, also its "Downloading and preparing" banner and progress bars (our local
    builders download nothing).
    """
    logger, noise = py_logging.getLogger("absl"), _DropTfdsNoise()
    logger.addFilter(noise)
    quiet = builder is not None
    bars_were_on = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    if quiet:
        builder._log_download_bytes = builder._log_download_done = lambda: None
        tfds.display_progress_bar(False)
    try:
        yield
    finally:
        logger.removeFilter(noise)
        if quiet:
            tfds.display_progress_bar(bars_were_on)


def _default_data_dir() -> str:
    return os.path.join(cache_root(), "tfds")


def _prepare(builder, what: str) -> None:
    key = hashlib.sha256(str(builder.data_path).encode()).hexdigest()[:16]
    lock = os.path.join(cache_root(), "locks", f"tfds-{key}.lock")

    def build() -> None:
        # A TFDS dataset keeps its own download progress; --verbosity=0 (absl INFO) keeps TFDS's
        # messages for ours too.
        if not isinstance(builder, TextFiles) or logging.get_verbosity() >= logging.INFO:
            builder.download_and_prepare()
            return
        docs = [doc for split in builder._docs.values() for doc in split]
        size = sum(os.path.getsize(doc.path) for doc in {d.path: d for d in docs}.values())
        print(f"preparing corpus {what}, {size / 1e6:.1f} MB ...", end=" ", flush=True)
        start = time.perf_counter()
        try:
            with _quiet_tfds(builder):
                builder.download_and_prepare()
        except BaseException:
            print("failed", flush=True)
            raise
        print(f"done in {time.perf_counter() - start:.1f} s", flush=True)

    build_once(builder.is_prepared, build, lock, what)


def _open_files(d, name: str, files: list[tuple[str, str]], meta: dict) -> Corpus:
    if d.max_files > 0:
        files = files[:d.max_files]
    meta = dict(meta, num_files=len(files), validation_fraction=d.validation_fraction)
    fingerprint = _fingerprint(files, meta)
    builder_cls = PythonStdlib if name == "python_stdlib" else TextFiles
    with _quiet_tfds():
        builder = builder_cls(docs=split_docs(files, d.validation_fraction),
                              validation_fraction=d.validation_fraction, metadata=meta,
                              fingerprint=fingerprint, data_dir=d.data_dir or _default_data_dir())
        _prepare(builder, f"{name} ({len(files)} files)")
    return Corpus(name, fingerprint, "text", meta, builder, OWN_SPLITS)


def _open_tfds(d) -> Corpus:
    name = d.tfds_name
    try:
        builder = tfds.builder(name, data_dir=d.data_dir or None, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(
            base, tfds.list_builders(with_community_datasets=False), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see tfds.list_builders()"
        raise DataError(f"data.tfds_name={name!r} is not a registered TFDS dataset{hint}") from None
    except Exception as e:  # a bad config or version inside the name
        raise DataError(f"data.tfds_name={name!r}: {str(e).splitlines()[0]}") from None
    features = getattr(builder.info.features, "keys", lambda: [])()
    if features and d.text_field not in features:
        raise DataError(f"data.text_field={d.text_field!r} is not a feature of {name}; "
                        f"available: {', '.join(sorted(features))}")
    try:
        _prepare(builder, f"TFDS {name}")
    except Exception as e:
        raise DataError(f"could not prepare TFDS dataset {name!r} as ArrayRecord in "
                        f"{builder.data_dir}: {str(e).splitlines()[0] if str(e) else e!r}") from e
    splits = tuple(builder.info.splits.keys()) if builder.info.splits else ()
    fingerprint = hashlib.sha256(
        f"{builder.info.full_name}\0{builder.data_dir}\0{d.text_field}".encode()).hexdigest()[:16]
    return Corpus(f"tfds_{builder.name}", fingerprint, d.text_field,
                  {"tfds_name": name, "full_name": builder.info.full_name}, builder, splits)


def open_corpus(d) -> Corpus:
    """The corpus that the data config `d` (config.data) names, prepared if needed."""
    if d.source == "python_stdlib":
        meta = {"python_version": platform.python_version(),
                "python_implementation": platform.python_implementation(),
                "include_tests": bool(d.include_tests)}
        return _open_files(d, "python_stdlib", stdlib_files(d.include_tests), meta)
    if d.source == "text_files":
        files = resolve_text_files(d.paths, d.extensions)
        return _open_files(d, "text_files", files, {"paths": d.paths})
    if d.source == "tfds":
        if not d.tfds_name:
            raise DataError("data.source='tfds' needs data.tfds_name, e.g. tiny_shakespeare")
        return _open_tfds(d)
    raise DataError(f"data.source={d.source!r} is not one of python_stdlib, text_files, tfds")
