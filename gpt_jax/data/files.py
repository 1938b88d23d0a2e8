"""Errors, cache locations, file systems, atomic writes and a build lock for the data modules.

Paths are local or any fsspec URL (`gs://` through gcsfs, `memory://` in tests); `filesystem`
turns an unknown protocol into a one-line error instead of a local folder named `gs:`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import fsspec
from absl import logging

STALE_LOCK_SECONDS = 120.0  # another host's lock not refreshed for this long: its builder died
HEARTBEAT_SECONDS = 10.0  # a builder's lock is touched this often, by a thread of its own


class DataError(ValueError):
    """Bad data input; the message names the bad value and what is allowed."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A path in the data config that does not exist."""


def cache_root() -> str:
    """Where default caches live: $GPT_JAX_CACHE or ~/.cache/gpt_jax."""
    return os.environ.get("GPT_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "gpt_jax")


def digest(*parts: bytes | str) -> str:
    """A 16-hex-digit sha256 of `parts` (each NUL-terminated), for fingerprints."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8") if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) for `key` (sha256; independent of PYTHONHASHSEED)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16 ** 12


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a local path (~ expanded) or a URL."""
    try:
        fs, inner = fsspec.core.url_to_fs(os.path.expanduser(path) if not is_remote(path)
                                          else path)
    except (ValueError, ImportError) as e:
        protocol = path.split("://")[0]
        hint = " (pip install gcsfs, or gpt_jax[tpu])" if protocol in ("gs", "gcs") else ""
        raise DataError(f"{path!r}: the {protocol}:// file system is not available{hint}: "
                        f"{str(e).splitlines()[0]}") from None
    return fs, inner


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    return fs.cat_file(inner)


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.exists(inner)


def store_paths(spec: str) -> list[tuple[str, float]]:
    """`data.store` as [(path, weight)]: 'PATH' or 'PATH=W,PATH=W,...' (weights sum to 1)."""
    out = []
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        path, _, weight = entry.rpartition("=")
        try:  # a path may hold "=" itself (gs://b/year=2024/store): only a number is a weight
            out.append((path, float(weight)) if path else (entry, 1.0))
        except ValueError:
            out.append((entry, 1.0))
    if not out or any(w <= 0 for _, w in out):
        raise DataError(f"data.store={spec!r}: expected PATH or PATH=WEIGHT,PATH=WEIGHT,... "
                        "with positive weights")
    total = sum(w for _, w in out)
    return [(p, w / total) for p, w in out]


def json_objects(path: str, error: type[ValueError] = DataError
                 ) -> Iterator[tuple[str, dict]]:
    """(`path:line`, object) for each non-blank line of a small JSONL file, local or remote; a
    missing file or a line that is not a JSON object raises `error` naming `path:line`."""
    if not exists(path):
        missing = DataFileNotFoundError if error is DataError else error
        raise missing(f"{path} does not exist; expected a JSONL file")
    for number, line in enumerate(read_bytes(path).split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except UnicodeDecodeError:
            raise error(f"{where}: the line is not UTF-8 text") from None
        except ValueError as e:
            raise error(f"{where}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise error(f"{where}: a JSON {type(obj).__name__}, expected an object")
        yield where, obj


def atomic_write(path: str, data: bytes | str) -> None:
    """Write `path` so that readers see either nothing or the whole file (tmp + fsync + rename).

    Remote paths (gs://...) are written whole by one object upload, which is atomic already.
    """
    if is_remote(path):
        fs, inner = filesystem(path)
        fs.pipe_file(inner, data.encode("utf-8") if isinstance(data, str) else data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None if it is missing or unreadable."""
    fs, inner = filesystem(path)
    try:
        return json.loads(fs.cat_file(inner).decode("utf-8"))
    except (OSError, ValueError):
        return None


def _lock_is_stale(lock_path: str) -> bool:
    """A lock of this host is stale only when its process is gone; another host's lock when its
    heartbeat thread has not touched it for STALE_LOCK_SECONDS."""
    info = read_json(lock_path) or {}
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return True  # the builder on this host died
        except PermissionError:
            pass
        return False  # alive, however long its build takes
    try:
        return time.time() - os.path.getmtime(lock_path) > STALE_LOCK_SECONDS
    except OSError:
        return False  # gone meanwhile; the caller retries


@contextlib.contextmanager
def build_lock(lock_path: str) -> Iterator[bool]:
    """Try to become the one builder of an artifact.

    Yields True when this process holds the lock, False when another live process holds it.
    A thread touches the lock every HEARTBEAT_SECONDS while it is held, so a build that reports
    nothing (a TFDS prepare) is never judged stale. A lock left by a dead builder is taken
    over. The lock file is removed on exit.
    """
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if not _lock_is_stale(lock_path):
                yield False
                return
            logging.warning("Taking over the stale build lock %s", lock_path)
            with contextlib.suppress(OSError):
                os.remove(lock_path)
    else:
        yield False
        return
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    released = threading.Event()

    def touch() -> None:
        while not released.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(lock_path)

    thread = threading.Thread(target=touch, name="build-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield True
    finally:
        released.set()
        thread.join()
        with contextlib.suppress(OSError):
            os.remove(lock_path)


def build_once(is_done: Callable[[], bool], build: Callable[[], None],
               lock_path: str, what: str, poll_seconds: float = 0.5) -> None:
    """Make `is_done()` true: build under the lock, or wait for the process that holds it.

    Works across processes on one host and, with a shared filesystem, across hosts; where each
    host has its own disk, each host builds its own copy.
    """
    waited = False
    while not is_done():
        with build_lock(lock_path) as held:
            if held:
                if not is_done():  # someone may have finished just before we took the lock
                    build()
                return
        if not waited:
            logging.info("Waiting for another process to build %s (lock %s)", what, lock_path)
            waited = True
        time.sleep(poll_seconds)
