"""A real-mode rank keeps the memory it frees for its next large allocation: :func:`keep_freed_memory`.

Python's bytes for a large tensor's chunks (a ``ReadMem`` result, a WRITE's payload on both ends) are
allocations of megabytes. glibc serves those with a fresh ``mmap`` until its adaptive threshold has grown
past their size, and returns freed heap to the system past a 128 KiB trim threshold: every such allocation
then faults in new pages, at a tenth of the speed of writing warm memory (on the dev VM 16 MiB took 10 ms
fresh against 1 ms warm). Real ranks met that in a large collective's first chunks (docs/parity.md,
"fourteenth session"). It is a property of this Python driver, not of Mooncake, whose staging buffers are
registered once; the simulator has no such cost. Raising both thresholds at the rank's start keeps freed
memory in the heap, warm, for the next chunk.
"""

from __future__ import annotations

import ctypes

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Allocations up to this size come from the heap (glibc accepts at most 32 MiB on 64-bit systems).
MMAP_THRESHOLD = 32 << 20
#: Freed heap is returned to the system only past this much at its top.
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (see the module text). Returns whether both
    were set: False without glibc's ``mallopt`` (another C library), where nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
