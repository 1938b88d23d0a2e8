"""One training process per run directory: `<workdir>/run.lock`.

    with run_lock.hold(workdir):      # gpt-jax train; eval, sample and serve never take it
        ...

Process 0 takes the lock for the whole run (a multi-host run holds it once) and tells the other
processes whether it got it, so every process of a refused run stops with the same one line:
the directory, and the host, pid and start time of the run that holds it. A thread rewrites
the lock's heartbeat while it is held. A lock is stale, and taken over with a warning, when
its process is gone (same host) or its heartbeat is older than STALE_SECONDS (another host,
or a gs:// run directory, where the lock is written and read back rather than created
exclusively). Taking the lock is also the first write to the run directory, so a directory
that cannot be written is reported here, before anything is compiled.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Iterator

import jax
import numpy as np
from absl import logging
from etils import epath

from gpt_jax.data.files import atomic_write_json, holder_is_gone, is_remote, read_json
from gpt_jax.errors import RunDirError, RunLockedError

FILENAME = "run.lock"
HEARTBEAT_SECONDS = 15.0
STALE_SECONDS = 300.0


def path(workdir: str) -> str:
    return f"{str(workdir).rstrip('/')}/{FILENAME}"


def _record(token: str, since: float) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": since,
            "heartbeat": time.time(), "token": token}


def _describe(info: dict) -> str:
    since = info.get("since")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
            if isinstance(since, (int, float)) else "an unknown time")
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {when}"


def _is_stale(info: dict) -> bool:
    gone = holder_is_gone(info)
    if gone is not None:
        return gone
    beat = info.get("heartbeat")
    return not isinstance(beat, (int, float)) or time.time() - beat > STALE_SECONDS


def _old(lock: str) -> bool:
    try:
        return time.time() - os.path.getmtime(lock) > STALE_SECONDS
    except OSError:
        return False


def _refuse(workdir: str, info: dict) -> RunLockedError:
    return RunLockedError(f"the run directory {workdir} is in use by {_describe(info)} "
                          f"(lock {path(workdir)}); stop that run, or use another --workdir")


def _make_dir(workdir: str) -> None:
    try:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise RunDirError(f"--workdir={workdir} is a file, not a directory; "
                          "give a directory (it is created if missing)") from e
    except NotADirectoryError as e:
        raise RunDirError(f"--workdir={workdir}: a part of that path is a file, not a "
                          "directory; give a directory path") from e
    except PermissionError as e:
        raise RunDirError(f"cannot create the run directory {workdir}: permission denied; "
                          "choose a --workdir you can write") from e


def _take_local(workdir: str, record: dict) -> None:
    lock = path(workdir)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = read_json(lock) or {}
            if not info.get("pid") and not _old(lock):  # being written by its taker this moment
                raise _refuse(workdir, info) from None
            if info.get("pid") and not _is_stale(info):
                raise _refuse(workdir, info) from None
            logging.warning("taking over the run lock %s of %s (that process is gone)", lock,
                            _describe(info))
            with contextlib.suppress(OSError):
                os.remove(lock)
            continue
        except PermissionError as e:
            raise RunDirError(f"cannot write to the run directory {workdir}: permission "
                              "denied; choose a --workdir you can write") from e
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise RunDirError(f"cannot write to the run directory {workdir}: "
                                  f"{os.strerror(e.errno)}") from e
            raise
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return
    raise _refuse(workdir, read_json(lock) or {})


def _take_remote(workdir: str, record: dict) -> None:
    lock = path(workdir)
    info = read_json(lock)
    if info is not None and not _is_stale(info):
        raise _refuse(workdir, info)
    if info is not None:
        logging.warning("taking over the run lock %s of %s (no heartbeat for %.0f s)", lock,
                        _describe(info), time.time() - info.get("heartbeat", 0))
    atomic_write_json(lock, record)
    time.sleep(1.0)  # object stores: the last writer wins, so read back who that was
    now = read_json(lock) or {}
    if now.get("token") != record["token"]:
        raise _refuse(workdir, now)


def _take(workdir: str, record: dict) -> None:
    _make_dir(workdir)
    (_take_remote if is_remote(workdir) else _take_local)(workdir, record)


def _agree(ok: bool) -> bool:
    """Whether process 0 took the lock, as every process learns it."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils  # noqa: PLC0415 (only multi-process runs)

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Hold `workdir`'s run lock for the body (see the module docstring)."""
    record = _record(uuid.uuid4().hex, time.time())
    error = None
    if jax.process_index() == 0:
        try:
            _take(workdir, record)
        except Exception as e:  # noqa: BLE001 -- every process must hear the outcome first
            error = e
    if not _agree(error is None):
        if error is not None:
            raise error
        raise RunLockedError(f"process 0 could not take the run lock {path(workdir)}; "
                             "see its log")
    if jax.process_index() != 0:
        yield
        return
    released = threading.Event()

    def beat() -> None:
        while not released.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                atomic_write_json(path(workdir), {**record, "heartbeat": time.time()})

    thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        released.set()
        thread.join()
        with contextlib.suppress(OSError):
            epath.Path(path(workdir)).unlink()
