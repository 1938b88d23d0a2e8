"""`keep_freed_memory`: a freed 64 MiB block is reused, not faulted in again on every use."""

import os
import platform
import subprocess
import sys

import pytest

PROGRAM = """
import ctypes, ctypes.util, resource
from gpt_jax.host_memory import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20  # over glibc's largest mmap threshold (32 MiB), like XLA's step temporaries
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # touch every page, as a step writing its buffers does
    libc.free(block)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_value: str) -> tuple[str, int]:
    env = dict(os.environ, GPT_JAX_KEEP_FREED_MEMORY=env_value)
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt tuning is glibc-only")
@pytest.mark.e2e
def test_freed_blocks_stay_mapped_only_when_enabled():
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    applied, kept = _faults("1")
    skipped, default = _faults("0")
    assert (applied, skipped) == ("True", "False")
    assert default >= 15 * pages  # glibc: a fresh mmap (and its page faults) every time
    assert kept <= 3 * pages  # kept: faulted in once, then reused
