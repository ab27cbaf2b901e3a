"""Keep freed memory in the process instead of handing it back to the OS after every step.

glibc's malloc returns large freed blocks to the kernel (``munmap``, or trimming the heap top), so
the next step's allocations of the same size come back as fresh pages, each one zero-filled on a
page fault. Adam's temporaries for ExpensiveNet are 11 MB a step: a batch-10 pretrain took about
1,600 page faults per step and its fit took 12-25 % longer. Allocations only, so results
are bit-identical.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit: 4 MiB * sizeof(long)


def keep_freed_memory() -> bool:
    """Blocks up to 32 MB come from the heap and the heap is never trimmed. False where the C
    library is not glibc (macOS, musl): nothing is changed there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
