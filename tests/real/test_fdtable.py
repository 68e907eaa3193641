"""A real-mode process grows its descriptor table at its start (mooncake_real/fdtable.py)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from mooncake_real.fdtable import FD_TABLE_ENTRIES, grow_fd_table

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


def _fdsize(status: str) -> int:
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("FDSize:")))


def test_a_fresh_process_grows_its_table_once_and_keeps_no_descriptor_open() -> None:
    code = ("import os;from mooncake_real.fdtable import grow_fd_table;"
            "before=open('/proc/self/status').read();n=len(os.listdir('/proc/self/fd'));top=grow_fd_table();"
            "print(before.split('FDSize:')[1].split()[0], open('/proc/self/status').read().split('FDSize:')[1]"
            ".split()[0], n, len(os.listdir('/proc/self/fd')), top)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    before, after, n_before, n_after, top = map(int, out)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    want = min(FD_TABLE_ENTRIES, soft)
    if want <= 64:
        pytest.skip(f"RLIMIT_NOFILE {soft}: nothing to grow")
    assert before < want <= after and top == want - 1
    assert n_after == n_before  # the descriptor it opened is closed again


def test_it_never_replaces_a_descriptor_already_open_at_the_top() -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    top = min(FD_TABLE_ENTRIES, soft) - 1
    if top < 64:
        pytest.skip(f"RLIMIT_NOFILE {soft}: nothing to grow")
    r, w = os.pipe()
    held = os.dup2(w, top)
    try:
        got = grow_fd_table()
        assert got != top  # the lowest free number above it instead, or nothing under the limit
        os.write(held, b"x")  # still the pipe it was
        assert os.read(r, 1) == b"x"
    finally:
        os.close(held)
        os.close(r)
        os.close(w)
