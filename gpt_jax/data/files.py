"""File systems, the one file lister, cache locations, atomic writes and a build lock.

Paths are local or any fsspec URL (`gs://` through gcsfs, `memory://` in tests); `filesystem`
turns an unknown protocol into a one-line error instead of a local folder named `gs:`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
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

from gpt_jax.errors import DataError, DataFileNotFoundError
from gpt_jax.processes import process_exited

STALE_LOCK_SECONDS = 120.0  # another host's lock not refreshed for this long: its builder died
HEARTBEAT_SECONDS = 10.0  # a builder's lock is touched this often, by a thread of its own


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


def file_sha256(path: str, copy_to=None) -> str:
    """The sha256 hex digest of the file at `path` (local or fsspec URL), read in 8 MiB
    chunks; each chunk is also written to the open file `copy_to` if given."""
    fs, inner = filesystem(path)
    sha = hashlib.sha256()
    with fs.open(inner, "rb") as f:
        while chunk := f.read(8 << 20):
            sha.update(chunk)
            if copy_to is not None:
                copy_to.write(chunk)
    return sha.hexdigest()


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


@dataclasses.dataclass(frozen=True)
class FileInfo:
    path: str  # a local path or a URL
    rel: str  # relative to the corpus root: what document keys and splits are made from
    size: int
    version: str  # mtime / generation: changes when the file does


def _wanted(name: str, extensions: tuple[str, ...]) -> bool:
    return not extensions or name.lower().endswith(extensions)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _walk_local(root: str, extensions: tuple[str, ...], skip_dirs: frozenset[str]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in filenames
                  if _wanted(f, extensions) and not f.startswith(".")]
    return found


def list_files(paths: str, extensions: tuple[str, ...], *, what: str = "data.paths",
               skip_dirs: frozenset[str] = frozenset(), root: str | None = None
               ) -> list[FileInfo]:
    """Every file that the comma-separated files, folders or globs in `paths` name, sorted.

    A folder contributes its files ending in `extensions` (any, if empty; hidden files and
    folders, and
    folders named in `skip_dirs`, left out); a glob (`**` allowed) its matching files; a file
    itself. Local paths and URLs alike; relative names are taken from `root`, else from the
    files' common folder, so that moving a corpus keeps its document keys.
    """
    entries = [p.strip() for p in paths.split(",") if p.strip()]
    if not entries:
        raise DataError(f"{what} is empty; give comma-separated files, folders or globs "
                        "(local or gs://)")
    exts = tuple(e.lower() for e in extensions)
    found: dict[str, dict] = {}
    for entry in entries:
        remote = is_remote(entry)
        fs, inner = filesystem(entry)
        if glob.has_magic(inner):
            matches = (fs.glob(inner) if remote else glob.glob(inner, recursive=True))
            matches = [m for m in matches if fs.isfile(m)]
            if not matches:
                raise DataFileNotFoundError(f"{what} glob {entry!r} matches no files")
        elif fs.isdir(inner):
            matches = ([p for p in fs.find(inner) if _wanted(p, exts)
                        and not _hidden(os.path.relpath(p, inner))] if remote
                       else _walk_local(inner, exts, skip_dirs))
            if not matches:
                raise DataError(f"{what} folder {entry!r} has no files"
                                + (f" ending in {', '.join(exts)}" if exts else ""))
        elif fs.isfile(inner):
            matches = [inner]
        else:
            raise DataFileNotFoundError(f"{what} entry {entry!r} does not exist")
        for m in matches:
            name = fs.unstrip_protocol(m) if remote else os.path.abspath(m)
            found[name] = fs.info(m)
    names = sorted(found)
    if root is None:
        try:
            root = os.path.dirname(names[0]) if len(names) == 1 else os.path.commonpath(names)
        except ValueError:
            raise DataError(f"{what}={paths!r} mixes local and remote files; keep one kind "
                            "per corpus") from None
    return [FileInfo(name, os.path.relpath(name, root), int(info.get("size") or 0),
                     str(info.get("mtime") or info.get("updated") or info.get("generation")
                         or info.get("created") or ""))
            for name, info in ((n, found[n]) for n in names)]


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
            if not is_remote(entry) and not os.path.exists(entry):
                raise DataError(f"data.store={spec!r}: in {entry!r} the weight {weight!r} is "
                                f"not a number (PATH=WEIGHT, e.g. {path}=0.5), and no store is "
                                f"at {entry!r}") from None
            out.append((entry, 1.0))
    for path, _ in out:
        if not is_remote(path) and os.path.isfile(path):
            raise DataError(f"data.store={path!r} is a file; a store is the directory that "
                            "`gpt-jax prepare --store=DIR` writes")
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


def temp_file(directory: str, stem: str) -> tuple[int, str]:
    """A new temporary file in `directory`, (fd, path), named `.{stem}~{host}~{pid}~...` so
    that a later run on this host can tell a killed writer's leftover from a live one's."""
    prefix = f".{stem}~{socket.gethostname()}~{os.getpid()}~"
    return tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")


def remove_orphaned_temp_files(directory: str) -> int:
    """Delete the temporary files in `directory` (see `temp_file`) whose writer on this host
    has exited (a kill -9 leaves them behind); returns how many."""
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(directory), ".*~*~*~*.tmp")):
        _, host, pid, _ = os.path.basename(path).split("~", 3)
        if pid.isdigit() and holder_is_gone({"host": host, "pid": int(pid)}):
            with contextlib.suppress(OSError):
                os.remove(path)
                removed += 1
    return removed


def atomic_write(path: str, data: bytes | str) -> None:
    """Write `path` so that readers see either nothing or the whole file (tmp + fsync + rename).

    Remote paths (gs://...) are written whole by one object upload, which is atomic already.
    """
    if is_remote(path):
        fs, inner = filesystem(path)
        fs.pipe_file(inner, data.encode("utf-8") if isinstance(data, str) else data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = temp_file(os.path.dirname(path) or ".", os.path.basename(path))
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


def holder_is_gone(info: dict) -> bool | None:
    """Whether the process a lock record {"host", "pid"} names has exited: True or False on
    this host, None for another host's (or a record without them)."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return None
    return process_exited(info["pid"])  # alive: False, however long it takes


def _lock_is_stale(lock_path: str) -> bool:
    """A lock of this host is stale only when its process is gone; another host's lock when its
    heartbeat thread has not touched it for STALE_LOCK_SECONDS."""
    gone = holder_is_gone(read_json(lock_path) or {})
    if gone is not None:
        return gone
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
