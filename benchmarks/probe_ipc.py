"""IPC probe: what a process's first CUDA IPC open costs, and what it holds up after it returns.

In real runs of ``host-region-gpu-label-1gpu-fixed`` on an H100 host (docs/parity.md, "twelfth session")
each rank's transfer thread stalled 10-29 ms once per run, always during or right after its first NVLink
WRITE to the other rank (the first ``cudaIpcOpenMemHandle`` of the process, then a copy into the opened
memory): the stall fell on that WRITE or on the next one, an SHM WRITE (``mmap``) or a copy to the rank's
own memory. This probe times that sequence in fresh processes, one trial per process, so every open is the
process's first:

1. ``open``: ``cudaIpcOpenMemHandle`` of a 1 MiB buffer another process exported;
2. ``copy-peer``: a 4-byte device-to-device copy into it on a non-blocking stream, then a synchronize;
3. ``copy-self``: the same into the process's own buffer;
4. ``mmap``: open and map a fresh 1 MiB ``/dev/shm`` segment;
5. after a 30 ms pause, ``copy-self`` and ``mmap`` again (``... later``).

The copy path and stream are warmed before, so only the IPC open is new. A ticker thread sleeps 0.5 ms in
a loop meanwhile; its largest lateness inside the sequence (``tick late``) says whether the whole process
(the interpreter's lock, or every thread) stalled, rather than one call. Conditions: a kernel of the
opening process resident on another stream (``own``, as a rank's spin kernel) with a thread querying that
stream every millisecond (as the real driver's ``stream_sync``), and a kernel of the exporting process
resident (``other``, as the other rank's spin kernel). Every kernel spins on ``%globaltimer`` and ends by
itself after ``--hold`` seconds.

    python benchmarks/probe_ipc.py [--trials 4] [--hold 2] [--json]

It prints per condition and step the median and maximum (ms). Needs CuPy and a CUDA GPU; exits 2 with one
line when there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mooncake_real.calibrate import HOLD_KERNEL  # noqa: E402

#: The exporting process: a 1 MiB device buffer, its IPC handle on stdout, then commands on stdin
#: (``hold S``: a kernel resident for S seconds; ``quit``).
EXPORTER = r"""
import sys, cupy as cp
buf = cp.zeros(1 << 18, dtype=cp.int32)
print(bytes(cp.cuda.runtime.ipcGetMemHandle(buf.data.ptr)).hex(), flush=True)
hold = cp.RawModule(code=sys.argv[1]).get_function("hold")
s = cp.cuda.Stream(non_blocking=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd and cmd[0] == "hold":
        hold((1,), (1,), (cp.uint64(int(float(cmd[1]) * 1e9)),), stream=s)
        print("held", flush=True)
    elif cmd and cmd[0] == "quit":
        break
s.synchronize()
"""

#: One trial in a fresh process: argv handle-hex own(0/1) hold_s segment-dir.
OPENER = r"""
import json, mmap, os, sys, threading, time, cupy as cp
handle, own, hold_s, shm = bytes.fromhex(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3]), sys.argv[4]
hold = cp.RawModule(code=sys.argv[5]).get_function("hold")
mine = cp.zeros(1 << 18, dtype=cp.int32)
t, k = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
def copy(dst):
    cp.cuda.runtime.memcpyAsync(dst, mine.data.ptr + 64, 4, 3, t.ptr)
    t.synchronize()
for _ in range(3):
    copy(mine.data.ptr)
n = [0]
def seg():
    n[0] += 1
    path = f"{shm}/seg{os.getpid()}-{n[0]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 1 << 20)
    m = mmap.mmap(fd, 1 << 20)
    os.close(fd)
    m[0:4] = b"abcd"
    m.close()
    os.unlink(path)
seg()
late, stop = [], threading.Event()
def ticker():
    last = time.perf_counter()
    while not stop.is_set():
        time.sleep(0.0005)
        now = time.perf_counter()
        late.append((now, now - last - 0.0005))
        last = now
def poller():
    while not stop.is_set():
        k.done
        time.sleep(0.001)
