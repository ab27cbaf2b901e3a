"""keep_freed_memory: blocks below 32 MB come from the heap, which is never trimmed, so a block
freed and allocated again each training step is not re-faulted from the kernel."""

import ctypes
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
import numpy as np
from loralab.malloc import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
block = np.ones(20 << 20, dtype=np.uint8)  # above glibc's initial 128 KB threshold, below 32 MB
print(libc.mallinfo2().hblkhd - before)  # bytes that went to mmap, handed back on free
"""


def glibc_with_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="glibc >= 2.33 only")
def test_large_blocks_come_from_the_heap_once_freed_memory_is_kept():
    def mmapped(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout)

    assert mmapped("default") >= 20 << 20  # glibc's default: a fresh mapping, unmapped on free
    assert mmapped("keep") == 0
