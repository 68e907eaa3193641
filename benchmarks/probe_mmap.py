"""Mapping probe: what mapping a /dev/shm segment costs in a process with a CUDA context.

In real runs on an H100 host (docs/parity.md, "tenth session") a rank's first SHM WRITE to a peer, which
maps the peer's segment, waited 11-25 ms inside ``mmap`` while the rank's main thread polled its spin
kernel's stream. This probe times ``mmap`` of a fresh 1 MiB segment (create, size, map, unmap, unlink)
under these conditions, one after another in one process, ``--reps`` times each:

* ``plain``: before CuPy touches the GPU;
* ``context``: with a CUDA context;
* ``kernel``: with a kernel of this process resident on a non-blocking stream (it spins on
  ``%globaltimer`` and ends by itself after ``--hold`` seconds);
* ``kernel+poll``: the same while another thread queries that stream every millisecond, as the real
  driver's ``stream_sync`` does;
* ``kernel+poll+other``: the same while another process also keeps a kernel resident (two contexts
  time-slicing the GPU, as two ranks sharing it during a collective);
* ``registered``: no kernel, while another thread page-locks (``cudaHostRegister``) and releases a 64 MiB
  segment over and over, as a rank registering host regions does;
* ``own N MiB`` (``registered``): a second view of a segment this process has mapped (and page-locked with
  ``cudaHostRegister``, as real mode registers host regions): what an SHM WRITE to the rank's own region
  maps (``PeerSegments`` opens every target segment, the rank's own included); ``kernel reading it``: the
  same while a kernel of this process reads a flag in that segment (the spin kernel's pattern).

It prints per condition the mean, median, 90th percentile and maximum (ms); ``--json`` the raw samples.

    python benchmarks/probe_mmap.py [--reps 40] [--hold 3] [--json]

Needs CuPy and a CUDA GPU; exits 2 with one line when there is none. Every kernel ends by itself.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from typing import Any

# the kernels of the time-slicing probe: hold(ns) spins until its time is up, flag_spin(flag, ns) while *flag == 1
from probe_timeslice import HOLD_SOURCE

SEGMENT = 1 << 20


def map_once(tag: str) -> float:
    """Create, size and map a fresh segment; the seconds the ``mmap`` call took."""
    path = f"/dev/shm/mooncake-probe-mmap-{os.getpid()}-{tag}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, SEGMENT)
        t0 = time.perf_counter()
        mm = mmap.mmap(fd, SEGMENT)
        dt = time.perf_counter() - t0
        mm[0:1] = b"x"
        mm.close()
    finally:
        os.close(fd)
        os.unlink(path)
    return dt


def remap(fd: int, size: int, reps: int) -> list[float]:
    """Map another view of an open segment ``reps`` times; the seconds each ``mmap`` call took."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        again = mmap.mmap(fd, size)
        out.append(time.perf_counter() - t0)
        again[8:9] = b"y"  # past the flag word a kernel may be reading
        again.close()
        time.sleep(0.002)
    return out


def series(name: str, reps: int) -> list[float]:
    out = []
    for k in range(reps):
        out.append(map_once(f"{name}-{k}"))
        time.sleep(0.002)
    return out


