"""Keep freed host memory in the process so XLA:CPU steps stop paying page faults.

XLA:CPU allocates a step's temporary buffers with malloc and frees them when the step ends.
glibc serves blocks over its mmap threshold (at most 32 MiB) with a fresh mmap and returns them
to the kernel on free, so every step touches tens of MiB of new pages. On the 2-core machine in
BENCHMARKS.md that was about 12,000 page faults and ~14 ms of a 52.7 ms shakespeare_char step.
Telling glibc to never mmap a block, never trim the heap and keep a 64 MiB pad on each arena
(so a thread's emptied heap is not unmapped either) keeps those pages: the step takes 37 ms.

`keep_freed_memory()` does that with `mallopt`, once per process; the `gpt-jax` CLI calls it at
start. It is a no-op off glibc (macOS, musl) and when `GPT_JAX_KEEP_FREED_MEMORY=0`. The cost:
the resident size stays at the step's peak instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_TOP_PAD = -2
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Stop glibc returning freed memory to the kernel (see above); True if it took effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("GPT_JAX_KEEP_FREED_MEMORY", "1") == "0":
        return _applied
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path) if path else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return _applied
    if mallopt is None:
        return _applied
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. The trim threshold is an int: use its largest value. A
    # thread's arena grows by mmapped 64 MiB heaps that glibc unmaps once empty unless a top pad
    # that large is kept.
    _applied = (bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
                and bool(mallopt(M_TOP_PAD, 64 * 2**20)))
    return _applied
