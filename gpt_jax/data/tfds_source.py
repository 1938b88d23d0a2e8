"""TFDS datasets by name as a document source, read through ArrayRecord (no TensorFlow).

`open_tfds(d)` returns a `Corpus` whose splits are random-access sequences of records; the
dataset is prepared once, under a lock, in its TFDS data_dir (TFDS's own download and build).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import logging as py_logging
import os
import re
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from gpt_jax.data.config import DataConfig
from gpt_jax.data.documents import decode_utf8
from gpt_jax.data.files import build_once, cache_root
from gpt_jax.errors import DataError


@dataclasses.dataclass
class Corpus:
    """A prepared TFDS dataset: `split(name)` is a random-access sequence of records."""
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
def _quiet_tfds():
    """Hide TFDS's warnings about unregistered builder configs."""
    logger, noise = py_logging.getLogger("absl"), _DropTfdsNoise()
    logger.addFilter(noise)
    try:
        yield
    finally:
        logger.removeFilter(noise)


def _prepare(builder, what: str) -> None:
    key = hashlib.sha256(str(builder.data_path).encode()).hexdigest()[:16]
    lock = os.path.join(cache_root(), "locks", f"tfds-{key}.lock")
    build_once(builder.is_prepared, builder.download_and_prepare, lock, what)


def open_tfds(d: DataConfig) -> Corpus:
    """The TFDS dataset data.tfds_name, prepared as ArrayRecord in its data_dir if needed."""
    name = d.tfds_name
    if not name:
        raise DataError("data.source='tfds' needs data.tfds_name, e.g. tiny_shakespeare")
    try:
        with _quiet_tfds():
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
