"""Helpers shared by the real-mode tests (importable because pytest puts tests/real on sys.path)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
REPO = str(Path(__file__).resolve().parent.parent.parent)


def free_port() -> int:
    """A TCP port nothing listens on right now (15000-17000 is left to the protocol's own draws)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now, all drawn by the OS at once. (A drawn port plus one is not
    safe: it lies in the ephemeral range, where another socket's local port may hold it.)"""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def processes_matching(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (zombies included: they still count as not gone)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmd:
            out.append(int(d))
    return out


def shm_segments(job_id: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"mc{job_id}_"))


def job_dirs(job_id: str) -> list[str]:
    """The launcher's temporary job directories of ``job_id`` still on disk."""
    return sorted(str(p) for p in Path(tempfile.gettempdir()).glob(f"mooncake-real-{job_id}-*"))


def wait_for(cond, timeout: float, step: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())
