"""Errors, cache locations, atomic writes and a build lock shared by the data modules."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
from typing import Callable, Iterator

from absl import logging
from etils import epath

STALE_LOCK_SECONDS = 120.0  # a lock not refreshed for this long belongs to a dead builder


class DataError(ValueError):
    """Bad data input; the message names the bad value and what is allowed."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A path in the data config that does not exist."""


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) for `text` (sha256; independent of PYTHONHASHSEED)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16) / 16 ** 12


def cache_root() -> str:
    """Where default caches live: $GPT_JAX_CACHE or ~/.cache/gpt_jax."""
    return os.environ.get("GPT_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "gpt_jax")


def atomic_write(path: str, data: bytes | str) -> None:
    """Write `path` so that readers see either nothing or the whole file (tmp + fsync + rename).

    Remote paths (gs://...) are written whole by one object upload, which is atomic already.
    """
    if "://" in path:
        epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
        epath.Path(path).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
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
    try:
        return json.loads(epath.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _lock_is_stale(lock_path: str) -> bool:
    info = read_json(lock_path) or {}
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return True  # the builder on this host died
        except PermissionError:
            pass
    try:
        return time.time() - os.path.getmtime(lock_path) > STALE_LOCK_SECONDS
    except OSError:
        return False  # gone meanwhile; the caller retries


@contextlib.contextmanager
def build_lock(lock_path: str) -> Iterator[Callable[[], None] | None]:
    """Try to become the one builder of an artifact.

    Yields a `heartbeat()` function when this process holds the lock (call it now and then during
    a long build), or None when another live process holds it. A lock left by a dead builder is
    taken over. The lock file is removed on exit.
    """
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if not _lock_is_stale(lock_path):
                yield None
                return
            logging.warning("Taking over the stale build lock %s", lock_path)
            with contextlib.suppress(OSError):
                os.remove(lock_path)
    else:
        yield None
        return
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    last = [time.time()]

    def heartbeat() -> None:
        if time.time() - last[0] > 10:
            last[0] = time.time()
            with contextlib.suppress(OSError):
                os.utime(lock_path)

    try:
        yield heartbeat
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock_path)


def build_once(is_done: Callable[[], bool], build: Callable[[Callable[[], None]], None],
               lock_path: str, what: str, poll_seconds: float = 0.5) -> None:
    """Make `is_done()` true: build under the lock, or wait for the process that holds it.

    Works across processes on one host and, with a shared filesystem, across hosts; where each
    host has its own disk, each host builds its own copy.
    """
    waited = False
    while not is_done():
        with build_lock(lock_path) as heartbeat:
            if heartbeat is not None:
                if not is_done():  # someone may have finished just before we took the lock
                    build(heartbeat)
                return
        if not waited:
            logging.info("Waiting for another process to build %s (lock %s)", what, lock_path)
            waited = True
        time.sleep(poll_seconds)
