"""A real-mode process grows its file descriptor table once, at its start: :func:`grow_fd_table`.

Linux keeps a process's open files in a table that starts at 64 entries and doubles the first time a
descriptor beyond it is opened (``expand_fdtable``). In a process with more than one thread that growth
waits for an RCU grace period (``synchronize_rcu``) before the opening call returns. On the lent H100 host
that wait was 9-28 ms, and real ranks met it in their first collective, where their first WRITEs open
``/dev/shm`` segments and RPC connections: the transfer thread sat in ``synchronize_rcu_normal`` (state D)
once per rank per run (docs/parity.md, "twelfth session"). It is a property of how many descriptors this
Python driver happens to hold (CUDA, zmq, threads), not of the protocol, and the simulator has no such
cost. A table never shrinks, so opening one high descriptor while the process has a single thread, and
closing it, removes the wait for good.
"""

from __future__ import annotations

import fcntl
import os

#: The table size a real-mode process grows to at its start (capped by the soft ``RLIMIT_NOFILE``).
FD_TABLE_ENTRIES = 4096


def grow_fd_table(entries: int = FD_TABLE_ENTRIES) -> int:
    """Grow this process's descriptor table to ``entries`` now (or to the soft ``RLIMIT_NOFILE``, if lower):
    duplicate a descriptor to the lowest free number at or above the top, then close it. Call it before the
    process starts threads: then the growth does not wait for an RCU grace period either. Returns the
    descriptor number that was opened (0 when the limit leaves nothing to grow)."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = min(entries, soft) - 1
    if top < 64:  # the table's first size: nothing to gain
        return 0
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top)  # never replaces an open descriptor
    except OSError:
        return 0
    finally:
        os.close(fd)
    os.close(high)
    return int(high)
