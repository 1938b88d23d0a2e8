"""Worker processes that end with the process that started them.

A pool's workers outlive a parent killed with SIGKILL (a preempted VM, the OOM killer): they
are re-parented to init and keep running. `die_with_parent`, called first in each worker, asks
Linux to SIGKILL the worker when its parent dies (prctl PR_SET_PDEATHSIG), and exits at once
if the parent is already gone. Elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """In a worker started by `parent_pid`: be killed when it dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)