threads = [threading.Thread(target=ticker, daemon=True)]
if own:
    hold((1,), (1,), (cp.uint64(int(hold_s * 1e9)),), stream=k)
    threads.append(threading.Thread(target=poller, daemon=True))
for th in threads:
    th.start()
time.sleep(0.05)
steps = []
def step(name, fn):
    t0 = time.perf_counter()
    out = fn()
    steps.append((name, t0, time.perf_counter()))
    return out
t0 = time.perf_counter()
ptr = step("open", lambda: cp.cuda.runtime.ipcOpenMemHandle(handle, 1))
step("copy-peer", lambda: copy(ptr))
step("copy-self", lambda: copy(mine.data.ptr))
step("mmap", seg)
time.sleep(0.03)
step("copy-self later", lambda: copy(mine.data.ptr))
step("mmap later", seg)
t1 = time.perf_counter()
stop.set()
worst = max((d for at, d in late if t0 <= at <= t1 + 0.002), default=0.0)
print(json.dumps({"steps": {nm: b - a for nm, a, b in steps}, "tick_late": worst}), flush=True)
cp.cuda.runtime.ipcCloseMemHandle(ptr)
"""

#: The exporting process's kernel spins this much longer than ``--hold``: the opening process starts
#: (imports, context, warm-up) while it is resident.
OTHER_EXTRA_S = 6.0
CONDITIONS = (("alone", False, False), ("own", True, False), ("own+other", True, True), ("other", False, True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=4, help="fresh processes per condition (default 4)")
    ap.add_argument("--hold", type=float, default=2.0, help="seconds each resident kernel spins (default 2)")
    ap.add_argument("--json", action="store_true", help="print the raw trials as JSON")
    args = ap.parse_args()
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as exc:  # noqa: BLE001 - no CuPy, no driver, no device
        print(f"probe_ipc: needs CuPy and a CUDA GPU ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    shm = "/dev/shm"
    exporter = subprocess.Popen([sys.executable, "-c", EXPORTER, HOLD_KERNEL], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    assert exporter.stdin is not None and exporter.stdout is not None
    handle = exporter.stdout.readline().strip()
    trials: dict[str, list[dict[str, object]]] = {}
    try:
        for name, own, other in CONDITIONS:
            for k in range(args.trials):
                ends = 0.0
                if other:  # a kernel of the exporting process resident for the whole trial (start-up included)
                    exporter.stdin.write(f"hold {args.hold + OTHER_EXTRA_S}\n")
                    exporter.stdin.flush()
                    exporter.stdout.readline()
                    ends = time.monotonic() + args.hold + OTHER_EXTRA_S
                r = subprocess.run([sys.executable, "-c", OPENER, handle, "1" if own else "0", str(args.hold), shm,
                                    HOLD_KERNEL], capture_output=True, text=True, timeout=60 + 2 * args.hold)
                line = (r.stdout.strip().splitlines() or [""])[-1]
                try:
                    trials.setdefault(name, []).append(json.loads(line))
                except ValueError:
                    print(f"probe_ipc: {name} trial {k + 1} gave no result: {r.stderr.strip()[-300:]}", file=sys.stderr)
                print(f"probe_ipc: {name} {k + 1}/{args.trials}", file=sys.stderr, flush=True)
                time.sleep(max(0.0, ends - time.monotonic()) + 0.2)  # the exporter's kernel has ended
    finally:
        exporter.stdin.write("quit\n")
        exporter.stdin.close()
        exporter.wait(timeout=30 + args.hold)
    if args.json:
        print(json.dumps(trials, indent=1))
        return 0
    steps = ("open", "copy-peer", "copy-self", "mmap", "copy-self later", "mmap later")
    print(f"{'condition':12s} " + " ".join(f"{s:>17s}" for s in steps) + f" {'tick late':>17s}   (median / max, ms)")
    for name, rows in trials.items():
        cells = []
        for s in (*steps, "tick_late"):
            xs = [float(r["tick_late"]) if s == "tick_late" else float(r["steps"][s]) for r in rows]  # type: ignore[index]
            cells.append(f"{statistics.median(xs) * 1e3:8.2f} /{max(xs) * 1e3:7.2f}")
        print(f"{name:12s} " + " ".join(f"{c:>17s}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
