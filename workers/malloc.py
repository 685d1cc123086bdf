"""Keep glibc from returning freed activation buffers to the OS after every step (CPU only).

Each step allocates and frees tensors of a few MiB. By default glibc serves those with mmap and
unmaps them on free, so every step pays page faults to zero fresh pages: measured on the 2-core dev
machine, 100 decode steps of the tiny model took 4.5 s instead of 2.0 s, most of it in the kernel.
Raising the mmap and trim thresholds keeps those pages in the heap for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX_BYTES = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit

_done = False


def keep_freed_memory() -> bool:
    """Tune this process's glibc malloc once; False where there is no glibc (macOS, musl)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX_BYTES)
            and libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
            and libc.mallopt(_M_TOP_PAD, 64 * 2**20)
        )
    except (OSError, AttributeError):
        return False
    _done = bool(ok)
    return _done
