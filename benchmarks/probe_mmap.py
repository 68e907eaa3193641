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
* ``kernel+poll+other <activity>``: the same while another process keeps a kernel resident *and* runs one
  CUDA activity in a loop, as the other rank sharing the GPU does while this rank's first WRITEs map
  segments: ``load`` (a fresh module from CuPy's disk cache each time, as kernel preloading does),
  ``launch`` (an empty kernel, then a stream synchronize), ``ipc-open`` (``cudaIpcOpenMemHandle`` and
  close of a buffer this process exports, as a first NVLink WRITE does), ``register`` (``cudaHostRegister``
  and release of a 64 MiB segment); ``(no kernel there)``: the same activity from a process without a
  kernel of its own resident. Each activity's round times (the first one apart) go to stderr;
* ``kernel+poll, thread <activity>``: a thread of this process runs ``load`` or ``launch`` in a loop
  instead (beside this process's own resident kernel and poller, no other process);
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
from probe_timeslice import HOLD_SOURCE, LOAD_SOURCE, _warm

#: the CUDA activities another process (or a thread of this one) loops over while segments are mapped
ACTIVITIES = ("load", "launch", "ipc-open", "register")

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


def activity_loop(cp: Any, what: str, stop: Any, tags: list[str], handle: bytes | None) -> list[float]:
    """Run one CUDA activity over and over until ``stop`` is set; the seconds each round took."""
    n = 0
    took: list[float] = []
    if what == "launch":
        empty = cp.RawModule(code=HOLD_SOURCE).get_function("empty")
        s = cp.cuda.Stream(non_blocking=True)
    elif what == "register":
        import numpy as np

        buf = mmap.mmap(-1, 64 << 20)
        view = np.frombuffer(buf, dtype=np.uint8)
        ptr = int(view.ctypes.data)
    while not stop.is_set():
        t0 = time.perf_counter()
        if what == "load":
            if n >= len(tags):
                break
            cp.RawModule(code=LOAD_SOURCE.format(tag=tags[n])).get_function(f"cold_{tags[n]}")
        elif what == "launch":
            empty((1,), (1,), (), stream=s)
            s.synchronize()
        elif what == "ipc-open":
            assert handle is not None
            p = cp.cuda.runtime.ipcOpenMemHandle(handle, 1)
            cp.cuda.runtime.ipcCloseMemHandle(p)
        elif what == "register":
            cp.cuda.runtime.hostRegister(ptr, 64 << 20, 0)
            cp.cuda.runtime.hostUnregister(ptr)
        n += 1
        took.append(time.perf_counter() - t0)
        time.sleep(0.0005)
    return took


def describe(took: list[float]) -> str:
    """``n`` rounds, the first one's time and the others' median and maximum (ms)."""
    if not took:
        return "no round"
    rest = sorted(took[1:])
    more = f", the others median {statistics.median(rest) * 1e3:.2f} max {rest[-1] * 1e3:.2f} ms" if rest else ""
    return f"{len(took)} rounds, the first {took[0] * 1e3:.2f} ms{more}"


def _busy_other(hold_s: float, what: str, tags: list[str], handle: bytes | None, ready: Any, stop: Any,
                own: bool) -> None:
    """Another process: keep a kernel resident for ``hold_s`` (``own``) and loop over one CUDA activity until
    ``stop``."""
    import cupy as cp

    k = cp.RawModule(code=HOLD_SOURCE).get_function("hold")
    s = cp.cuda.Stream(non_blocking=True)
    k((1,), (1,), (cp.uint64(1000),), stream=s)
    s.synchronize()
    if own:
        k((1,), (1,), (cp.uint64(int(hold_s * 1e9)),), stream=s)
    ready.set()
    took = activity_loop(cp, what, stop, tags, handle)
    print(f"probe_mmap: other process ({'its own kernel resident' if own else 'no kernel of its own'}), {what}: "
          f"{describe(took)}", file=sys.stderr, flush=True)
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
    # the other rank's CUDA work while this one maps segments: each activity beside a busy context, from
    # another process and from a thread of this one
    nonce = f"{time.time_ns():x}"
    loops = 200  # modules per loader (a loop that runs out of them stops)
    tags = {where: [f"{nonce}_{where}_{j}" for j in range(loops)] for where in ("process", "idle", "thread")}
    warm = ctx.Process(target=_warm, args=([t for ts in tags.values() for t in ts],))
    warm.start()
    warm.join(900)
    exported = cp.cuda.alloc(1 << 20)
    handle = bytes(cp.cuda.runtime.ipcGetMemHandle(exported.ptr))
    for own in (True, False):
        for what in ACTIVITIES:
            if what == "load" and warm.exitcode != 0:
                print(f"probe_mmap: compiling the load modules failed (exit {warm.exitcode}); load skipped", file=sys.stderr)
                continue
            ready, done = ctx.Event(), ctx.Event()
            other = ctx.Process(target=_busy_other, args=(args.hold + 2.0, what, tags["process" if own else "idle"],
                                                          handle, ready, done, own))
            other.start()
            ready.wait(60)
            time.sleep(0.05)
            resident(f"kernel+poll+other {what}{'' if own else ' (no kernel there)'}", poll=True)
            done.set()
            other.join(args.hold + 30)
    for what in ("load", "launch"):
        if what == "load" and warm.exitcode != 0:
            continue
        stop_t = threading.Event()
        took_t: list[float] = []
        th = threading.Thread(target=lambda w=what, st=stop_t, out=took_t: out.extend(activity_loop(cp, w, st, tags["thread"], None)),
                              daemon=True)
        th.start()
        time.sleep(0.05)
        resident(f"kernel+poll, thread {what}", poll=True)
        stop_t.set()
        th.join()
        print(f"probe_mmap: a thread of this process (its kernel resident), {what}: {describe(took_t)}", file=sys.stderr,
              flush=True)
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