def _other(hold_s: float, ready: Any) -> None:
    import cupy as cp

    k = cp.RawModule(code=HOLD_SOURCE).get_function("hold")
    s = cp.cuda.Stream(non_blocking=True)
    k((1,), (1,), (cp.uint64(int(hold_s * 1e9)),), stream=s)
    ready.set()
    s.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--hold", type=float, default=3.0, help="seconds a resident kernel spins (it ends by itself)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    got: dict[str, list[float]] = {"plain": series("plain", args.reps)}
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
        cp.zeros(1).sum()
        cp.cuda.Device().synchronize()
    except Exception as exc:  # no CuPy, no driver, no device
        print(f"probe_mmap: needs CuPy and a CUDA GPU ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    got["context"] = series("context", args.reps)
    hold = cp.RawModule(code=HOLD_SOURCE).get_function("hold")
    stream = cp.cuda.Stream(non_blocking=True)

    def resident(name: str, poll: bool) -> None:
        hold((1,), (1,), (cp.uint64(int(args.hold * 1e9)),), stream=stream)
        stop = threading.Event()

        def poller() -> None:
            while not stop.is_set():
                stream.done  # noqa: B018 (cudaStreamQuery, as the real driver's stream_sync)
                time.sleep(0.001)

        t = threading.Thread(target=poller, daemon=True)
        if poll:
            t.start()
        time.sleep(0.05)
        got[name] = series(name, min(args.reps, int(args.hold / 0.004)))
        stop.set()
        if poll:
            t.join()
        stream.synchronize()

    resident("kernel", poll=False)
    resident("kernel+poll", poll=True)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    other = ctx.Process(target=_other, args=(args.hold + 2.0, ready))
    other.start()
    ready.wait(60)
    resident("kernel+poll+other", poll=True)
    other.join(args.hold + 30)
    stop = threading.Event()

    def register_loop() -> None:
        import numpy as np

        buf = mmap.mmap(-1, 64 << 20)

        view = np.frombuffer(buf, dtype=np.uint8)
        ptr = int(view.ctypes.data)
        while not stop.is_set():
            cp.cuda.runtime.hostRegister(ptr, 64 << 20, 0)
            cp.cuda.runtime.hostUnregister(ptr)
        del view

    t = threading.Thread(target=register_loop, daemon=True)
    t.start()
    time.sleep(0.05)
    got["registered"] = series("registered", args.reps)
    stop.set()
    t.join()
    import numpy as np

    for size in (1 << 20, 32 << 20):  # a second view of this process's own registered segment
        path = f"/dev/shm/mooncake-probe-mmap-{os.getpid()}-own"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            own = mmap.mmap(fd, size)
            view = np.frombuffer(own, dtype=np.uint8)
            for registered in (False, True):
                if registered:  # cudaHostRegisterPortable | cudaHostRegisterMapped, as real mode registers
                    cp.cuda.runtime.hostRegister(int(view.ctypes.data), size, 3)
                got[f"own {size >> 20} MiB{' registered' if registered else ''}"] = remap(fd, size, args.reps)
            # the spin kernel's pattern: a kernel reads a flag in that registered segment (through its mapped
            # device pointer) until it is cleared, while a second view of the segment is mapped
            view[0:4] = np.frombuffer(np.int32(1).tobytes(), dtype=np.uint8)
            dptr = int(view.ctypes.data)  # unified addressing: a registered mapped host pointer is valid on the GPU
            watch = cp.RawModule(code=HOLD_SOURCE).get_function("flag_spin")
            watch((1,), (1,), (cp.uint64(dptr), cp.uint64(int(args.hold * 1e9))), stream=stream)
            time.sleep(0.05)
            got[f"own {size >> 20} MiB registered, kernel reading it"] = remap(fd, size, min(args.reps, int(args.hold / 0.004)))
            view[0:4] = np.frombuffer(np.int32(0).tobytes(), dtype=np.uint8)  # clear: the kernel ends
            stream.synchronize()
            cp.cuda.runtime.hostUnregister(int(view.ctypes.data))
            del view
            own.close()
        finally:
            os.close(fd)
            os.unlink(path)
    if args.json:
        print(json.dumps(got))
        return 0
    print(f"{'condition':<42} {'n':>4} {'mean':>8} {'median':>8} {'p90':>8} {'max':>8}  (ms, one mmap of a 1 MiB segment)")
    for name, xs in got.items():
        s = sorted(xs)
        p90 = s[min(len(s) - 1, int(0.9 * len(s)))]
        print(f"{name:<42} {len(s):>4} {statistics.fmean(s) * 1e3:8.3f} {statistics.median(s) * 1e3:8.3f} "
              f"{p90 * 1e3:8.3f} {s[-1] * 1e3:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
