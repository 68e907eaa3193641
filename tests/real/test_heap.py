"""mooncake_real.heap: a real rank keeps freed memory warm for its next large allocation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: allocate and touch 8 MiB, free it, and print the resident set before, with it, and after the free (kB)
CODE = """
import sys
def rss():
    return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))
if sys.argv[1] == 'keep':
    from mooncake_real.heap import keep_freed_memory
    assert keep_freed_memory()
before = rss()
b = bytearray(8 << 20)
b[:] = b'x' * len(b)
held = rss()
del b
print(before, held, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_freed_memory_stays_with_the_process_only_when_kept(mode: str) -> None:
    out = subprocess.run([sys.executable, "-c", CODE, mode], capture_output=True, text=True, check=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout.split()
    before, held, after = map(int, out)
    assert held - before > 7000  # 8 MiB were touched
    if mode == "keep":
        assert after - before > 7000, out  # freed into the heap, still resident: the next chunk reuses it
    else:
        assert after - before < 2000, out  # glibc's default: an 8 MiB block is mapped and unmapped
