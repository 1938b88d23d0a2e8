"""Worker processes that end with the process that started them.

A pool's workers outlive a parent killed with SIGKILL (a preempted VM, the OOM killer): they
are re-parented to init and keep running. `die_with_parent`, called first in each worker, asks
Linux to SIGKILL the worker when its parent dies (prctl PR_SET_PDEATHSIG), and exits at once
if the parent is already gone. Elsewhere it does nothing.

`process_exited` is the one liveness check for a pid that a lock, a temporary file or a sweep
member names. A zombie counts as exited: where PID 1 does not reap orphans (many containers),
a killed run's workers stay zombies, and `kill(pid, 0)` alone would call them alive for ever.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def process_exited(pid: int) -> bool:
    """Whether process `pid` of this host has exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's live process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False  # no /proc (macOS): alive, as kill() said


def die_with_parent(parent_pid: int) -> None:
    """In a worker started by `parent_pid`: be killed when it dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)
